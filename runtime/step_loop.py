"""The LCM denoising loop run with the fused "UNet + LCM step" graph, on any backend.

The fused graph (:mod:`trt_bgswap.export.unet_step`, spec
:func:`trt_bgswap.specs.unet_step_spec`) does a whole step of diffusers'
``StableDiffusionInpaintPipeline`` denoising loop with ``LCMScheduler``
(Luo et al. 2023, arXiv:2310.04378): channel concat, UNet, classifier-free
guidance, and :func:`trt_bgswap.runtime.scheduler.lcm_step`'s arithmetic, with the
step's six coefficients (one row of :meth:`LCMCoefficients.table`) and timestep as
inputs, as StreamDiffusion (arXiv:2312.12491) keeps the scheduler on the device.
The host only picks the row and the noise per step, which is all this module does:
it drives the graph through the common :class:`~trt_bgswap.runtime.engine.Engine`
interface, so the same loop runs on ONNX Runtime (CPU or GPU) and TensorRT, and it
is the reference the device-resident loop (:mod:`trt_bgswap.runtime.trt_loop`)
is tested against.

On the final step the coefficients give ``prev_latents == denoised``
(``sqrt_alpha_prod_prev = 1``, ``sqrt_beta_prod_prev = 0``), so the graph has no
branch; its noise input is then zeros.

numpy only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.runtime.engine import Engine
from trt_bgswap.runtime.scheduler import LCMCoefficients, LCMConfig

log = logging.getLogger(__name__)

STEP_MODEL = "unet_step"
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


@dataclass(frozen=True)
class DenoiseInputs:
    """Everything one generation's denoising loop reads, on the host."""

    latents: np.ndarray  # (1, C, h, w) initial latents, already multiplied by init_noise_sigma
    step_noise: tuple[np.ndarray, ...]  # (1, C, h, w) each: noise injected after every non-final step
    mask: np.ndarray  # (1, 1, h, w) latent-size inpainting mask (1 = repaint)
    masked_image_latents: np.ndarray  # (1, C, h, w) scaled VAE latents of the masked image
    embeddings: np.ndarray  # (B, S, D) text embeddings: B=1 [cond], or B=2 [uncond, cond] for guidance
    guidance: float  # classifier-free guidance scale; has no effect when B=1

    def check(self, steps: int) -> None:
        """Shapes agree with each other and with the number of steps (the spec checks them against the graph)."""
        shape = self.latents.shape
        if len(shape) != 4 or shape[0] != 1:
            raise UsageError(f"latents have shape {shape}; the step loop takes one (1, C, h, w) sample")
        for name, arr, want in (
            ("masked_image_latents", self.masked_image_latents, shape),
            ("mask", self.mask, (1, 1, *shape[2:])),
        ):
            if arr.shape != want:
                raise UsageError(f"{name} has shape {arr.shape}; with latents {shape} it must be {want}")
        if steps < 1:
            raise UsageError(f"steps={steps}: the loop needs at least one step")
        if len(self.step_noise) < steps - 1:
            raise UsageError(f"{len(self.step_noise)} step-noise arrays for {steps} steps; pass {steps - 1}")
        for i, arr in enumerate(self.step_noise[: steps - 1]):
            if arr.shape != shape:
                raise UsageError(f"step_noise[{i}] has shape {arr.shape}; it must match the latents {shape}")
        if self.embeddings.ndim != 3 or self.embeddings.shape[0] not in (1, GUIDED_BATCH):
            raise UsageError(
                f"embeddings have shape {self.embeddings.shape}; pass (1, S, D) [cond] or (2, S, D) [uncond, cond] for guidance"
            )
        if not math.isfinite(self.guidance):
            raise UsageError(f"guidance={self.guidance}: must be a finite number")


def step_noise(inputs: DenoiseInputs, index: int, steps: int) -> np.ndarray:
    """The noise the step graph injects at ``index``: the caller's draw, zeros on the final step."""
    if index == steps - 1:
        return np.zeros(inputs.latents.shape, dtype=np.float32)
    return np.ascontiguousarray(inputs.step_noise[index], dtype=np.float32)


def step_feeds(inputs: DenoiseInputs, coefficients: LCMCoefficients, index: int, latents: np.ndarray) -> dict[str, np.ndarray]:
    """The fused graph's inputs for step ``index`` of the schedule."""
    table = coefficients.table()
    return {
        "latents": np.ascontiguousarray(latents, dtype=np.float32),
        "mask": np.ascontiguousarray(inputs.mask, dtype=np.float32),
        "masked_image_latents": np.ascontiguousarray(inputs.masked_image_latents, dtype=np.float32),
        "encoder_hidden_states": np.ascontiguousarray(inputs.embeddings, dtype=np.float32),
        "timestep": np.array([coefficients.timesteps[index]], dtype=np.float32),
        "guidance": np.array([inputs.guidance], dtype=np.float32),
        "coefficients": np.ascontiguousarray(table[index]),
        "noise": step_noise(inputs, index, len(coefficients)),
    }


def denoise(engine: Engine, coefficients: LCMCoefficients, inputs: DenoiseInputs) -> np.ndarray:
    """Run every step of the schedule with the fused graph; returns the final (1, C, h, w) latents."""
    if engine.spec.name != STEP_MODEL:
        raise ModelError(f"denoise() needs the {STEP_MODEL!r} graph, got {engine.spec.name!r}; export with the fused UNet step")
    steps = len(coefficients)
    inputs.check(steps)
    latents = np.ascontiguousarray(inputs.latents, dtype=np.float32)
    for i in range(steps):
        latents = engine(**step_feeds(inputs, coefficients, i, latents))["prev_latents"]
    log.debug("denoised %d steps with %s", steps, engine.backend)
    return latents
