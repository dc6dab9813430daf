"""Whole-loop parity against a diffusers inpainting pipeline, shared by the model-family tests (issue 12).

Same weights, photo, mask and prompt, same noise: the initial latents are handed to both
sides; the VAE posterior draw and the LCM step noise diffusers takes from its generator are
replayed from a twin generator. ``strength=1.0`` is passed to diffusers (the SDXL pipeline's
default is 0.9999, which noises the photo's latents instead of starting from pure noise).
The tolerance is the rounding noise of our whole loop on that very case (:mod:`tolerance`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from skimage import data

from tolerance import NOISE_SAMPLES, network_tolerance, noisy_engine
from trt_bgswap.manifest import Manifest
from trt_bgswap.runtime.pipeline import GenerationOptions, Noise, Pipeline

PROMPT = "a sunny beach with palm trees, photograph"
NEGATIVE = "blurry, low quality"
ACCEPTANCE = 1e-3  # issue 12: the float image within 1e-3 of diffusers'
# (guidance, negative prompt): guidance 1 (no uncond rows), 2 without and with a negative prompt
CASES = [(1.0, None), (2.0, None), (2.0, NEGATIVE)]
Case = tuple[float, "str | None"]


def photo_and_mask() -> tuple[np.ndarray, np.ndarray]:
    """A real photo (300x451, non-square) and a repaint mask: everything but an ellipse around the cat's head."""
    rgb = data.chelsea()
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    subject = ((yy - 150) / 110.0) ** 2 + ((xx - 200) / 140.0) ** 2 < 1.0
    return rgb, np.where(subject, 0, 255).astype(np.uint8)


def options(case: Case, size: tuple[int, int], steps: int) -> GenerationOptions:
    guidance, negative = case
    return GenerationOptions(PROMPT, negative_prompt=negative or "", steps=steps, guidance=guidance, size=size)


def lcm_reference(
    pipe: Any, lora: Path | None, rgb: np.ndarray, mask: np.ndarray, size: tuple[int, int], steps: int, posterior_draw: bool = True,
) -> Callable[[Case], tuple[np.ndarray, Noise]]:
    """``run(case)``: diffusers' image (LCMScheduler, ``lora`` fused unless None: already fused) and every random draw it made, once per case.

    ``posterior_draw``: False for a tiny autoencoder (``AutoencoderTiny`` encodes without sampling), whose generator gives only the step noises.
    """
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    width, height = size
    cache: dict[Case, tuple[np.ndarray, Noise]] = {}

    def run(case: Case) -> tuple[np.ndarray, Noise]:
        if case not in cache:
            guidance, negative = case
            f = pipe.vae_scale_factor
            shape = (1, pipe.vae.config.latent_channels, height // f, width // f)
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(1007))
            twin = torch.Generator().manual_seed(7)  # the masked image's posterior sample, then one noise per non-final step
            posterior = torch.randn(shape, generator=twin) if posterior_draw else torch.zeros(shape)
            step_noise = tuple(torch.randn(shape, generator=twin).numpy() for _ in range(steps - 1))
            image = pipe(
                prompt=PROMPT,
                negative_prompt=negative,
                image=Image.fromarray(rgb),
                mask_image=Image.fromarray(mask, "L"),
                height=height,
                width=width,
                strength=1.0,
                num_inference_steps=steps,
                guidance_scale=guidance,
                latents=latents.clone(),
                generator=torch.Generator().manual_seed(7),
                output_type="np",
            ).images[0]
            cache[case] = image, Noise(latents=latents.numpy(), posterior=posterior.numpy(), steps=step_noise)
        return cache[case]

    return run


def loop_tolerance(folder: Path, runtime: Pipeline, rgb: np.ndarray, mask: np.ndarray, dest: Path, size: tuple[int, int], steps: int) -> Callable[[Case, Noise], float]:
    """``tolerance(case, noise)``: the rounding noise of our whole loop on that case, once per case.

    Every graph of the export is replaced by its Monte Carlo arithmetic twin
    (:func:`tolerance.noisy_engine`); the numpy steps between graphs are a few roundings each,
    dwarfed by the graphs' noise.
    """
    manifest = Manifest.load(folder)
    engines = {name: noisy_engine(m.spec, manifest.model_path(folder, name), dest / f"{name}.onnx") for name, m in manifest.models.items()}
    noisy = Pipeline.load(folder, provider="cpu", engines=engines)
    cache: dict[Case, float] = {}

    def tolerance(case: Case, noise: Noise) -> float:
        if case not in cache:
            opts = options(case, size, steps)
            clean = runtime.inpaint(rgb, mask, opts, noise)
            cache[case] = network_tolerance(clean, [noisy.inpaint(rgb, mask, opts, noise) for _ in range(NOISE_SAMPLES)])
        return cache[case]

    return tolerance
