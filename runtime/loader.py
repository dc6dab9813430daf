"""Open an exported folder's models on the chosen backend, using what `trt-bgswap build` made.

`trt-bgswap build` writes an index per backend into ``<export>/engines/``
(``index-trt.json`` for TensorRT plans, ``index-ort-<provider>.json`` for
pre-optimized ONNX Runtime graphs and execution-provider cache options). This
module reads that JSON (no ``engines`` import: the runtime stays lean) and
creates one :class:`~trt_bgswap.runtime.engine.Engine` per model. Without a
build, ONNX Runtime opens the exported graphs directly (slower to start, the
log says how to fix it); TensorRT without plans is an error with the command.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.manifest import Manifest
from trt_bgswap.runtime.backends import BackendChoice, Availability, choose_backend
from trt_bgswap.runtime.engine import Engine
from trt_bgswap.runtime.ort_backend import OrtEngine

log = logging.getLogger(__name__)

ENGINES_DIR = "engines"  # engines/build.py's DEFAULT_OUT
# --provider values: ONNX Runtime providers, plus "trt" for native TensorRT engines
PROVIDER_TO_BACKEND = {"auto": "auto", "cpu": "cpu", "cuda": "ort-cuda", "tensorrt": "ort-tensorrt", "trt": "trt"}


def resolve_backend(provider: str, facts: Availability | None = None) -> BackendChoice:
    """--provider (auto, cpu, cuda, tensorrt, trt, or a backends.py name) -> the backend that will run."""
    requested = PROVIDER_TO_BACKEND.get(provider, provider)
    return choose_backend(requested, facts if facts is not None else Availability.probe())


def read_index(folder: Path, choice: BackendChoice) -> dict[str, dict[str, Any]] | None:
    name = "index-trt.json" if choice.engine == "trt" else f"index-ort-{choice.provider}.json"
    path = folder / ENGINES_DIR / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable build index ({e}); re-run `trt-bgswap build {folder}`") from e
    return data


def open_engines(
    folder: str | Path,
    manifest: Manifest,
    choice: BackendChoice,
    threads: int = 0,
    share_activations: bool = True,
    names: Sequence[str] | None = None,
) -> dict[str, Engine]:
    """One unloaded engine per model of the manifest (or of ``names`` only), on ``choice``'s backend.

    TensorRT engines share one CUDA stream and (``share_activations``) one activation
    block sized to the largest engine's need: the stages run one after another, so a
    small GPU pays for one engine's scratch memory, not five.
    """
    folder = Path(folder)
    index = read_index(folder, choice)
    engines: dict[str, Engine] = {}
    models = {k: v for k, v in manifest.models.items() if names is None or k in names}
    if choice.engine == "trt":
        if index is None:
            raise ModelError(
                f"{folder}: no TensorRT engines built; run `trt-bgswap build {folder} --backend trt` first "
                "(or use --provider cpu/cuda)"
            )
        from trt_bgswap.runtime.cuda_device import Stream
        from trt_bgswap.runtime.trt_backend import SharedActivations, TrtEngine

        stream = Stream()
        shared = SharedActivations() if share_activations else None
        for name, entry in models.items():
            if name not in index:
                raise ModelError(f"{folder}: no TensorRT engine for {name}; re-run `trt-bgswap build {folder} --backend trt`")
            engines[name] = TrtEngine(entry.spec, folder / ENGINES_DIR / index[name]["path"], stream=stream, shared_activations=shared)
        return engines
    if choice.provider is None:
        raise UsageError(f"backend {choice.name} names no ONNX Runtime provider")
    if index is None:
        log.info("no pre-optimized graphs for %s; `trt-bgswap build %s` makes sessions start faster", choice.provider, folder)
    for name, entry in models.items():
        built = (index or {}).get(name)
        if built is None:
            engines[name] = OrtEngine(entry.spec, folder / entry.file, provider=choice.provider, intra_op_threads=threads)
            continue
        path = Path(built["path"])
        engines[name] = OrtEngine(
            entry.spec,
            path if path.is_absolute() else folder / ENGINES_DIR / path,
            provider=choice.provider,
            provider_options=built.get("provider_options") or None,
            intra_op_threads=threads,
            graph_optimization=built.get("graph_optimization") or "all",
        )
    return engines
