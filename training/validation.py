"""Validation images during fine-tuning: diffusers' inpainting pipeline on the LoRA as it is now, seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trt_bgswap.training.data import Example, collate, counter_seed
from trt_bgswap.training.objective import Objective, dtype_kwargs


def write_validation_images(objective: Objective, base: Path, examples: list[Example], folder: Path, count: int, steps: int, seed: int) -> list[Path]:
    """Inpaint the first ``count`` validation examples with the LoRA as it is now (diffusers' pipeline, seeded)."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from trt_bgswap.runtime.image_write import write_image

    m = objective.m
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        base, unet=m.unet, vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, **dtype_kwargs(objective.dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    m.unet.eval()
    written = []
    for i, ex in enumerate(examples[:count]):
        batch = collate([ex], objective.resolution, [None])
        image = Image.fromarray(np.rint((batch["pixels"][0].transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8), "RGB")
        mask = Image.fromarray((batch["masks"][0, 0] * 255).astype(np.uint8), "L")
        generator = torch.Generator(device=objective.device).manual_seed(counter_seed(seed, "validation", i))
        with torch.no_grad():
            out = pipe(
                prompt=ex.text, image=image, mask_image=mask, height=objective.resolution, width=objective.resolution,
                num_inference_steps=steps, generator=generator, output_type="np",
            ).images[0]
        path = folder / f"{i:02d}_{ex.image.stem}.png"
        write_image(path, np.rint(out * 255).clip(0, 255).astype(np.uint8), overwrite=True)
        written.append(path)
    m.unet.train()
    return written
