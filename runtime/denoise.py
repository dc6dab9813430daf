"""The LCM denoising loop: one stage interface, three ways to run it (chosen once, at load).

Every denoiser takes the pipeline's scheduler (``set_timesteps`` already called) and one
generation's :class:`DenoiseInputs`, and returns the final (1, C, h, w) latents:

- :class:`HostDenoiser`: the UNet graph per step, classifier-free guidance and the LCM step
  (:meth:`LCMScheduler.step`) in numpy, exactly diffusers' ``StableDiffusionInpaintPipeline``
  loop with ``LCMScheduler`` (batch order [uncond, cond]); the parity reference;
- :class:`FusedStepDenoiser`: the fused ``unet_step`` graph (:mod:`trt_bgswap.export.unet_step`:
  channel concat, UNet, guidance and :func:`~trt_bgswap.runtime.scheduler.lcm_step`'s arithmetic
  in one graph), the step's six coefficients and timestep as inputs, as StreamDiffusion
  (arXiv:2312.12491) keeps the scheduler on the device; the host only picks the row and the
  noise per step, on any engine;
- :class:`trt_bgswap.runtime.trt_loop.TrtStepLoop`: the same fused graph kept on the GPU.

On the final step the coefficients give ``prev_latents == denoised`` (``sqrt_alpha_prod_prev = 1``,
``sqrt_beta_prod_prev = 0``), so the fused graph has no branch; its noise input is then zeros.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.runtime.engine import Engine, EngineStage
from trt_bgswap.runtime.scheduler import LCMCoefficients, LCMConfig, LCMScheduler
from trt_bgswap.specs import UNET_STEP, StepIO, UnetIO

log = logging.getLogger(__name__)

STEP_PREDICTION_TYPE = "epsilon"  # the parameterisation the fused graph implements
GUIDED_BATCH = 2  # classifier-free guidance: embeddings batch [uncond, cond]


def check_step_scheduler(config: LCMConfig) -> None:
    """Refuse scheduler settings the fused graph does not implement (it has no prediction-type branch)."""
    if config.prediction_type != STEP_PREDICTION_TYPE:
        raise ModelError(
            f"scheduler prediction_type={config.prediction_type!r}: the fused UNet-step graph implements "
            f"{STEP_PREDICTION_TYPE!r} only; use the separate UNet graph (the default pipeline) for this model"
        )
    if config.clip_sample or config.thresholding:
        raise ModelError(
            f"scheduler clip_sample={config.clip_sample}, thresholding={config.thresholding}: the fused UNet-step "
            "graph does neither; use the separate UNet graph (the default pipeline) for this model"
        )


def check_step_noise(name: str, arrays: Sequence[np.ndarray], steps: int, shape: tuple[int, ...]) -> None:
    """``steps - 1`` noise arrays (one after every non-final step), each of the latents' ``shape``."""
    if len(arrays) < steps - 1:
        raise UsageError(f"{name} has {len(arrays)} arrays; {steps} steps need {steps - 1}")
    for i, arr in enumerate(arrays[: steps - 1]):
        if arr.shape != shape:
            raise UsageError(f"{name}[{i}] has shape {arr.shape}; it must match the latents {shape}")


@dataclass(frozen=True)
class DenoiseInputs:
    """Everything one denoising loop reads, on the host: N generations of one shape, schedule and guidance."""

    latents: np.ndarray  # (N, C, h, w) initial latents, already multiplied by init_noise_sigma
    step_noise: tuple[np.ndarray, ...]  # (N, C, h, w) each: noise injected after every non-final step
    mask: np.ndarray  # (N, 1, h, w) latent-size inpainting masks (1 = repaint)
    masked_image_latents: np.ndarray  # (N, C, h, w) scaled VAE latents of the masked images
    embeddings: np.ndarray  # (N, S, D) [cond], or (2N, S, D) [uncond_1..N, cond_1..N] for guidance
    guidance: float  # classifier-free guidance scale; has no effect without the uncond rows
    added: Mapping[str, np.ndarray] = field(default_factory=dict)  # the UNet's added conditions (SDXL), rows as embeddings

    @property
    def rows(self) -> int:
        return self.latents.shape[0]

    @property
    def guided(self) -> bool:
        return self.embeddings.shape[0] == GUIDED_BATCH * self.rows

    def check(self, steps: int, max_rows: int | None = None) -> None:
        """Shapes agree with each other and with the number of steps (the spec checks them against the graph)."""
        shape = self.latents.shape
        if len(shape) != 4 or shape[0] < 1:
            raise UsageError(f"latents have shape {shape}; the loop takes (N, C, h, w) samples")
        if max_rows is not None and shape[0] > max_rows:
            raise UsageError(f"{shape[0]} generations in one loop; this denoiser runs {max_rows} at a time")
        for name, arr, want in (
            ("masked_image_latents", self.masked_image_latents, shape),
            ("mask", self.mask, (shape[0], 1, *shape[2:])),
        ):
            if arr.shape != want:
                raise UsageError(f"{name} has shape {arr.shape}; with latents {shape} it must be {want}")
        if steps < 1:
            raise UsageError(f"steps={steps}: the loop needs at least one step")
        check_step_noise("step_noise", self.step_noise, steps, shape)
        if self.embeddings.ndim != 3 or self.embeddings.shape[0] not in (shape[0], GUIDED_BATCH * shape[0]):
            raise UsageError(
                f"embeddings have shape {self.embeddings.shape} for {shape[0]} generation(s); pass (N, S, D) [cond] "
                "or (2N, S, D) [uncond, cond] for guidance"
            )
        if not math.isfinite(self.guidance):
            raise UsageError(f"guidance={self.guidance}: must be a finite number")
        for name, arr in self.added.items():
            if arr.ndim < 1 or arr.shape[0] != self.embeddings.shape[0]:
                raise UsageError(f"added condition {name} has shape {arr.shape}; it needs one row per embeddings row ({self.embeddings.shape[0]})")


class Denoiser(Protocol):
    """The denoising stage: the whole schedule, from initial to final latents."""

    max_rows: int | None  # generations one loop can run together (None: any)

    @property
    def backend(self) -> str: ...

    def denoise(self, scheduler: LCMScheduler, inputs: DenoiseInputs) -> np.ndarray: ...

    def close(self) -> None: ...


def cast_for(engine: Engine, name: str, arr: np.ndarray) -> np.ndarray:
    """Feed an array in the dtype the graph declares (fp16 graphs may take fp16 inputs)."""
    return np.ascontiguousarray(arr, dtype=engine.spec.tensor(name).np_dtype)


class HostDenoiser(EngineStage):
    """The UNet per step; guidance and the LCM step in numpy (the diffusers parity reference).

    N generations stack into one UNet call of N rows (2N with guidance: all uncond rows, then all
    cond rows, diffusers' [uncond, cond] order per generation); the LCM step is element-wise.
    """

    max_rows = None

    def unet(self, sample: np.ndarray, timestep: float, embeddings: np.ndarray, added: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """One UNet call; ``added`` are the added conditions (SDXL's text_embeds, time_ids) by input name."""
        e = self.engine
        feeds = {
            UnetIO.SAMPLE: cast_for(e, UnetIO.SAMPLE, sample),
            UnetIO.TIMESTEP: cast_for(e, UnetIO.TIMESTEP, np.full((sample.shape[0],), timestep, dtype=np.float32)),
            UnetIO.ENCODER_HIDDEN_STATES: cast_for(e, UnetIO.ENCODER_HIDDEN_STATES, embeddings),
            **{name: cast_for(e, name, arr) for name, arr in (added or {}).items()},
        }
        return e(**feeds)[UnetIO.OUT_SAMPLE].astype(np.float32)

    def denoise(self, scheduler: LCMScheduler, inputs: DenoiseInputs) -> np.ndarray:
        timesteps = list(scheduler.timesteps)
        inputs.check(len(timesteps))
        n = inputs.rows
        latents, mask, masked = inputs.latents, inputs.mask, inputs.masked_image_latents
        if inputs.guided:
            mask = np.concatenate([mask] * GUIDED_BATCH, axis=0)
            masked = np.concatenate([masked] * GUIDED_BATCH, axis=0)
        for i, t in enumerate(timesteps):
            x = np.concatenate([latents] * GUIDED_BATCH, axis=0) if inputs.guided else latents
            eps = self.unet(np.concatenate([x, mask, masked], axis=1), float(t), inputs.embeddings, inputs.added)
            if inputs.guided:
                uncond, text = eps[:n], eps[n:]
                eps = uncond + np.float32(inputs.guidance) * (text - uncond)
            latents, _ = scheduler.step(eps, int(t), latents, noise=inputs.step_noise[i] if i < len(timesteps) - 1 else None)
        return latents


def step_noise(inputs: DenoiseInputs, index: int, steps: int) -> np.ndarray:
    """The noise the step graph injects at ``index``: the caller's draw, zeros on the final step."""
    if index == steps - 1:
        return np.zeros(inputs.latents.shape, dtype=np.float32)
    return np.ascontiguousarray(inputs.step_noise[index], dtype=np.float32)


def step_feeds(inputs: DenoiseInputs, coefficients: LCMCoefficients, index: int, latents: np.ndarray) -> dict[str, np.ndarray]:
    """The fused graph's inputs for step ``index`` of the schedule."""
    table = coefficients.table()
    return {
        StepIO.LATENTS: np.ascontiguousarray(latents, dtype=np.float32),
        StepIO.MASK: np.ascontiguousarray(inputs.mask, dtype=np.float32),
        StepIO.MASKED_IMAGE_LATENTS: np.ascontiguousarray(inputs.masked_image_latents, dtype=np.float32),
        StepIO.ENCODER_HIDDEN_STATES: np.ascontiguousarray(inputs.embeddings, dtype=np.float32),
        StepIO.TIMESTEP: np.array([coefficients.timesteps[index]], dtype=np.float32),
        StepIO.GUIDANCE: np.array([inputs.guidance], dtype=np.float32),
        StepIO.COEFFICIENTS: np.ascontiguousarray(table[index]),
        StepIO.NOISE: step_noise(inputs, index, len(coefficients)),
    }


def schedule_of(scheduler: LCMScheduler) -> LCMCoefficients:
    """The per-step table a fused step graph needs; refuses scheduler settings it does not implement."""
    if scheduler.coefficients is None:
        raise UsageError("denoise before set_timesteps(): call scheduler.set_timesteps(steps) first")
    check_step_scheduler(scheduler.config)
    return scheduler.coefficients


def fused_denoise(engine: Engine, coefficients: LCMCoefficients, inputs: DenoiseInputs) -> np.ndarray:
    """Every step of the schedule ``coefficients`` with the fused graph; the final (1, C, h, w) latents."""
    if engine.spec.name != UNET_STEP:
        raise ModelError(f"the fused loop needs the {UNET_STEP!r} graph, got {engine.spec.name!r}; export with --fused-step")
    steps = len(coefficients)
    inputs.check(steps, max_rows=1)  # the graph's latents are batch 1; only the embeddings carry B
    if inputs.added:
        raise ModelError(f"the fused step graph takes no added conditions ({sorted(inputs.added)}); run the UNet graph for this model")
    latents = np.ascontiguousarray(inputs.latents, dtype=np.float32)
    for i in range(steps):
        latents = engine(**step_feeds(inputs, coefficients, i, latents))[StepIO.PREV_LATENTS]
    log.debug("denoised %d steps with %s", steps, engine.backend)
    return latents


class FusedStepDenoiser(EngineStage):
    """The fused ``unet_step`` graph run step after step through the common engine interface (any backend)."""

    max_rows = 1

    def __init__(self, engine: Engine) -> None:
        if engine.spec.name != UNET_STEP:
            raise ModelError(f"the fused loop needs the {UNET_STEP!r} graph, got {engine.spec.name!r}; export with --fused-step")
        super().__init__(engine)

    def denoise(self, scheduler: LCMScheduler, inputs: DenoiseInputs) -> np.ndarray:
        return fused_denoise(self.engine, schedule_of(scheduler), inputs)
