"""A large graph cut into consecutive parts, for ``--low-memory``: the format the build writes and the runtime reads.

A part is an ONNX graph file beside the whole graph, holding a run of its nodes; its initializers
point into the whole graph's external weights file (nothing is copied). Run in order, each part's
inputs are the whole graph's inputs or earlier parts' outputs, so running them one after another
computes the whole graph with the same kernels on the same values (results are bit for bit those of
the whole graph), while only one part's weights need to be in memory. Why: the SD1.5 UNet's fp32
weights alone are 3.44 GB, more than half of what diffusers needs for the whole pipeline (6.2 GB).

``<graph>.parts.json`` lists the parts with their I/O names and dtypes and records the whole graph's
size and hash, so parts left from another build of the graph are ignored, never run. Since
version 2 each part also lists the byte ranges of the weights file it reads, so its session can
read them into the page cache when it opens (:mod:`trt_bgswap.runtime.page_cache`) instead of
faulting them in page by page in its first run; version 1 manifests still run, without that.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from trt_bgswap.manifest import sha256_file

log = logging.getLogger(__name__)

PARTS_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no weight_ranges


def parts_manifest_path(graph: Path) -> Path:
    return Path(graph).with_name(Path(graph).name + ".parts.json")


def graph_fingerprint(graph: Path) -> str:
    """The graph file's sha256 (the graph proto only: its weights file is named after the build's key)."""
    return sha256_file(graph)


@dataclass(frozen=True)
class GraphPart:
    file: str  # beside the whole graph
    inputs: tuple[tuple[str, str], ...]  # (name, dtype) in trt_bgswap.specs.DTYPES terms
    outputs: tuple[tuple[str, str], ...]
    weight_bytes: int
    # (weights file beside the whole graph, offset, length): the external data this part's initializers
    # reference, sorted, neighbours merged; what its session reads when it opens
    weight_ranges: tuple[tuple[str, int, int], ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file, "inputs": [list(t) for t in self.inputs], "outputs": [list(t) for t in self.outputs],
            "weight_bytes": self.weight_bytes, "weight_ranges": [list(r) for r in self.weight_ranges],
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, object]) -> "GraphPart":
        return cls(
            str(d["file"]),
            tuple((str(n), str(t)) for n, t in d["inputs"]),  # type: ignore[union-attr]
            tuple((str(n), str(t)) for n, t in d["outputs"]),  # type: ignore[union-attr]
            int(d["weight_bytes"]),  # type: ignore[arg-type]
            tuple((str(f), int(o), int(n)) for f, o, n in d.get("weight_ranges", ())),  # type: ignore[union-attr]
        )


def manifest_json(graph: Path, parts: list[GraphPart]) -> str:
    return json.dumps(
        {"version": PARTS_VERSION, "graph": Path(graph).name, "graph_sha256": graph_fingerprint(graph), "parts": [p.to_json() for p in parts]},
        indent=1,
    )


def read_parts(graph: Path, versions: tuple[int, ...] = READABLE_VERSIONS) -> list[GraphPart] | None:
    """The parts of ``graph`` if a set of one of ``versions`` was built for it beside it, else None (then the whole graph runs)."""
    path = parts_manifest_path(graph)
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        if d.get("version") not in versions:
            return None
        parts = [GraphPart.from_json(p) for p in d["parts"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable (%s); running the whole graph", path, e)
        return None
    if d.get("graph_sha256") != graph_fingerprint(graph):
        log.warning("%s: made for another build of %s; running the whole graph (re-run `trt-bgswap build`)", path, Path(graph).name)
        return None
    if any(not (Path(graph).parent / p.file).is_file() for p in parts):
        log.warning("%s: a part file is missing; running the whole graph (re-run `trt-bgswap build`)", path)
        return None
    return parts
