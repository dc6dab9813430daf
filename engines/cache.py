"""The engine cache: a built artifact is reused only while everything that shaped it is unchanged.

A TensorRT plan is valid only for the exact graph, precision, optimization
profiles, builder options, TensorRT version and GPU architecture it was built
with (TensorRT refuses plans from another version, and a plan from another
compute capability may load and run slowly or not at all; see "Engine
compatibility" in NVIDIA's TensorRT developer guide). A pre-optimized ONNX
Runtime graph is likewise tied to the ONNX Runtime version, the execution
provider and, at the ``all`` level, the host CPU's instruction set
(ONNX Runtime docs, "Graph optimizations: online/offline mode").

Every such fact goes into a :class:`CacheKey`; its parts are written beside the
artifact in a JSON sidecar. :meth:`EngineCache.lookup` compares the sidecar
with the wanted key and says *which* parts changed, so a rebuild is logged with
its reason and a mismatching artifact is never handed out.

Layout: ``<root>/<model>/<artifact>`` plus ``<artifact>.json``. Writes are
crash-safe: the sidecar is removed first, the artifact is written through
:mod:`trt_bgswap.atomic`, and the sidecar (with each file's size and sha256)
is written last, so an interrupted build leaves an entry without a sidecar,
which lookup reports as stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import atomic_path, write_text_atomic
from trt_bgswap.errors import ModelError
from trt_bgswap.manifest import sha256_file
from trt_bgswap.onnx_graph import external_data_files

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the artifact layout or the key's meaning changes
SIDECAR_SUFFIX = ".json"
_SHOW_LIMIT = 80  # longer key values are shown by digest in stale reasons


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _show(value: Any) -> str:
    text = _canonical(value)
    if len(text) <= _SHOW_LIMIT:
        return text
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class CacheKey:
    """Named, JSON-serialisable facts that decide whether an artifact is still valid."""

    parts: Mapping[str, Any]

    def __post_init__(self) -> None:
        try:
            # Round-trip so tuples become lists: the key compares equal to its sidecar copy.
            object.__setattr__(self, "parts", json.loads(_canonical(dict(self.parts))))
        except (TypeError, ValueError) as e:
            raise ModelError(f"cache key parts are not JSON-serialisable ({e}); this is a bug in the caller") from e

    @property
    def digest(self) -> str:
        return hashlib.sha256(_canonical(self.parts).encode()).hexdigest()

    def changes_from(self, old: Mapping[str, Any]) -> list[str]:
        """Human-readable reasons, one per part that differs from ``old``."""
        reasons = []
        for k in sorted(set(old) | set(self.parts)):
            if k not in old:
                reasons.append(f"{k} is new ({_show(self.parts[k])})")
            elif k not in self.parts:
                reasons.append(f"{k} is no longer part of the key (was {_show(old[k])})")
            elif old[k] != self.parts[k]:
                reasons.append(f"{k} changed: {_show(old[k])} -> {_show(self.parts[k])}")
        return reasons


def tensorrt_key(
    onnx_hash: str,
    precision: str,
    profiles: Sequence[Any],
    builder: Mapping[str, Any],
    tensorrt_version: str,
    compute_capability: str,
) -> CacheKey:
    """Everything a TensorRT plan depends on. ``profiles`` are :meth:`ShapeProfile.to_json` lists."""
    return CacheKey(
        {
            "kind": "tensorrt-plan",
            "format": CACHE_FORMAT,
            "onnx": onnx_hash,
            "precision": precision,
            "profiles": list(profiles),
            "builder": dict(builder),
            "tensorrt": tensorrt_version,
            "compute_capability": compute_capability,
        }
    )


def onnxruntime_key(
    onnx_hash: str,
    provider: str,
    graph_optimization: str,
    onnxruntime_version: str,
    host: str,
    extra: Mapping[str, Any] | None = None,
) -> CacheKey:
    """Everything a pre-optimized ONNX Runtime graph (or an EP's option set) depends on.

    ``host`` identifies the CPU instruction set when the optimization level
    makes the saved graph hardware specific, else ``"any"``. ``extra`` holds
    provider-specific parts (precision, profiles, builder options of the
    TensorRT execution provider).
    """
    parts: dict[str, Any] = {
        "kind": "onnxruntime",
        "format": CACHE_FORMAT,
        "onnx": onnx_hash,
        "provider": provider,
        "graph_optimization": graph_optimization,
        "onnxruntime": onnxruntime_version,
        "host": host,
    }
    for k, v in (extra or {}).items():
        if k in parts:
            raise ModelError(f"cache key part {k!r} given twice; this is a bug in the caller")
        parts[k] = v
    return CacheKey(parts)


# --- hashing the ONNX graph together with its external weights ---


def onnx_graph_hash(onnx_path: str | Path) -> str:
    """sha256 over the graph file and every external-data file it references, in a fixed order."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ModelError(f"{onnx_path}: ONNX file missing; re-run `trt-bgswap export`")
    h = hashlib.sha256()
    h.update(b"graph\0" + sha256_file(onnx_path).encode())
    for f in external_data_files(onnx_path):
        if not f.is_file():
            raise ModelError(f"{onnx_path}: external data file {f.name} is missing; re-run `trt-bgswap export`")
        h.update(b"\0data\0" + f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


# --- the cache itself ---


@dataclass(frozen=True)
class CacheLookup:
    """Result of a lookup: a hit, or the reasons the entry cannot be used."""

    path: Path
    hit: bool
    reasons: tuple[str, ...] = ()


@dataclass
class EngineCache:
    """Artifacts under ``root/<model>/``, each with a sidecar holding its key and file sizes/hashes."""

    root: Path
    verify_hashes: bool = False  # re-hash files on lookup (sizes are always checked); slow for big plans

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def path(self, model: str, artifact: str) -> Path:
        return self.root / model / artifact

    def sidecar(self, model: str, artifact: str) -> Path:
        return self.path(model, artifact).with_name(artifact + SIDECAR_SUFFIX)

    def read_sidecar(self, model: str, artifact: str) -> dict[str, Any] | None:
        side = self.sidecar(model, artifact)
        try:
            return json.loads(side.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}

    def lookup(self, model: str, artifact: str, key: CacheKey) -> CacheLookup:
        """Whether ``root/model/artifact`` was built for ``key``; if not, why (also logged)."""
        path = self.path(model, artifact)
        reasons = self._stale_reasons(model, artifact, key)
        if reasons:
            log.info("%s/%s: cached %s is stale: %s", self.root, model, artifact, "; ".join(reasons))
            return CacheLookup(path, False, tuple(reasons))
        log.info("%s/%s: reusing cached %s (key %s)", self.root, model, artifact, key.digest[:12])
        return CacheLookup(path, True)

    def _stale_reasons(self, model: str, artifact: str, key: CacheKey) -> list[str]:
        path = self.path(model, artifact)
        side = self.read_sidecar(model, artifact)
        if not path.exists():
            return ["not built yet"]
        if side is None:
            return [f"{path.name} has no sidecar (an interrupted build?)"]
        if not side or side.get("format") != CACHE_FORMAT or "key" not in side or "files" not in side:
            return [f"{path.name}'s sidecar is unreadable or of another format"]
        reasons = key.changes_from(side["key"])
        if not reasons and side.get("digest") != key.digest:
            reasons.append("the sidecar's digest does not match its key parts")
        for name, info in side["files"].items():
            f = path.parent / name
            if not f.is_file():
                reasons.append(f"{name} is missing")
            elif f.stat().st_size != info.get("size"):
                reasons.append(f"{name} is {f.stat().st_size} bytes but was written as {info.get('size')}")
            elif self.verify_hashes and sha256_file(f) != info.get("sha256"):
                reasons.append(f"{name} was modified after it was built")
        return reasons

    def store(self, model: str, artifact: str, key: CacheKey, write: Callable[[Path], Sequence[str]]) -> Path:
        """Build an entry: ``write(tmp)`` fills a temp file for the artifact and returns companion file names.

        Companion files (external weights) must be written by ``write`` beside
        the artifact under names unique to this key (use :meth:`companion_name`),
        so an entry in use by another process is never overwritten in place.
        """
        path = self.path(model, artifact)
        path.parent.mkdir(parents=True, exist_ok=True)
        old_side = self.read_sidecar(model, artifact) or {}
        with contextlib.suppress(FileNotFoundError):
            self.sidecar(model, artifact).unlink()
        try:
            with atomic_path(path) as tmp:
                companions = list(write(tmp))
        except BaseException:
            # This key's partial files go, and so do the old entry's companions: with its sidecar gone nothing
            # vouches for them, and no later build would know to remove them (a UNet's weights: 3.5 GB left behind).
            old_companions = [n for n in _sidecar_files(old_side) if n != path.name]
            for orphan in [*path.parent.glob(self.companion_name(artifact, key, "*")), *(path.parent / n for n in old_companions)]:
                with contextlib.suppress(FileNotFoundError):
                    orphan.unlink()
            raise
        files = {}
        for name in [path.name, *companions]:
            f = path.parent / name
            files[name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
        side = {
            "format": CACHE_FORMAT,
            "digest": key.digest,
            "key": dict(key.parts),
            "files": files,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_text_atomic(self.sidecar(model, artifact), json.dumps(side, indent=2, sort_keys=True) + "\n")
        for name in _sidecar_files(old_side):
            if name not in files:
                with contextlib.suppress(FileNotFoundError):
                    (path.parent / name).unlink()
        return path

    @staticmethod
    def companion_name(artifact: str, key: CacheKey, suffix: str) -> str:
        """A companion file name unique to this key, e.g. ``model.opt.onnx.1a2b3c4d5e6f.data``."""
        return f"{artifact}.{key.digest[:12]}{suffix}"


def _sidecar_files(side: dict[str, Any]) -> list[str]:
    """The file names an entry's sidecar lists (none for a missing or foreign one); never a path outside its folder."""
    files = side.get("files")
    return [n for n in files if isinstance(n, str) and n == Path(n).name] if isinstance(files, dict) else []
