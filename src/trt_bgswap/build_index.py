"""The build index: what `trt-bgswap build` made for one backend, and what `Pipeline.load` opens.

`build` writes one index per backend into ``<export>/engines/`` (``index-trt.json`` for
TensorRT plans, ``index-ort-<provider>.json`` for ONNX Runtime artifacts); the runtime's
loader reads it. This module is the format's one definition, for both sides: the engines
layer writes through :func:`write_index`, the runtime reads through :func:`read_index`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import write_text_atomic
from trt_bgswap.errors import ModelError

ENGINES_DIR = "engines"  # inside the export folder unless build is given another one
TRT, ORT = "trt", "ort"  # the engine kinds an index describes


def index_name(engine: str, provider: str | None) -> str:
    """``index-trt.json``, or ``index-ort-<provider>.json`` for an ONNX Runtime execution provider."""
    return f"index-{TRT}.json" if engine == TRT else f"index-{ORT}-{provider}.json"


@dataclass(frozen=True)
class IndexEntry:
    """One model's built artifact: the file to open and how."""

    path: Path  # relative to the engines folder, or absolute
    backend: str  # TRT | ORT
    provider: str | None = None  # the ONNX Runtime provider key it was made for
    graph_optimization: str | None = None  # the level ONNX Runtime opens ``path`` with ("disable" for pre-optimized graphs)
    provider_options: dict[str, dict[str, str]] | None = None
    cache_hit: bool = False
    reasons: tuple[str, ...] = ()  # why it was (re)built
    profiles: tuple[dict[str, Any], ...] = field(default=())  # the optimization profiles, as JSON
    attention: str | None = None  # "bounded": attention tiled (engines/attention.py); "materialised"; None: none or unknown
    prepack: bool = True  # False: ONNX Runtime runs the weights from their memory-mapped file (engines.ort_build.keeps_weights_mapped)

    def resolve(self, engines_dir: Path) -> Path:
        return self.path if self.path.is_absolute() else engines_dir / self.path

    def to_json(self, engines_dir: Path) -> dict[str, Any]:
        """``path`` relative to the engines folder when it lies inside it (the folder can then move)."""
        path = str(self.path)
        if self.path.is_absolute():
            try:
                path = str(self.path.resolve().relative_to(engines_dir.resolve()))
            except ValueError:
                path = str(self.path.resolve())
        return {
            "backend": self.backend,
            "path": path,
            "cache_hit": self.cache_hit,
            "reasons": list(self.reasons),
            "profiles": list(self.profiles),
            "provider": self.provider,
            "graph_optimization": self.graph_optimization,
            "provider_options": self.provider_options,
            "attention": self.attention,
            "prepack": self.prepack,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "IndexEntry":
        return cls(
            path=Path(d["path"]),
            backend=d["backend"],
            provider=d.get("provider"),
            graph_optimization=d.get("graph_optimization"),
            provider_options=d.get("provider_options") or None,
            cache_hit=bool(d.get("cache_hit", False)),
            reasons=tuple(d.get("reasons", ())),
            profiles=tuple(d.get("profiles", ())),
            attention=d.get("attention"),
            prepack=bool(d.get("prepack", True)),  # indexes written before the choice: ONNX Runtime's default
        )


def write_index(engines_dir: Path, engine: str, provider: str | None, entries: Mapping[str, IndexEntry]) -> Path:
    """Write (atomically) the index of one backend; returns its path."""
    path = engines_dir / index_name(engine, provider)
    write_text_atomic(path, json.dumps({k: e.to_json(engines_dir) for k, e in entries.items()}, indent=2, sort_keys=True) + "\n")
    return path


def read_index(export_dir: Path, engine: str, provider: str | None) -> dict[str, IndexEntry] | None:
    """The index `build` wrote for this backend into the export's engines folder, or None when it made none."""
    path = export_dir / ENGINES_DIR / index_name(engine, provider)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {k: IndexEntry.from_json(v) for k, v in data.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: unreadable build index ({e!r}); re-run `trt-bgswap build {export_dir}`") from e
