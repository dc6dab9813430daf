"""The inpainting inputs at the generation size, prepared exactly as diffusers' ``VaeImageProcessor`` does.

Pillow Lanczos on the 8-bit image and mask; the mask binarised at 0.5; the masked image is
the image where the mask is below 0.5; the latent mask is the binary mask resized to the
latent size with nearest neighbour (``torch.nn.functional.interpolate``'s default), so the
loop matches diffusers' ``StableDiffusionInpaintPipeline`` step for step.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from trt_bgswap.runtime.resize import resize_nearest


def resize_rgb_for_model(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 HxWx3 -> float32 [-1, 1] NCHW at (height, width), as diffusers' image processor does it."""
    im = Image.fromarray(rgb, "RGB").resize((width, height), resample=Image.Resampling.LANCZOS)
    x = np.asarray(im, dtype=np.float32) / 255.0
    return (2.0 * x - 1.0).transpose(2, 0, 1)[None]


def resize_mask_for_model(mask_u8: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 HxW (255 = repaint) -> binary float32 N1HW at (height, width), as diffusers' mask processor does it."""
    im = Image.fromarray(mask_u8, "L").resize((width, height), resample=Image.Resampling.LANCZOS)
    m = np.asarray(im, dtype=np.float32) / 255.0
    m = np.where(m < 0.5, np.float32(0.0), np.float32(1.0))
    return m[None, None]


def inpaint_inputs(rgb: np.ndarray, repaint_u8: np.ndarray, width: int, height: int, latent_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(masked image (1, 3, H, W) in [-1, 1], latent mask (1, 1, h, w)) for a photo and its repaint mask (255 = repaint)."""
    image = resize_rgb_for_model(rgb, width, height)
    mask = resize_mask_for_model(repaint_u8, width, height)
    return image * (mask < 0.5), resize_nearest(mask, latent_hw)
