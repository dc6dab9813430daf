"""CPU fast path: ONNX Runtime's transformer fusions (fused attention) + offline-optimized graphs + int8 RMBG.

ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer``, model types
``unet`` / ``clip`` / ``vae`` as its Stable Diffusion scripts use them) rewrites attention
subgraphs into its ``Attention`` / ``MultiHeadAttention`` contrib ops and fuses
LayerNormalization / SkipLayerNormalization. On the CPU provider a fused attention node
computes softmax(QK^T)V without materialising the full score tensor through separate
MatMul/Softmax kernels (measured here: ~25% faster on a 4096-token SD1.5 self-attention).
Fusions whose ops only have CUDA kernels (GroupNorm, SkipGroupNorm, BiasSplitGelu,
NhwcConv, BiasAdd, packed QKV/KV) are switched off.

Two details of the optimizer are worked around here, without patching it:

- its symbolic shape inference runs sympy over every symbolic dim and takes minutes on the
  full UNet; the graph inputs are pinned to the benchmark's sizes while fusing, and the
  original symbolic inputs/outputs are put back afterwards (the fused ops carry no
  size-specific constants; the parity check runs at another size to prove it);
- with current numpy its UNet attention fusion fails reading ``num_heads`` from a
  one-element array; :class:`_FusionAttentionUnet` reads it with ``.item()``.

Every fused graph is then saved through ONNX Runtime's offline optimization
(:func:`trt_bgswap.engines.ort_build.optimize_offline`) so sessions open it without
re-optimizing, and is checked against the exported graph on random inputs
(:func:`max_abs_errors`); a mismatch above tolerance is an error, not a silent speed-up.
"""

from __future__ import annotations

import copy
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
from trt_bgswap.errors import BackendUnavailable, ModelError, UsageError
from trt_bgswap.manifest import Manifest
from trt_bgswap.specs import ModelSpec, pipeline_dims

from trt_bgswap.engines.attention import TILED_ATTENTION, attention_kind, bound_attention
from trt_bgswap.engines.build import BuildReport, BuiltModel, build_engines
from trt_bgswap.engines.cache import EngineCache, onnx_graph_hash, onnxruntime_key
from trt_bgswap.onnx_graph import external_data_files, pin_symbols
from trt_bgswap.engines.ort_build import host_fingerprint, onnxruntime_version, optimize_offline

log = logging.getLogger(__name__)

# Our model name -> the optimizer's model type. VAE attention in today's diffusers export
# does not match the optimizer's VAE pattern (nothing fuses), so it is not in the default set.
FUSION_MODEL_TYPES = {"unet": "unet", "text_encoder": "clip", "vae_encoder": "vae", "vae_decoder": "vae"}
DEFAULT_FUSED = ("unet", "text_encoder")
CUDA_ONLY_FUSIONS = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_packed_qkv",
    "enable_packed_kv",
    "enable_bias_add",
)
FUSION_VERSION = 1  # bump when the fusion recipe changes: it is part of the cache key
FUSED_NAME = "model.fused.onnx"
INT8_NAME = "model.int8.onnx"
PARITY_RTOL = 1e-4  # of the output's largest magnitude: fused fp32 kernels only reorder sums (~1e-6); a wrong fusion is O(1)
EXTERNAL_MIN_BYTES = 1024


@dataclass
class FastBuildEntry:
    model: str
    path: Path
    graph_optimization: str
    kind: str  # "fused" | "int8" | "ort"
    cache_hit: bool
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def _optimizer_modules() -> tuple[Any, Any, Any, Any]:
    try:
        import onnxruntime.transformers.optimizer  # noqa: F401  (puts the tools' folder on sys.path)
        from onnxruntime.transformers.fusion_attention_unet import FusionAttentionUnet
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import MODEL_TYPES
        from onnxruntime.transformers.onnx_model_unet import UnetOnnxModel
    except ImportError as e:
        raise BackendUnavailable(f"the transformer optimizer needs onnx and onnxruntime's tools ({e}); pip install onnx") from e
    return FusionAttentionUnet, FusionOptions, MODEL_TYPES, UnetOnnxModel


def _model_class(model_type: str) -> Any:
    FusionAttentionUnet, _, MODEL_TYPES, UnetOnnxModel = _optimizer_modules()

    class _FusionAttentionUnet(FusionAttentionUnet):  # type: ignore[misc, valid-type]
        def get_num_heads(self, reshape_q: Any, is_torch2: bool = False) -> int:
            if is_torch2:
                parent = self.model.get_parent(reshape_q, 1)
                if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                    value = self.model.get_constant_value(parent.input[2])
                    if isinstance(value, np.ndarray) and value.size == 1 and int(value.item()) > 0:
                        return int(value.item())
            return int(super().get_num_heads(reshape_q, is_torch2))

    class _UnetModel(UnetOnnxModel):  # type: ignore[misc, valid-type]
        def optimize(self, options: Any = None) -> None:
            self._optimize(options, None)  # the same passes, without the tqdm bar on stderr

        def fuse_multi_head_attention(self, options: Any = None) -> None:
            for cross in (False, True):
                _FusionAttentionUnet(
                    self, self.hidden_size, self.num_heads, is_cross_attention=cross, enable_packed_qkv=False, enable_packed_kv=False
                ).apply()

    if model_type == "unet":
        return _UnetModel
    if model_type not in MODEL_TYPES:
        raise UsageError(f"model type {model_type!r}: the transformer optimizer knows {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type][0]


def cpu_fusion_options(model_type: str) -> Any:
    """The optimizer's options for ``model_type`` with the CUDA-only fusions off."""
    _, FusionOptions, _, _ = _optimizer_modules()
    options = FusionOptions(model_type)
    for name in CUDA_ONLY_FUSIONS:
        if hasattr(options, name):
            setattr(options, name, False)
    return options


def fuse_transformer(onnx_path: str | Path, out_path: str | Path, model_type: str, symbols: Mapping[str, int], data_name: str | None) -> dict[str, int]:
    """Fuse ``onnx_path`` with the optimizer for ``model_type``; writes ``out_path`` (+ ``data_name`` weights).

    Returns the fused-op counts the optimizer reports. Inputs/outputs keep their symbolic dims.
    """
    import onnx

    src = onnx.load(str(onnx_path))
    inputs = {v.name: copy.deepcopy(v) for v in src.graph.input}
    outputs = {v.name: copy.deepcopy(v) for v in src.graph.output}
    bound_attention(src)  # first: the optimizer's own attention fusion (contrib Attention) holds the scores on the CPU
    pin_symbols(src, symbols)
    optimizer = _model_class(model_type)(src, 0, 0)
    optimizer.optimize(cpu_fusion_options(model_type))
    optimizer.topological_sort()
    fused = optimizer.get_fused_operator_statistics()
    graph = optimizer.model.graph
    for v in graph.input:
        v.CopyFrom(inputs[v.name])
    for v in graph.output:
        v.CopyFrom(outputs[v.name])
    del graph.value_info[:]  # shapes inferred at the pinned size must not constrain other sizes
    out_path = Path(out_path)
    if data_name is not None:
        onnx.save_model(
            optimizer.model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data_name, size_threshold=EXTERNAL_MIN_BYTES,
        )  # fmt: skip
    else:
        onnx.save_model(optimizer.model, str(out_path))
    return {k: int(v) for k, v in fused.items() if v}


def random_feeds(spec: ModelSpec, dims: Mapping[str, int], seed: int = 0, id_limit: int = 1000) -> dict[str, np.ndarray]:
    """Random inputs of a model at ``dims`` (token ids below ``id_limit``, timesteps in [0, 1000))."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec.inputs:
        shape = tuple(d if isinstance(d, int) else int(dims[d]) for d in t.shape)
        if t.np_dtype.kind in "iu":
            feeds[t.name] = rng.integers(0, id_limit, shape).astype(t.np_dtype)
        elif t.name == "timestep":
            feeds[t.name] = rng.uniform(0, 999, shape).astype(t.np_dtype)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.np_dtype)
    return feeds


def compare_graphs(reference: Path, candidate: Path, feeds: Mapping[str, np.ndarray], candidate_level: str = "disable", threads: int = 0) -> dict[str, dict[str, float]]:
    """Per output: max |reference - candidate| and max |reference| of two graphs on the same feeds (ONNX Runtime CPU)."""
    import onnxruntime as ort

    def session(path: Path, level: str) -> Any:
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    ref = session(reference, "basic")
    names = [o.name for o in ref.get_outputs()]
    want = ref.run(names, dict(feeds))
    del ref
    got = session(candidate, candidate_level).run(names, dict(feeds))
    return {
        n: {"max_abs": float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))), "ref_max_abs": float(np.max(np.abs(a)))}
        for n, a, b in zip(names, want, got)
    }


def max_abs_errors(reference: Path, candidate: Path, feeds: Mapping[str, np.ndarray], candidate_level: str = "disable", threads: int = 0) -> dict[str, float]:
    """Per-output max |reference - candidate| (see :func:`compare_graphs`)."""
    return {k: v["max_abs"] for k, v in compare_graphs(reference, candidate, feeds, candidate_level, threads).items()}


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
        extra={"transformer_fusion": model_type, "fusion_version": FUSION_VERSION, "pinned": dict(symbols), "attention": TILED_ATTENTION},
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
        models[name] = BuiltModel(name, "ort", e.path, e.cache_hit, (), (), "cpu", e.graph_optimization, {}, attention_kind(source) if e.kind == "fused" else None)
    index = write_index(out, ORT, "cpu", {k: m.index_entry() for k, m in models.items()})
    full = BuildReport(export_dir, out, "ort", "cpu", models, index)
    return full, entries
