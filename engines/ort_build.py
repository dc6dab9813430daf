"""What makes ONNX Runtime sessions start fast: offline-optimized graphs and EP caches.

ONNX Runtime optimizes a graph every time a session opens it; for the full-size
UNet at the ``all`` level that takes seconds. Its "offline mode" (ONNX Runtime
docs, "Graph Optimizations in ONNX Runtime": set
``SessionOptions.optimized_model_filepath``) saves the optimized graph once, and
later sessions open it with optimizations disabled. Caveats from those docs that
shape the cache key: an optimized graph is tied to the ONNX Runtime version;
``extended`` and ``all`` levels insert provider-specific fused nodes, so the
graph only runs on the provider it was optimized for; ``all`` adds layout
transforms (NCHWc) chosen for the host CPU's vector width, so the key records the
CPU's instruction-set features.

For the GPU providers this module returns provider options for
``runtime/ort_backend.OrtEngine(provider_options=...)``: the TensorRT execution
provider with its own engine and timing caches, FP16, the builder optimization
level and explicit profile shapes (so it builds one engine instead of one per
new shape), and the CUDA execution provider's options. The TensorRT EP gets the
original graph: ONNX Runtime's own fusions would hand it contrib ops TensorRT
cannot parse.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_bgswap.errors import BackendUnavailable, UsageError
from trt_bgswap.runtime.ort_backend import PROVIDER_NAMES, available_providers

from trt_bgswap.engines.attention import TILED_ATTENTION, attention_kind, bound_attention
from trt_bgswap.engines.upsample import SUBPIXEL_UPSAMPLING, subpixel_upsampling
from trt_bgswap.engines.winograd import cache_tag as winograd_tag, winograd_convolutions
from trt_bgswap.engines.cache import CacheKey, EngineCache, onnxruntime_key
from trt_bgswap.onnx_graph import external_data_files
from trt_bgswap.engines.profiles import envelope
from trt_bgswap.runtime.trt_shapes import ShapeProfile

log = logging.getLogger(__name__)

OFFLINE_LEVELS = ("basic", "extended", "all")
ORT_PROVIDERS = ("cpu", "cuda", "tensorrt")
# The levels whose saved graph depends on the host CPU's vector ISA (NCHWc blocking).
HOST_SPECIFIC_LEVELS = ("all",)
# /proc/cpuinfo flags that change which kernels/layouts ONNX Runtime picks.
ISA_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",  # x86
    "asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2", "bf16", "i8mm",  # arm64
)  # fmt: skip

OPTIMIZED_NAME = "model.optimized.onnx"
TRT_EP_OPTIONS_NAME = "ort-tensorrt.json"
CUDA_EP_OPTIONS_NAME = "ort-cuda.json"


def onnxruntime_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def host_fingerprint(cpuinfo: str | None = None) -> str:
    """The CPU architecture and the ISA flags ONNX Runtime's kernels care about."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break
    present = [f for f in ISA_FLAGS if f in flags]
    return f"{platform.machine() or 'unknown'}:{','.join(present) or platform.processor() or 'unknown'}"


def _level(name: str) -> Any:
    import onnxruntime as ort

    return {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[name]


def optimize_offline(onnx_path: Path, out_path: Path, provider: str, level: str, external_data_name: str | None) -> None:
    """Let ONNX Runtime optimize ``onnx_path`` for ``provider`` and save the result to ``out_path``.

    With ``external_data_name`` the weights go to that file beside ``out_path``
    (needed for graphs over protobuf's 2 GB limit).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = _level(level)
    so.optimized_model_filepath = str(out_path)
    so.log_severity_level = 3
    if external_data_name is not None:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", external_data_name)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    name = PROVIDER_NAMES[provider]
    ort.InferenceSession(str(onnx_path), sess_options=so, providers=[name, PROVIDER_NAMES["cpu"]] if provider != "cpu" else [name])


def keeps_weights_mapped(model_path: Path, provider: str) -> bool:
    """Whether ONNX Runtime should run this graph's weights straight from their memory-mapped file, unpacked.

    ONNX Runtime maps external weights from their file: nothing is read at load, the pages are the
    OS file cache's (shared by every process that opens the file, given back under pressure). Its
    CPU kernels' pre-packing (``session.disable_prepacking`` unset) copies the GEMM weights into the
    heap at load instead. Measured on the full SD1.5 UNet (3.4 GB of external weights, 2 threads,
    AMD EPYC): session open 1.41 -> 0.12 s of CPU, heap after a step 1.22 -> 0.19 GB (the file-backed
    pages grow by as much), a step 6.12 vs 6.15 s (medians of 6, alternated; within this VM's
    spread), outputs within 1.4e-6. Graphs with weights inside the protobuf are copied into the heap
    anyway, and pre-packing pays there (the int8 RMBG: 1.31 s a run packed, 1.85 s unpacked), so they
    keep it. ``session.save_external_prepacked_constant_initializers`` (packed weights written to the
    file and mapped) would keep both, for a second, packed copy of the MatMul weights on disk (~1 GB);
    not worth it while the unpacked step is as fast.
    """
    return provider == "cpu" and bool(external_data_files(model_path))


def cuda_provider_options(device_id: int = 0) -> dict[str, str]:
    """CUDA EP options (ONNX Runtime docs, "CUDA Execution Provider"): exhaustive cuDNN conv search, whole workspace."""
    return {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": "EXHAUSTIVE",  # searched once per shape; the pipeline reuses shapes
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1",
        "arena_extend_strategy": "kSameAsRequested",  # no power-of-two over-allocation of large activations
    }


def _shape_list(profile: ShapeProfile, which: str) -> str:
    return ",".join(f"{t.name}:{'x'.join(str(d) for d in getattr(t, which))}" for t in profile.tensors)


def tensorrt_provider_options(
    engine_cache_dir: Path,
    timing_cache_dir: Path,
    precision: str,
    profiles: Sequence[ShapeProfile],
    opt_level: int,
    workspace_bytes: int | None,
    device_id: int = 0,
) -> dict[str, str]:
    """TensorRT EP options (ONNX Runtime docs, "TensorRT Execution Provider"), all as strings.

    The EP takes one explicit shape range per input; several static profiles
    become their envelope.
    """
    if precision not in ("fp16", "fp32"):
        raise UsageError(f"--precision {precision!r}: choose fp16 or fp32")
    p = envelope(profiles)
    opts = {
        "device_id": str(device_id),
        "trt_fp16_enable": "True" if precision == "fp16" else "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(engine_cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(timing_cache_dir),
        "trt_builder_optimization_level": str(opt_level),
        "trt_profile_min_shapes": _shape_list(p, "min"),
        "trt_profile_opt_shapes": _shape_list(p, "opt"),
        "trt_profile_max_shapes": _shape_list(p, "max"),
    }
    if workspace_bytes is not None:
        opts["trt_max_workspace_size"] = str(workspace_bytes)
    return opts


@dataclass(frozen=True)
class OrtArtifact:
    """How to open one model with ONNX Runtime: ``OrtEngine(spec, model_path, provider, provider_options, graph_optimization=...)``."""

    model: str
    provider: str  # cpu | cuda | tensorrt
    model_path: Path
    graph_optimization: str  # the level the runtime session should use when opening model_path
    provider_options: dict[str, dict[str, str]]
    cache_hit: bool
    reasons: tuple[str, ...]
    attention: str | None = None  # engines.attention.BOUNDED / MATERIALISED / None (no attention)


def ort_key(
    onnx_hash: str,
    provider: str,
    level: str,
    precision: str,
    profiles: Sequence[ShapeProfile],
    opt_level: int,
    workspace_bytes: int | None,
    ort_version: str,
    host: str,
) -> CacheKey:
    """The cache key of one model's ONNX Runtime artifact; only parts that affect it are included."""
    if provider == "cpu":
        host_part = host if level in HOST_SPECIFIC_LEVELS else "any"
        return onnxruntime_key(onnx_hash, provider, level, ort_version, host_part, extra={"attention": TILED_ATTENTION, "upsample": SUBPIXEL_UPSAMPLING, "winograd": winograd_tag()})
    if provider == "cuda":
        return onnxruntime_key(onnx_hash, provider, level, ort_version, "any")
    return onnxruntime_key(
        onnx_hash,
        provider,
        "provider",  # the TensorRT EP gets the original graph and does its own fusion
        ort_version,
        "any",
        extra={
            "precision": precision,
            "profiles": [p.to_json() for p in profiles],
            "builder": {"opt_level": opt_level, "workspace_bytes": workspace_bytes},
        },
    )


def prepare_ort_model(
    cache: EngineCache,
    model: str,
    onnx_path: Path,
    key: CacheKey,
    provider: str,
    level: str,
    precision: str,
    profiles: Sequence[ShapeProfile],
    opt_level: int,
    workspace_bytes: int | None,
) -> OrtArtifact:
    """Reuse or (re)build one model's ONNX Runtime artifact for ``provider``."""
    if provider not in ORT_PROVIDERS:
        raise UsageError(f"ONNX Runtime provider {provider!r}: choose one of {', '.join(ORT_PROVIDERS)}")
    if provider == "tensorrt":
        return _prepare_tensorrt_ep(cache, model, onnx_path, key, precision, profiles, opt_level, workspace_bytes)

    if level not in OFFLINE_LEVELS:
        raise UsageError(f"graph optimization {level!r}: choose one of {', '.join(OFFLINE_LEVELS)}")
    name = PROVIDER_NAMES[provider]
    if name not in available_providers():
        raise BackendUnavailable(
            f"ONNX Runtime here has no {name} to optimize for (has {', '.join(available_providers())}); "
            "build on the target machine with onnxruntime-gpu installed, or use --provider cpu"
        )
    options = {PROVIDER_NAMES["cuda"]: cuda_provider_options()} if provider == "cuda" else {}
    found = cache.lookup(model, OPTIMIZED_NAME, key)
    if not found.hit:
        has_external = bool(external_data_files(onnx_path))

        def write(tmp: Path) -> list[str]:
            data_name = EngineCache.companion_name(OPTIMIZED_NAME, key, ".data") if has_external else None
            log.info("%s: optimizing for ONNX Runtime %s at level %s (%s)", model, provider, level, "; ".join(found.reasons))
            with _cpu_graph(onnx_path, provider) as source:
                optimize_offline(source, tmp, provider, level, data_name)
            return [data_name] if data_name else []

        cache.store(model, OPTIMIZED_NAME, key, write)
    return OrtArtifact(model, provider, found.path, "disable", options, found.hit, found.reasons, attention_kind(onnx_path) if provider == "cpu" else None)


@contextlib.contextmanager
def _cpu_graph(onnx_path: Path, provider: str) -> Iterator[Path]:
    """The graph to optimize: on the CPU with its attention tiled (engines/attention.py), its upsampling
    convolutions on the small image (engines/upsample.py) and its wide 3x3 convolutions as Winograd
    F(2x2, 3x3) (engines/winograd.py); for other providers as exported."""
    if provider != "cpu":
        yield onnx_path
        return
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    changed = bool(bound_attention(model).tiled) | bool(subpixel_upsampling(model, onnx_path.parent))
    changed |= bool(winograd_convolutions(model, onnx_path.parent))  # after the sub-pixel rewrite, which leaves 2x2 kernels alone
    if not changed:
        yield onnx_path
        return
    with tempfile.NamedTemporaryFile(dir=onnx_path.parent, prefix=".cpu.", suffix=".onnx", delete=False) as f:
        rewritten = Path(f.name)  # beside the original: its external weights are found by relative path
    try:
        onnx.save_model(model, str(rewritten))
        yield rewritten
    finally:
        with contextlib.suppress(FileNotFoundError):
            rewritten.unlink()


def _prepare_tensorrt_ep(
    cache: EngineCache,
    model: str,
    onnx_path: Path,
    key: CacheKey,
    precision: str,
    profiles: Sequence[ShapeProfile],
    opt_level: int,
    workspace_bytes: int | None,
) -> OrtArtifact:
    """The TensorRT EP's options, stored as a cache entry; a key change empties its engine cache."""
    model_dir = cache.path(model, TRT_EP_OPTIONS_NAME).parent
    engine_dir = model_dir / "ort-trt-engines"
    timing_dir = cache.root / "ort-trt-timing"
    trt_opts = tensorrt_provider_options(engine_dir, timing_dir, precision, profiles, opt_level, workspace_bytes)
    options = {PROVIDER_NAMES["tensorrt"]: trt_opts, PROVIDER_NAMES["cuda"]: cuda_provider_options()}
    found = cache.lookup(model, TRT_EP_OPTIONS_NAME, key)
    if not found.hit:
        if engine_dir.exists():
            log.info("%s: emptying the TensorRT EP engine cache (%s)", model, "; ".join(found.reasons))
            shutil.rmtree(engine_dir)
        engine_dir.mkdir(parents=True, exist_ok=True)
        timing_dir.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> list[str]:
            tmp.write_text(json.dumps(options, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            return []

        cache.store(model, TRT_EP_OPTIONS_NAME, key, write)
    return OrtArtifact(model, "tensorrt", Path(onnx_path), "all", options, found.hit, found.reasons)
