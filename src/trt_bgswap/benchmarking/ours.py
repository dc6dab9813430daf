"""Timing trt-bgswap's own pipeline: every stage inside real end-to-end runs, plus isolated pre/post steps.

Runs in its own process (see :mod:`trt_bgswap.benchmarking.worker`) so its peak RSS is its
own. Stage times come from :class:`~trt_bgswap.benchmarking.timed_engine.TimedEngine`
wrappers around the engines the pipeline calls; each end-to-end run uses a new prompt so
the prompt cache never hides the text encoder (a repeated prompt skips it entirely; the
saving is reported separately as ``text_encoder_cached``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trt_bgswap.manifest import Manifest
from trt_bgswap.runtime.compose import compose
from trt_bgswap.runtime.composite import upscale_background
from trt_bgswap.runtime.preprocess import resize_mask_for_model, resize_rgb_for_model
from trt_bgswap.runtime.engine import Engine
from trt_bgswap.runtime.mask_ops import MaskOptions, inpaint_mask, refine_alpha
from trt_bgswap.runtime.masker import Masker
from trt_bgswap.runtime.ort_backend import OrtEngine
from trt_bgswap.runtime.pipeline import GenerationOptions, Noise, Pipeline
from trt_bgswap.runtime.tokenizer import ClipTokenizer
from trt_bgswap.specs import pipeline_dims

from trt_bgswap.benchmarking.machine import current_rss_bytes, device_memory_used
from trt_bgswap.benchmarking.peak_memory import StagePeaks
from trt_bgswap.benchmarking.photos import load_photo
from trt_bgswap.benchmarking.stats import StageClock, Stats, non_model_stats, stage_stats, time_calls, time_runs
from trt_bgswap.benchmarking.timed_engine import TimedEngine

log = logging.getLogger(__name__)

STAGE_OF = {"text_encoder_2": "text_encoder"}  # SDXL: both encoders are the text stage (as the baseline counts them)


def _engine(spec: Any, plan: Mapping[str, Any], provider: str, threads: int) -> Engine:
    """An engine for one model as the build index describes it (ONNX Runtime graph or TensorRT plan)."""
    path = Path(plan["path"])
    if plan.get("backend") == "trt":
        from trt_bgswap.runtime.trt_backend import TrtEngine

        return TrtEngine(spec, path)
    return OrtEngine(
        spec, path, provider=provider, intra_op_threads=threads, graph_optimization=plan.get("graph_optimization") or "all",
        provider_options=plan.get("provider_options") or None, prepack=bool(plan.get("prepack", True)),
    )  # fmt: skip


def measure_ours(job: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ours`` worker: load, warm up, time end-to-end runs by stage, pre/post, batches, int8."""
    export_dir = Path(job["export_dir"])
    threads, provider = int(job["threads"]), str(job["provider"])
    warmup, runs, steps = int(job["warmup"]), int(job["runs"]), int(job["steps"])
    manifest = Manifest.load(export_dir)
    assert manifest.inpaint is not None and manifest.rmbg is not None
    cfg = manifest.inpaint
    rgb = load_photo(job["photo"])
    result: dict[str, Any] = {"rss_start": current_rss_bytes()}

    clock = StageClock()
    peaks = StagePeaks()
    t0 = time.perf_counter()
    engines: dict[str, TimedEngine] = {}
    low_memory = bool(job.get("low_memory"))
    for name, entry in manifest.models.items():
        engines[name] = TimedEngine(_engine(entry.spec, job["engines"][name], provider, threads), STAGE_OF.get(name, name), clock, peaks)
        if not low_memory:  # --low-memory opens each session when its stage runs (the stage's time and peak include it)
            engines[name].load()
    tokenizer = ClipTokenizer.from_dir(export_dir / cfg.tokenizer_dir)
    tokenizer_2 = ClipTokenizer.from_dir(export_dir / cfg.tokenizer_2_dir) if cfg.tokenizer_2_dir else None  # SDXL
    pipeline = Pipeline.from_engines(manifest, engines, tokenizer, low_memory=low_memory, tokenizer_2=tokenizer_2)
    masker = pipeline.stages.masker
    assert isinstance(masker, Masker), "the benchmark times RMBG's host pre/post-processing"
    result["load_seconds"] = time.perf_counter() - t0
    result["rss_after_load"] = current_rss_bytes()
    result["device_memory_after_load"] = device_memory_used()  # None on CPU
    result["backends"] = pipeline.backends()

    width, height = job["size"]
    dims = pipeline_dims(1, height, width, cfg.vae_scale_factor)
    shape = (1, cfg.latent_channels, dims["h"], dims["w"])
    noise = Noise.from_seed(0, shape, steps)

    def e2e(i: int) -> None:
        options = GenerationOptions(f"{job['prompt']} {i}", steps=steps, guidance=float(job["guidance"]), seed=0, size=(width, height))
        pipeline.replace(rgb, options, noise=noise)

    samples, every = time_runs(clock, e2e, warmup, runs)  # every: the first request after load vs the next ones
    result["e2e"] = Stats.of(samples).to_json()
    result["requests_in_order"] = every
    result["stage_memory"] = peaks.to_json()  # the end-to-end runs only
    if pipeline.stages.residency is not None:
        result["session_opens"] = pipeline.stages.residency.loads
    for engine in engines.values():
        engine.peaks = None
    result["stages"], result["unet_steps"] = stage_stats(clock.runs, steps)
    result["non_model"] = non_model_stats(samples, clock.runs)
    clock.enabled = False

    # the prompt cache: the same prompt again skips the text encoder
    t = time.perf_counter()
    pipeline.text_embeddings(f"{job['prompt']} 0")
    result["text_encoder_cached"] = time.perf_counter() - t

    result["prepost"] = _prepost(pipeline, masker, rgb, (width, height), steps, warmup, runs)
    # the pipeline's peak: before the batch-throughput runs and the fp32-RMBG comparison add their own memory
    result["peak_rss"] = peaks.peak()
    result["device_memory_after_runs"] = device_memory_used()  # a lower bound of the device peak; None on CPU
    if not job.get("extras", True):
        return result
    result["throughput"] = _throughput(pipeline, masker, rgb, dims, job, samples)
    if job.get("rmbg_fp32"):
        result["rmbg_fp32"] = _rmbg_fp32(manifest, masker, job, provider, threads, warmup, runs)
    if job.get("unfused"):
        result["unfused"] = _unfused(pipeline, manifest, job, provider, threads, dims)
    result["peak_rss_end"] = peaks.peak()  # including batch-2 runs and the extra comparison sessions
    return result


def _prepost(pipeline: Pipeline, masker: Masker, rgb: np.ndarray, size: tuple[int, int], steps: int, warmup: int, runs: int) -> dict[str, Any]:
    """The numpy work around the models, each step timed on its own."""
    width, height = size
    h, w = rgb.shape[:2]
    s = masker.cfg.input_size
    net_mask = np.random.default_rng(0).random(s, dtype=np.float32)
    alpha = masker.postprocess(net_mask.copy(), h, w)
    mask_options = MaskOptions()
    refined = refine_alpha(alpha, mask_options)
    repaint = inpaint_mask(refined, mask_options)
    generated = np.random.default_rng(1).random((height, width, 3), dtype=np.float32)
    sched = pipeline.scheduler
    assert sched is not None and pipeline.config is not None
    cfg = pipeline.config
    lat = np.random.default_rng(2).standard_normal((1, cfg.latent_channels, height // cfg.vae_scale_factor, width // cfg.vae_scale_factor), dtype=np.float32)

    def scheduler_steps() -> None:
        sched.set_timesteps(steps)
        x = lat
        timesteps = list(sched.timesteps)
        for i, t in enumerate(timesteps):
            x, _ = sched.step(lat, int(t), x, noise=lat if i < len(timesteps) - 1 else None)

    steps_fns = {
        "rmbg_preprocess": lambda: masker.preprocess(rgb),
        "rmbg_postprocess": lambda: masker.postprocess(net_mask.copy(), h, w),
        "mask_refine": lambda: inpaint_mask(refine_alpha(alpha, mask_options), mask_options),
        "inpaint_inputs": lambda: (resize_rgb_for_model(rgb, width, height), resize_mask_for_model(repaint, width, height)),
        "scheduler_steps": scheduler_steps,
        "composite": lambda: compose(rgb, upscale_background(generated, w, h), refined)[0],  # the product's composite (default options)
    }
    return {name: time_calls(fn, warmup, runs).to_json() for name, fn in steps_fns.items()}


def _throughput(pipeline: Pipeline, masker: Masker, rgb: np.ndarray, dims: Mapping[str, int], job: Mapping[str, Any], e2e_samples: list[float]) -> dict[str, Any]:
    """Images per second: whole pipeline (sequential), RMBG and the UNet at each batch size."""
    out: dict[str, Any] = {"e2e_images_per_s": 1.0 / float(np.median(e2e_samples))}
    runs = max(1, min(int(job["runs"]), 2))
    cfg = pipeline.config
    assert cfg is not None
    unet = pipeline.engines["unet"]
    cond = pipeline.conditioning(job["prompt"], (dims["w"] * cfg.vae_scale_factor, dims["h"] * cfg.vae_scale_factor))  # + SDXL's added conditions
    rng = np.random.default_rng(0)
    for b in job["batch_sizes"]:
        x = masker.preprocess(rgb)[None].repeat(b, axis=0)
        st = time_calls(lambda: masker.run(x), 1, runs)
        sample = rng.standard_normal((b, cfg.unet_in_channels, dims["h"], dims["w"]), dtype=np.float32)
        e = np.repeat(cond.hidden, b, axis=0)
        added = {k: np.repeat(v, b, axis=0) for k, v in cond.added.items()}
        su = time_calls(lambda: unet(sample=sample, timestep=np.full((b,), 500.0, np.float32), encoder_hidden_states=e, **added), 1, runs)
        out[f"batch{b}"] = {
            "rmbg": st.to_json(), "rmbg_images_per_s": b / st.median,
            "unet": su.to_json(), "unet_samples_per_s": b / su.median,
        }  # fmt: skip
    return out


def _rmbg_fp32(manifest: Manifest, masker: Masker, job: Mapping[str, Any], provider: str, threads: int, warmup: int, runs: int) -> dict[str, Any]:
    """The fp32 RMBG graph next to the one the pipeline ran (int8): model time and mask agreement."""
    from trt_bgswap.engines.quantize import mask_agreement

    entry = manifest.models["rmbg"]
    assert manifest.rmbg is not None
    fp32 = Masker(_engine(entry.spec, job["rmbg_fp32"], provider, threads), manifest.rmbg)
    fp32.engine.load()
    x = fp32.preprocess(load_photo(job["photo"]))[None]
    out: dict[str, Any] = {
        "model": time_calls(lambda: fp32.run(x), warmup, runs).to_json(),
        "pipeline_model": time_calls(lambda: masker.run(x), warmup, runs).to_json(),  # the graph the pipeline runs (int8)
    }
    agreement = {}
    for name in job["accuracy_photos"]:
        im = load_photo(name)
        agreement[name] = mask_agreement(fp32.predict(im), masker.predict(im))
    out["agreement"] = agreement
    out["mean_iou"] = float(np.mean([a["iou"] for a in agreement.values()]))
    out["mean_mae"] = float(np.mean([a["mae"] for a in agreement.values()]))
    return out


def _unfused(pipeline: Pipeline, manifest: Manifest, job: Mapping[str, Any], provider: str, threads: int, dims: Mapping[str, int]) -> dict[str, Any]:
    """The fused graphs next to the exported ones (ONNX Runtime's own optimizations only), same inputs.

    A speed-up claimed for the transformer fusions is measured here, not assumed.
    """
    from trt_bgswap.engines.parity import random_feeds

    runs = max(1, min(int(job["runs"]), 2))
    out: dict[str, Any] = {}
    for name, plan in job["unfused"].items():
        entry = manifest.models[name]
        feeds = random_feeds(entry.spec, dims)
        fused = pipeline.engines[name]
        plain = _engine(entry.spec, plan, provider, threads)
        t0 = time.perf_counter()
        plain.load()
        load = time.perf_counter() - t0
        out[name] = {
            "fused": time_calls(lambda: fused(**feeds), 1, runs).to_json(),
            "unfused": time_calls(lambda: plain(**feeds), 1, runs).to_json(),
            "unfused_session_load": load,
        }
        plain.unload()
    return out
