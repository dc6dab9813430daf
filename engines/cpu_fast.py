"""CPU fast path (``trt-bgswap build --cpu-fast``): fused graphs + offline-optimized graphs + int8 RMBG, in one index.

Orchestration only: which models get which treatment, their cache keys, the parity gate and
the build index. The fusions are :mod:`~trt_bgswap.engines.fusion`; every fused graph is
then saved through ONNX Runtime's offline optimization
(:func:`trt_bgswap.engines.ort_build.optimize_offline`) so sessions open it without
re-optimizing, and is checked against the exported graph on random inputs
(:mod:`~trt_bgswap.engines.parity`): a mismatch above tolerance is an error, not a silent
speed-up. The int8 RMBG is :mod:`~trt_bgswap.engines.quantize`; the other models come from
:func:`~trt_bgswap.engines.build.build_engines`. The index is written through
:mod:`trt_bgswap.build_index`, the format the runtime's loader reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trt_bgswap.atomic import write_text_atomic
from trt_bgswap.build_index import ENGINES_DIR, ORT, write_index
from trt_bgswap.engines.graph_split import ensure_parts
from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.manifest import Manifest
from trt_bgswap.specs import pipeline_dims

from trt_bgswap.engines.attention import TILED_ATTENTION, attention_kind
from trt_bgswap.engines.build import BuildReport, BuiltModel, build_engines
from trt_bgswap.engines.cache import EngineCache, onnx_graph_hash, onnxruntime_key
from trt_bgswap.engines.upsample import SUBPIXEL_UPSAMPLING
from trt_bgswap.engines.winograd import cache_tag as winograd_tag
from trt_bgswap.engines.fusion import DEFAULT_FUSED, FUSION_MODEL_TYPES, FUSION_VERSION, fuse_transformer
from trt_bgswap.engines.ort_build import host_fingerprint, keeps_weights_mapped, onnxruntime_version, optimize_offline
from trt_bgswap.engines.parity import compare_graphs, random_feeds
from trt_bgswap.onnx_graph import external_data_files

log = logging.getLogger(__name__)

FUSED_NAME = "model.fused.onnx"
INT8_NAME = "model.int8.onnx"
PARITY_RTOL = 1e-4  # of the output's largest magnitude: fused fp32 kernels only reorder sums (~1e-6); a wrong fusion is O(1)


@dataclass
class FastBuildEntry:
    model: str
    path: Path
    graph_optimization: str
    kind: str  # "fused" | "int8" | "ort"
    cache_hit: bool
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def _parity_dims(manifest: Manifest) -> dict[str, int]:
    """A size other than the pinned one (one size-multiple wider): the fused graph must not depend on it."""
    cfg = manifest.inpaint
    if cfg is None:
        return {"B": 1}
    dims = pipeline_dims(1, cfg.default_size, cfg.default_size + cfg.size_multiple, cfg.vae_scale_factor)
    return dict(dims)


def _fused_entry(
    cache: EngineCache, export_dir: Path, manifest: Manifest, name: str, symbols: Mapping[str, int], threads: int, check: bool
) -> FastBuildEntry:
    entry = manifest.models[name]
    onnx_path = manifest.model_path(export_dir, name)
    model_type = FUSION_MODEL_TYPES[name]
    key = onnxruntime_key(
        onnx_graph_hash(onnx_path), "cpu", "all", onnxruntime_version(), host_fingerprint(),
        extra={
            "transformer_fusion": model_type, "fusion_version": FUSION_VERSION, "pinned": dict(symbols), "attention": TILED_ATTENTION,
            "upsample": SUBPIXEL_UPSAMPLING, "winograd": winograd_tag(),
        },
    )  # fmt: skip
    found = cache.lookup(name, FUSED_NAME, key)
    details: dict[str, Any] = {}
    t0 = time.perf_counter()
    if not found.hit:
        has_external = bool(external_data_files(onnx_path))

        def write(tmp: Path) -> list[str]:
            data_name = EngineCache.companion_name(FUSED_NAME, key, ".data") if has_external else None
            stage = Path(tempfile.mkdtemp(prefix=".fuse.", dir=tmp.parent))
            try:
                fused_path = stage / "fused.onnx"
                details["fused_ops"] = fuse_transformer(onnx_path, fused_path, model_type, symbols, "fused.onnx.data" if has_external else None)
                optimize_offline(fused_path, tmp, "cpu", "all", data_name)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
            if check:
                feeds = random_feeds(entry.spec, _parity_dims(manifest))
                compared = compare_graphs(onnx_path, tmp, feeds, threads=threads)
                details["parity_max_abs"] = {k: v["max_abs"] for k, v in compared.items()}
                details["parity_ref_max_abs"] = {k: v["ref_max_abs"] for k, v in compared.items()}
                for out_name, v in compared.items():
                    limit = PARITY_RTOL * max(v["ref_max_abs"], 1.0)
                    if not v["max_abs"] <= limit:
                        raise ModelError(
                            f"{name}: the fused graph's {out_name} differs from the export by {v['max_abs']:.3g} "
                            f"(> {limit:.3g}); build without fusions (a fusion pattern matched wrongly)"
                        )
            return [data_name] if data_name else []

        log.info("%s: fusing attention/normalisation for the CPU (%s)", name, "; ".join(found.reasons))
        cache.store(name, FUSED_NAME, key, write)
        write_text_atomic(found.path.with_name(FUSED_NAME + ".details.json"), json.dumps(details, indent=2, sort_keys=True) + "\n")
    else:
        side = found.path.with_name(FUSED_NAME + ".details.json")
        if side.is_file():
            details = json.loads(side.read_text(encoding="utf-8"))
    return FastBuildEntry(name, found.path, "disable", "fused", found.hit, time.perf_counter() - t0, details)


def _int8_entry(
    cache: EngineCache, export_dir: Path, manifest: Manifest, calibration: Sequence[np.ndarray], method: str
) -> FastBuildEntry:
    from trt_bgswap.engines.quantize import quantize_rmbg

    if manifest.rmbg is None:
        raise ModelError(f"{export_dir}: no RMBG config in the manifest; re-run `trt-bgswap export` with --rmbg")
    entry = manifest.models["rmbg"]
    onnx_path = manifest.model_path(export_dir, "rmbg")
    h = hashlib.sha256()
    for im in calibration:
        h.update(str(im.shape).encode())
        h.update(np.ascontiguousarray(im).tobytes())
    calib_hash = h.hexdigest()
    key = onnxruntime_key(
        onnx_graph_hash(onnx_path), "cpu", "all", onnxruntime_version(), "any",
        extra={"int8": "static-qdq-u8s8-per-channel", "calibration": calib_hash, "method": method},
    )  # fmt: skip
    found = cache.lookup("rmbg", INT8_NAME, key)
    details: dict[str, Any] = {}
    t0 = time.perf_counter()
    if not found.hit:

        def write(tmp: Path) -> list[str]:
            result = quantize_rmbg(onnx_path, tmp, entry.spec, manifest.rmbg, calibration, method)  # type: ignore[arg-type]
            details["quantized_ops"] = result.quantized_nodes
            details["calibration_images"] = result.calibration_images
            return []

        cache.store("rmbg", INT8_NAME, key, write)
    # QDQ graphs are opened at the "all" level: ONNX Runtime turns the QDQ pairs into integer kernels then
    return FastBuildEntry("rmbg", found.path, "all", "int8", found.hit, time.perf_counter() - t0, details)


def build_cpu_fast(
    export_dir: str | Path,
    out_dir: str | Path | None = None,
    fuse: Sequence[str] = DEFAULT_FUSED,
    rmbg_int8: bool = False,
    calibration_images: Sequence[np.ndarray] = (),
    calibration_method: str = "minmax",
    size: tuple[int, int] | None = None,
    threads: int = 0,
    check: bool = True,
) -> tuple[BuildReport, dict[str, FastBuildEntry]]:
    """``trt-bgswap build --backend ort --provider cpu`` plus fused graphs and an int8 RMBG, in one index.

    Models in ``fuse`` get the transformer optimizer (pinned at ``size``, default the
    model's native size) then ONNX Runtime's offline optimization; with ``rmbg_int8`` RMBG
    becomes a static-int8 QDQ graph calibrated on ``calibration_images``; everything else is
    the plain pre-optimized graph. The build index (what ``Pipeline.load`` reads) is
    rewritten to point at these artifacts, so the CLI runs the same graphs the benchmark times.
    """
    export_dir = Path(export_dir)
    manifest = Manifest.load(export_dir)
    unknown = [m for m in fuse if m not in FUSION_MODEL_TYPES or m not in manifest.models]
    if unknown:
        raise UsageError(f"cannot fuse {unknown}: fusable models here are {[m for m in FUSION_MODEL_TYPES if m in manifest.models]}")
    if rmbg_int8 and "rmbg" not in manifest.models:
        raise UsageError(f"{export_dir} has no rmbg model to quantize")
    special = set(fuse) | ({"rmbg"} if rmbg_int8 else set())
    plain = [m for m in manifest.models if m not in special]
    report = build_engines(export_dir, backend="ort", provider="cpu", models=plain or None, out_dir=out_dir) if plain else None
    out = Path(out_dir) if out_dir is not None else export_dir / ENGINES_DIR
    cache = EngineCache(out)
    symbols: dict[str, int] = {"B": 1}
    if manifest.inpaint is not None:
        cfg = manifest.inpaint
        width, height = size or (cfg.default_size, cfg.default_size)
        symbols.update(pipeline_dims(1, height, width, cfg.vae_scale_factor))
    entries: dict[str, FastBuildEntry] = {}
    for name in fuse:
        entries[name] = _fused_entry(cache, export_dir, manifest, name, symbols, threads, check)
    if rmbg_int8:
        entries["rmbg"] = _int8_entry(cache, export_dir, manifest, calibration_images, calibration_method)

    models: dict[str, BuiltModel] = dict(report.models) if report is not None else {}
    for name, e in entries.items():
        source = manifest.model_path(export_dir, name)  # what the tiling makes of it (the fused/int8 graph was made from it)
        models[name] = BuiltModel(
            name, "ort", e.path, e.cache_hit, (), (), "cpu", e.graph_optimization, {}, attention_kind(source) if e.kind == "fused" else None,
            not keeps_weights_mapped(e.path, "cpu"),
        )  # fmt: skip
    ensure_parts([m.path for m in models.values() if m.provider == "cpu"])  # --low-memory runs the UNet part by part
    index = write_index(out, ORT, "cpu", {k: m.index_entry() for k, m in models.items()})
    full = BuildReport(export_dir, out, "ort", "cpu", models, index)
    return full, entries
