"""What one generation asks for and what it gives back: options, its random draws, the job, the result."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.color_management import ColorSpace
from trt_bgswap.runtime.compose import CompositeOptions, CompositeReport
from trt_bgswap.runtime.denoise import check_step_noise
from trt_bgswap.runtime.mask_ops import MaskOptions

MAX_STEPS = 50
MAX_GUIDANCE = 30.0


@dataclass(frozen=True)
class GenerationOptions:
    """What to generate. The defaults are the LCM-LoRA's sweet spot: 4 steps, no guidance."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 4
    guidance: float = 1.0  # classifier-free guidance runs only above 1 (it doubles the UNet batch)
    seed: int | None = None  # None draws a fresh seed (reported in the result)
    size: tuple[int, int] | None = None  # (width, height) to generate at; None: the policy in runtime/sizing.py

    def validate(self, max_steps: int = MAX_STEPS) -> None:
        if not isinstance(self.steps, int) or not 1 <= self.steps <= max_steps:
            raise UsageError(f"steps={self.steps}: --steps must be between 1 and {max_steps} (LCM needs 2-8)")
        if not (0.0 <= self.guidance <= MAX_GUIDANCE) or self.guidance != self.guidance:
            raise UsageError(f"guidance={self.guidance}: --guidance must be between 0 and {MAX_GUIDANCE} (LCM works at 1-2)")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise UsageError(f"seed={self.seed}: --seed must be a non-negative integer below 2**63")


@dataclass(frozen=True)
class Noise:
    """Every random draw of one generation, so runs are reproducible and comparable with diffusers."""

    latents: np.ndarray  # (1, C, h, w): initial latents before init_noise_sigma
    posterior: np.ndarray  # (1, C, h, w): eps of the masked image's VAE posterior sample
    steps: tuple[np.ndarray, ...]  # (1, C, h, w) each: noise the LCM step injects on non-final steps

    @classmethod
    def from_seed(cls, seed: int, shape: tuple[int, int, int, int], steps: int) -> "Noise":
        rng = np.random.default_rng(seed)
        draw = lambda: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
        return cls(latents=draw(), posterior=draw(), steps=tuple(draw() for _ in range(max(steps - 1, 0))))

    def check(self, shape: tuple[int, ...], steps: int) -> None:
        for name, arr in (("latents", self.latents), ("posterior", self.posterior)):
            if arr.shape != shape:
                raise UsageError(f"noise.{name} has shape {arr.shape}; this generation needs {shape}")
        check_step_noise("noise.steps", self.steps, steps, shape)


@dataclass
class Result:
    image: np.ndarray  # uint8 HxWx3 at the input's size: the original subject over the new background
    alpha: np.ndarray  # float32 HxW: the compositing alpha (refined RMBG mask or the user's)
    inpaint_mask: np.ndarray  # uint8 HxW, 255 where the background was repainted
    generated: np.ndarray | None  # float32 hxwx3 in [0,1] at the generation size, before compositing
    seed: int | None
    generation_size: tuple[int, int] | None  # (width, height)
    backends: dict[str, str] = field(default_factory=dict)
    composite: CompositeReport | None = None  # what the composite did (runtime/compose.py)


GenerationKey = tuple[int, int, int, float]  # (width, height, steps, guidance): jobs with equal keys stack


@dataclass(frozen=True)
class GenerationJob:
    """One replace with a generated background, its subject alpha already known (RMBG's, a mask or the photo's own)."""

    rgb: np.ndarray  # uint8 HxWx3 in the photo's colour space
    alpha: np.ndarray  # float32 HxW: the subject's alpha before refinement
    options: GenerationOptions  # seed None draws one (reported in the result)
    mask_options: MaskOptions = MaskOptions()
    color_space: ColorSpace | None = None
    noise: Noise | None = None  # every random draw, given (the parity tests hand diffusers' draws in)
    composite_options: CompositeOptions = CompositeOptions()
    from_masker: bool = False  # ``alpha`` is RMBG's (refined to the photo's edges when composite_options say so), not the caller's
