"""``trt-bgswap build``: turn an exported folder into engines, reusing the cache when nothing changed.

For every model in the folder's manifest: optimization profiles from its I/O
spec and the requested generation sizes (:mod:`~trt_bgswap.engines.profiles`),
a cache key over everything the artifact depends on
(:mod:`~trt_bgswap.engines.cache`), then either a TensorRT plan
(:mod:`~trt_bgswap.engines.trt_build`, after the parser-compatibility check of
:mod:`~trt_bgswap.engines.onnx_check`) or ONNX Runtime's pre-optimized graph /
execution-provider options (:mod:`~trt_bgswap.engines.ort_build`). An index
file in the output folder records, per model, what to load and how.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trt_bgswap.build_index import ENGINES_DIR, ORT, TRT, IndexEntry, write_index
from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.manifest import Manifest, ModelEntry
from trt_bgswap.mixed_precision import keeps_fp32
from trt_bgswap.specs import ModelSpec

from trt_bgswap.engines.cache import CacheKey, EngineCache, onnx_graph_hash, tensorrt_key
from trt_bgswap.engines.graph_split import ensure_parts
from trt_bgswap.engines.onnx_check import check_onnx_for_tensorrt
from trt_bgswap.engines.ort_build import (
    keeps_weights_mapped,
    ORT_PROVIDERS,
    host_fingerprint,
    onnxruntime_version,
    ort_key,
    prepare_ort_model,
)
from trt_bgswap.engines.profiles import DimRange, GenerationShapes, Size, model_profiles, profile_from_ranges
from trt_bgswap.runtime.trt_shapes import ShapeProfile
from trt_bgswap.engines.trt_build import TrtBuildOptions, build_plan, tensorrt_version

log = logging.getLogger(__name__)

BACKENDS = (TRT, ORT)
PLAN_NAME = "model.plan"
FP16_GRAPH_SUFFIX = ".fp16.onnx"  # the converted graph a plan was built from, kept beside it in the cache


def model_build_options(name: str, entry: ModelEntry, options: TrtBuildOptions) -> TrtBuildOptions:
    """One model's options: the VAE keeps the precision its export gave it (fp16 VAEs overflow); the rest take ``options``."""
    if keeps_fp32(name) and (options.precision != entry.precision or options.weak_fp16):
        return dataclasses.replace(options, precision=entry.precision, weak_fp16=False)
    return options


@dataclass(frozen=True)
class BuiltModel:
    """One model's build result: what to load, how, and whether it came from the cache."""

    model: str
    backend: str  # TRT | ORT
    path: Path  # TensorRT plan, pre-optimized graph, or (TensorRT EP) the original graph
    cache_hit: bool
    reasons: tuple[str, ...]  # why it was (re)built; empty on a hit
    profiles: tuple[ShapeProfile, ...]
    provider: str | None = None  # ONNX Runtime provider key
    graph_optimization: str | None = None  # level to open ``path`` with (ONNX Runtime)
    provider_options: dict[str, dict[str, str]] | None = None
    attention: str | None = None  # engines.attention.BOUNDED / MATERIALISED; None: no attention or not known
    prepack: bool = True  # ONNX Runtime pre-packs the weights (False: runs them from the mapped file)

    def index_entry(self) -> IndexEntry:
        return IndexEntry(
            self.path, self.backend, self.provider, self.graph_optimization, self.provider_options, self.cache_hit, self.reasons,
            tuple(p.to_json() for p in self.profiles), self.attention, self.prepack,
        )


@dataclass(frozen=True)
class BuildReport:
    export_dir: Path
    out_dir: Path
    backend: str
    provider: str | None
    models: dict[str, BuiltModel]
    index_path: Path

    @property
    def rebuilt(self) -> list[str]:
        return [k for k, m in self.models.items() if not m.cache_hit]


def _shapes(manifest: Manifest, sizes: Sequence[Size], batches: Sequence[int], dynamic: tuple[Size, Size] | None) -> tuple[GenerationShapes, int]:
    cfg = manifest.inpaint
    if cfg is not None:
        default = (cfg.default_size, cfg.default_size)
        vae_scale_factor = cfg.vae_scale_factor
    else:  # an RMBG-only export: the generation size is irrelevant to its profiles
        side = manifest.rmbg.input_size[0] if manifest.rmbg else 1
        default = (side, side)
        vae_scale_factor = 1
    shapes = GenerationShapes(tuple(tuple(s) for s in (sizes or [default])), tuple(batches), dynamic)  # type: ignore[arg-type]
    if cfg is not None:
        shapes.check_multiple(cfg.size_multiple)
    return shapes, vae_scale_factor


def _extra_dims(manifest: Manifest, spec: ModelSpec) -> dict[str, int]:
    """Symbols that do not follow the generation size: RMBG's input side ``S`` comes from its config."""
    if "S" in spec.symbols():
        if manifest.rmbg is None:
            raise ModelError(f"{spec.name}: its spec has a dynamic side S but the manifest has no rmbg config; re-run `trt-bgswap export`")
        return {"S": manifest.rmbg.input_size[0]}
    return {}


# rmbg_full (export --device-graphs) takes photos at their own size PH x PW: one dynamic profile over photo
# sides, tuned for 1024; TensorRT sizes its scratch memory for the max (about 0.5 GB at 4096 x 4096).
PHOTO_DIMS = ("PH", "PW")
PHOTO_SIDE = DimRange(1, 1024, 4096)


def photo_profiles(spec: ModelSpec) -> list[ShapeProfile] | None:
    """The profile of a model that takes photos as they are (batch 1), or None for the generation-size models."""
    if not set(PHOTO_DIMS) <= set(spec.symbols()):
        return None
    return [profile_from_ranges(spec, {s: PHOTO_SIDE if s in PHOTO_DIMS else DimRange.fixed(1) for s in spec.symbols()})]


def _trt_model(
    cache: EngineCache,
    name: str,
    onnx_path: Path,
    spec: ModelSpec,
    key: CacheKey,
    profiles: Sequence[ShapeProfile],
    options: TrtBuildOptions,
    timing_cache: Path,
    check: bool,
) -> BuiltModel:
    found = cache.lookup(name, PLAN_NAME, key)
    if not found.hit:
        log.info("%s: building a TensorRT plan (%s)", name, "; ".join(found.reasons))
        if check:
            check_onnx_for_tensorrt(onnx_path, spec).raise_for_errors()

        def write(tmp: Path) -> list[str]:
            fp16_graph = tmp.parent / EngineCache.companion_name(PLAN_NAME, key, FP16_GRAPH_SUFFIX)
            build_plan(onnx_path, tmp, profiles, options, timing_cache if options.timing_cache else None, name, name, fp16_graph)
            return [f.name for f in (fp16_graph, fp16_graph.with_name(fp16_graph.name + ".data")) if f.is_file()]

        cache.store(name, PLAN_NAME, key, write)
    return BuiltModel(name, "trt", found.path, found.hit, found.reasons, tuple(profiles))


def build_engines(
    export_dir: str | Path,
    backend: str = "ort",
    precision: str | None = None,
    sizes: Sequence[Size] = (),
    dynamic: tuple[Size, Size] | None = None,
    batches: Sequence[int] = (1,),
    opt_level: int = 3,
    workspace_mb: int | None = None,
    tf32: bool = True,
    provider: str = "cpu",
    graph_optimization: str = "all",
    models: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    check: bool = True,
    device: int = 0,
    weak_fp16: bool = False,
) -> BuildReport:
    """Build (or reuse from the cache) engines for every model of an exported folder.

    - ``backend``: ``"trt"`` (TensorRT plans; needs ``tensorrt`` and a GPU) or
      ``"ort"`` (ONNX Runtime artifacts for ``provider``: ``cpu`` / ``cuda``
      pre-optimized graphs at ``graph_optimization`` level, or ``tensorrt`` EP options).
    - ``precision``: ``fp16``/``fp32`` for TensorRT (default fp16): strongly typed engines of the
      graphs as exported, an fp32 graph converted to fp16 with fp32 islands first
      (:mod:`trt_bgswap.mixed_precision`); the VAE keeps its export's precision. ``weak_fp16``:
      TensorRT 10.x's deprecated weakly typed FP16 instead. Ignored by the CPU/CUDA providers,
      which run the graph's own precision.
    - ``sizes``: generation sizes (width, height); default the model's native size.
      Each gets a static profile unless ``dynamic`` = ((min_w, min_h), (max_w, max_h)).
    - ``batches``: UNet batch sizes to serve (add 2 for classifier-free guidance).
    - ``opt_level`` (0-5), ``workspace_mb``, ``tf32``: TensorRT builder options.
    - ``models``: a subset of the manifest's models; ``out_dir``: where the
      cache lives (default ``<export_dir>/engines``); ``check``: run the
      TensorRT-parser compatibility check before TensorRT builds.

    Returns a :class:`BuildReport`; an index JSON in ``out_dir`` records per
    model the file to load, its profiles and options.
    """
    export_dir = Path(export_dir)
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: build supports {', '.join(BACKENDS)}")
    if backend == "ort" and provider not in ORT_PROVIDERS:
        raise UsageError(f"--provider {provider!r}: choose one of {', '.join(ORT_PROVIDERS)}")
    manifest = Manifest.load(export_dir)
    names = list(models) if models else list(manifest.models)
    unknown = [n for n in names if n not in manifest.models]
    if unknown:
        raise UsageError(f"models {unknown} are not in {export_dir} (has {sorted(manifest.models)})")
    shapes, vae_scale_factor = _shapes(manifest, sizes, batches, dynamic)
    out = Path(out_dir) if out_dir is not None else export_dir / ENGINES_DIR
    cache = EngineCache(out)
    workspace = workspace_mb * (1 << 20) if workspace_mb is not None else None
    trt_precision = precision or "fp16"

    if backend == "trt":
        options = TrtBuildOptions(precision=trt_precision, opt_level=opt_level, workspace_bytes=workspace, tf32=tf32, weak_fp16=weak_fp16)
        from trt_bgswap.runtime.cuda_device import compute_capability

        trt_version = tensorrt_version()
        cc = compute_capability(device)
        timing_cache = out / f"timing-trt{trt_version}-sm{cc.replace('.', '')}.cache"
        log.info("TensorRT %s on a compute-capability %s GPU", trt_version, cc)
    else:
        if precision is not None and provider != "tensorrt" and precision != manifest.precision:
            log.warning("--precision %s applies to TensorRT only; ONNX Runtime %s runs the graphs' own %s", precision, provider, manifest.precision)
        ort_version = onnxruntime_version()
        host = host_fingerprint()

    built: dict[str, BuiltModel] = {}
    for name in names:
        entry = manifest.models[name]
        onnx_path = manifest.model_path(export_dir, name)
        profiles = photo_profiles(entry.spec) or model_profiles(entry.spec, shapes, vae_scale_factor, _extra_dims(manifest, entry.spec))
        graph_hash = onnx_graph_hash(onnx_path)
        if backend == "trt":
            own = model_build_options(name, entry, options)
            key = tensorrt_key(graph_hash, own.precision, [p.to_json() for p in profiles], own.key_parts(), trt_version, cc)
            built[name] = _trt_model(cache, name, onnx_path, entry.spec, key, profiles, own, timing_cache, check)
        else:
            key = ort_key(graph_hash, provider, graph_optimization, trt_precision, profiles, opt_level, workspace, ort_version, host)
            art = prepare_ort_model(cache, name, onnx_path, key, provider, graph_optimization, trt_precision, profiles, opt_level, workspace)
            built[name] = BuiltModel(
                name, "ort", art.model_path, art.cache_hit, art.reasons, tuple(profiles), art.provider, art.graph_optimization, art.provider_options,
                art.attention, not keeps_weights_mapped(art.model_path, art.provider),
            )  # fmt: skip

    if backend == ORT and provider == "cpu":
        ensure_parts([m.path for m in built.values()])  # --low-memory runs the UNet part by part
    index = write_index(out, backend, provider if backend == ORT else None, {k: m.index_entry() for k, m in built.items()})
    hits = sum(m.cache_hit for m in built.values())
    log.info("build %s: %d model(s), %d reused from the cache, %d built; index %s", backend, len(built), hits, len(built) - hits, index)
    return BuildReport(export_dir, out, backend, provider if backend == "ort" else None, built, index)
