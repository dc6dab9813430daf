"""The generation stage: preprocessed inpainting inputs in, the generated image out.

:class:`StageGenerator` chains three stages - VAE encode, the denoising loop, VAE decode -
through host arrays; :class:`trt_bgswap.runtime.device_chain.DeviceChain` is the same work
kept on the GPU (one download). The pipeline holds one :class:`Generator` and never asks
which it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from trt_bgswap.runtime.denoise import DenoiseInputs, Denoiser
from trt_bgswap.runtime.scheduler import LCMScheduler
from trt_bgswap.runtime.vae import VaeDecoder, VaeEncoder


@dataclass(frozen=True)
class GenerationInputs:
    """N generations' host inputs (one size, schedule and guidance), everything preprocessed (see ``Pipeline``)."""

    masked_image: np.ndarray  # (N, 3, H, W) in [-1, 1], zero where the background is repainted
    eps: np.ndarray  # (N, C, h, w) the VAE posterior draws
    latents: np.ndarray  # (N, C, h, w) initial latents, already times init_noise_sigma
    step_noise: tuple[np.ndarray, ...]  # (N, C, h, w) per non-final step
    latent_mask: np.ndarray  # (N, 1, h, w)
    embeddings: np.ndarray  # (N, S, D), or (2N, S, D) [uncond_1..N, cond_1..N] for guidance
    guidance: float
    added: Mapping[str, np.ndarray] = field(default_factory=dict)  # the UNet's added conditions (SDXL), rows as embeddings

    def denoise_inputs(self, masked_image_latents: np.ndarray) -> DenoiseInputs:
        return DenoiseInputs(self.latents, self.step_noise, self.latent_mask, masked_image_latents, self.embeddings, self.guidance, self.added)


class Generator(Protocol):
    max_batch: int | None  # generations one call can run together (None: any)

    @property
    def backend(self) -> str: ...

    def generate(self, scheduler: LCMScheduler, inputs: GenerationInputs) -> np.ndarray:
        """The float32 (N, H, W, 3) images in [0, 1] at the generation size."""
        ...

    def close(self) -> None: ...


class StageGenerator:
    """Encode, denoise, decode: three stages joined by host arrays."""

    def __init__(self, encoder: VaeEncoder, denoiser: Denoiser, decoder: VaeDecoder) -> None:
        self.encoder, self.denoiser, self.decoder = encoder, denoiser, decoder
        self.max_batch = denoiser.max_rows

    @property
    def backend(self) -> str:
        return self.denoiser.backend

    def generate(self, scheduler: LCMScheduler, inputs: GenerationInputs) -> np.ndarray:
        masked_latents = self.encoder.encode(inputs.masked_image, inputs.eps)
        latents = self.denoiser.denoise(scheduler, inputs.denoise_inputs(masked_latents))
        return self.decoder.decode(latents)

    def load(self) -> None:
        """Stages that own more than an engine (the TensorRT device loop: its own engine and CUDA graphs, captured now)."""
        for stage in (self.encoder, self.denoiser, self.decoder):
            load = getattr(stage, "load", None)
            if load is not None:
                load()
        warm_up = getattr(self.denoiser, "warm_up", None)
        if warm_up is not None:
            warm_up()

    def close(self) -> None:
        for stage in (self.encoder, self.denoiser, self.decoder):
            stage.close()
