"""Dynamic batching: several requests through each stage in one engine call, each result as if run alone.

The server (``trt_bgswap.server``) collects requests that wait together and hands them here. This
module sits on the :class:`~trt_bgswap.runtime.pipeline.Pipeline`'s public stage methods
(``mask``/``masker``, ``text_embeddings``, ``encode_masked_image``, ``unet``, ``decode``,
``generation_size_for``, ``scheduler``) and restates only the one thing a batch changes: the
denoising loop with the UNet batch stacked. The interface, for the restructured runtime (issue 9):

- :func:`mask_batch` ``(pipe, images) -> alphas``: RMBG for several sRGB photos in one engine call
  (the masker's ``predict_batch``; RMBG resizes every photo to its fixed input side, so any photos
  batch together).
- :class:`GenerationJob`: one replace with a prompt whose subject alpha is already known (RMBG's,
  the caller's mask, or the photo's own transparency).
- :func:`generation_key` ``(pipe, job) -> (width, height, steps, guidance)``: jobs with equal keys
  have equal latent shapes and schedules and may share a batch.
- :func:`replace_batch` ``(pipe, jobs) -> [Result]``: per job the host preparation of
  ``Pipeline.inpaint``; then the VAE encoder on the stacked masked images, the LCM loop with the
  UNet on the stacked batch (B rows, or 2B with guidance: ``[uncond_1..B, cond_1..B]``, each row
  with its own prompt), the decoder per image and the composite per job.
- :func:`can_batch_generation`: only the host loop over the plain UNet graph stacks; the fused
  step graph and the TensorRT device loop run the jobs one by one (same results, no batching).

**Exactness.** A row of a batched engine call equals the same input run alone only if the
backend's kernels compute each sample independently of the others (ONNX Runtime's CPU
convolutions and GEMMs do: the batch is an outer loop or extra GEMM rows, the reduction order
per output is the same; cuDNN/cuBLAS and TensorRT may pick another algorithm per batch size).
The guidance mix and the LCM step are elementwise float32 numpy (dynamic thresholding is per
sample). :func:`batching_is_exact` checks it on the loaded engines with real inputs, so a
server batches only where the results are bit-identical on this machine and backend.

Not thread-safe on one pipeline (the scheduler and engine buffers are shared): call from one
thread, as the server's batch worker does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.color_management import ColorSpace
from trt_bgswap.runtime.composite import composite, resize_mask_for_model, resize_rgb_for_model, upscale_background
from trt_bgswap.runtime.mask_ops import MaskOptions, inpaint_mask, refine_alpha
from trt_bgswap.runtime.pipeline import GenerationOptions, Noise, Pipeline, Result
from trt_bgswap.runtime.resize import resize_nearest
from trt_bgswap.specs import pipeline_dims

log = logging.getLogger(__name__)

GenerationKey = tuple[int, int, int, float]  # (width, height, steps, guidance)


@dataclass(frozen=True)
class GenerationJob:
    """One replace with a generated background; ``options.seed`` must be set (the batch draws no seeds)."""

    rgb: np.ndarray  # uint8 HxWx3 in the photo's colour space
    alpha: np.ndarray  # float32 HxW: the subject's alpha before refinement
    options: GenerationOptions
    mask_options: MaskOptions = MaskOptions()
    color_space: ColorSpace | None = None


@dataclass
class _Prepared:
    """A job's host-side inputs at its generation size (what Pipeline.inpaint computes before the engines)."""

    model_rgb: np.ndarray
    alpha: np.ndarray  # refined compositing alpha
    repaint: np.ndarray  # uint8, 255 = repaint
    masked: np.ndarray  # (1, 3, H, W) in [-1, 1], the subject blanked
    latent_mask: np.ndarray  # (1, 1, h, w) binary
    noise: Noise
    cond: np.ndarray  # (1, S, D)
    uncond: np.ndarray | None  # (1, S, D) with guidance, else None


def can_batch_generation(pipe: Pipeline) -> bool:
    """Whether the UNet loop can run stacked: the host loop over the plain UNet graph."""
    return pipe.step_loop is None and pipe.device_chain is None and "unet" in pipe.engines and "unet_step" not in pipe.engines


def mask_batch(pipe: Pipeline, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """RMBG's soft alpha for several sRGB uint8 photos, one engine call where the masker allows."""
    if len(images) <= 1 or pipe.masker is None or "rmbg_full" in pipe.engines:
        return [pipe.mask(im) for im in images]  # the device graph takes photos at their own size: one by one
    return pipe.masker.predict_batch(list(images))


def generation_key(pipe: Pipeline, job: GenerationJob) -> GenerationKey:
    """Jobs with the same key have the same latent shape and schedule, so their UNet calls stack."""
    width, height = pipe.generation_size_for(job.rgb.shape[1], job.rgb.shape[0], job.options)
    return (width, height, job.options.steps, job.options.guidance)


def _prepare(pipe: Pipeline, job: GenerationJob, size: tuple[int, int]) -> _Prepared:
    cfg = pipe.config
    assert cfg is not None
    options = job.options
    if options.seed is None:
        raise UsageError("GenerationJob.options.seed is None: a batch job needs its seed set")
    cs = job.color_space or ColorSpace()
    model_rgb = cs.to_srgb(job.rgb)
    alpha = refine_alpha(job.alpha, job.mask_options)
    repaint = inpaint_mask(alpha, job.mask_options)
    width, height = size
    dims = pipeline_dims(1, height, width, cfg.vae_scale_factor)
    noise = Noise.from_seed(options.seed, (1, cfg.latent_channels, dims["h"], dims["w"]), options.steps)
    image = resize_rgb_for_model(model_rgb, width, height)
    mask = resize_mask_for_model(repaint, width, height)
    guided = options.guidance > 1.0
    return _Prepared(
        model_rgb=model_rgb,
        alpha=alpha,
        repaint=repaint,
        masked=image * (mask < 0.5),
        latent_mask=resize_nearest(mask, (dims["h"], dims["w"])),
        noise=noise,
        cond=pipe.text_embeddings(options.prompt),
        uncond=pipe.text_embeddings(options.negative_prompt) if guided else None,
    )


def _denoise_stacked(pipe: Pipeline, preps: Sequence[_Prepared], masked_latents: np.ndarray, guidance: float) -> np.ndarray:
    """The LCM loop of ``Pipeline._denoise`` over B stacked jobs (2B UNet rows with guidance)."""
    sched = pipe.scheduler
    assert sched is not None
    guided = preps[0].uncond is not None
    latents = np.concatenate([p.noise.latents for p in preps]).astype(np.float32) * np.float32(sched.init_noise_sigma)
    latent_mask = np.concatenate([p.latent_mask for p in preps])
    embeddings = np.concatenate([p.cond for p in preps])
    if guided:  # diffusers' order [uncond, cond], per half of the batch
        embeddings = np.concatenate([np.concatenate([p.uncond for p in preps if p.uncond is not None]), embeddings])
        latent_mask = np.concatenate([latent_mask] * 2)
        masked_latents = np.concatenate([masked_latents] * 2)
    b = len(preps)
    timesteps = list(sched.timesteps)
    for i, t in enumerate(timesteps):
        x = np.concatenate([latents] * 2) if guided else latents
        eps = pipe.unet(np.concatenate([x, latent_mask, masked_latents], axis=1), float(t), embeddings)
        if guided:
            uncond, text = eps[:b], eps[b:]
            eps = uncond + np.float32(guidance) * (text - uncond)
        step_noise = np.concatenate([p.noise.steps[i] for p in preps]) if i < len(timesteps) - 1 else None
        latents, _ = sched.step(eps, int(t), latents, noise=step_noise)
    return latents


def replace_batch(pipe: Pipeline, jobs: Sequence[GenerationJob]) -> list[Result]:
    """``pipe.replace(job.rgb, job.options, job.mask_options, alpha=job.alpha, color_space=...)`` for every job, stacked.

    All jobs must share one :func:`generation_key`; a pipeline that cannot stack runs them one by one.
    """
    if not jobs:
        return []
    if len(jobs) == 1 or not can_batch_generation(pipe):
        return [pipe.replace(j.rgb, j.options, j.mask_options, alpha=j.alpha, color_space=j.color_space) for j in jobs]
    keys = {generation_key(pipe, j) for j in jobs}
    if len(keys) != 1:
        raise UsageError(f"replace_batch: jobs of different sizes/steps/guidance {sorted(keys)}; group them by generation_key")
    width, height, steps, guidance = keys.pop()
    for job in jobs:
        job.options.validate()
        if job.alpha.shape != job.rgb.shape[:2]:
            raise UsageError(f"mask is {job.alpha.shape[1]}x{job.alpha.shape[0]} but the image is {job.rgb.shape[1]}x{job.rgb.shape[0]}; give a mask of the image's size")
    preps = [_prepare(pipe, j, (width, height)) for j in jobs]
    assert pipe.scheduler is not None
    pipe.scheduler.set_timesteps(steps)
    masked_latents = pipe.encode_masked_image(np.concatenate([p.masked for p in preps]), np.concatenate([p.noise.posterior for p in preps]))
    latents = _denoise_stacked(pipe, preps, masked_latents, guidance)
    results = []
    for job, prep, z in zip(jobs, preps, latents):
        generated = pipe.decode(z[None])
        h, w = job.rgb.shape[:2]
        background = (job.color_space or ColorSpace()).from_srgb(upscale_background(generated, w, h))
        out = composite(job.rgb, background, prep.alpha)
        results.append(Result(out, prep.alpha, prep.repaint, generated, job.options.seed, (width, height), pipe.backends()))
    return results


def batching_is_exact(pipe: Pipeline, photos: Sequence[np.ndarray], prompt: str, steps: int = 1) -> dict[str, bool]:
    """Whether a batch of these sRGB photos equals each run alone, bit for bit, per stage (``mask``, ``generate``).

    Run at warm-up on the loaded engines: the answer depends on the backend's kernels, so it is
    measured on this machine rather than assumed.
    """
    exact: dict[str, bool] = {}
    if pipe.can_mask and len(photos) > 1:
        alone = [pipe.mask(p) for p in photos]
        exact["mask"] = all(np.array_equal(a, b) for a, b in zip(alone, mask_batch(pipe, photos)))
    if pipe.config is not None and can_batch_generation(pipe) and len(photos) > 1:
        size = (pipe.config.size_multiple, pipe.config.size_multiple)
        jobs = [
            GenerationJob(p, np.zeros(p.shape[:2], np.float32), GenerationOptions(prompt=f"{prompt} {i}", steps=steps, guidance=guidance, seed=i, size=size))
            for guidance in (1.0, 1.5)  # the plain and the guided (2B rows) batch
            for i, p in enumerate(photos)
        ]
        same = True
        for group in (jobs[: len(photos)], jobs[len(photos) :]):
            batch = replace_batch(pipe, group)
            same &= all(np.array_equal(pipe.replace(j.rgb, j.options, j.mask_options, alpha=j.alpha).image, r.image) for j, r in zip(group, batch))
        exact["generate"] = same
    return exact
