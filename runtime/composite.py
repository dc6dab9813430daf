"""Generation-size policy, resizing to and from it, and the final composite.

Policy (documented in the README): the image is generated at about the model's
native area (``default_size``², 512² for SD1.5) with the input's aspect ratio,
each side rounded to the model's size multiple (VAE factor x UNet downsampling,
64 for SD1.5), then the generated background is resized up (Lanczos) to the
input's full size. The subject is never resampled: the composite takes the
ORIGINAL full-resolution pixels wherever RMBG's alpha says subject.

Resizing for the UNet's inputs follows diffusers' ``VaeImageProcessor`` exactly
(Pillow Lanczos on 8-bit images and masks), so results match the reference.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from trt_bgswap.errors import UsageError

MAX_ASPECT = 4.0  # beyond this the model's native area gives a side below one size multiple


def generation_size(width: int, height: int, default_size: int, multiple: int) -> tuple[int, int]:
    """(width, height) to generate at: the native area, the input's aspect, sides rounded to ``multiple``."""
    if width <= 0 or height <= 0:
        raise UsageError(f"image size {width}x{height}: both sides must be positive")
    aspect = width / height
    aspect = min(max(aspect, 1 / MAX_ASPECT), MAX_ASPECT)
    area = float(default_size * default_size)
    gw = math.sqrt(area * aspect)
    gh = gw / aspect
    return (max(multiple, int(round(gw / multiple)) * multiple), max(multiple, int(round(gh / multiple)) * multiple))


def check_generation_size(width: int, height: int, multiple: int, limit: int = 2048) -> None:
    if width % multiple or height % multiple:
        raise UsageError(f"--size {width}x{height}: both sides must be multiples of {multiple} for this model")
    if not (multiple <= width <= limit and multiple <= height <= limit):
        raise UsageError(f"--size {width}x{height}: sides must be between {multiple} and {limit} pixels")


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


def to_uint8(image01: np.ndarray) -> np.ndarray:
    """float [0,1] -> uint8 with rounding (diffusers' numpy_to_pil truncates; we round for the composite)."""
    return np.clip(np.rint(image01 * 255.0), 0, 255).astype(np.uint8)


def upscale_background(generated: np.ndarray, width: int, height: int) -> np.ndarray:
    """Generated float HxWx3 [0,1] -> uint8 at the input's full size (Lanczos)."""
    im = Image.fromarray(to_uint8(generated), "RGB")
    if im.size != (width, height):
        im = im.resize((width, height), resample=Image.Resampling.LANCZOS)
    return np.asarray(im)


def composite(original: np.ndarray, background: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Original subject over the new background with soft alpha; where alpha is 1 the input pixels stay exact."""
    if original.shape != background.shape or original.shape[:2] != alpha.shape:
        raise UsageError(
            f"composite: image {original.shape}, background {background.shape} and alpha {alpha.shape} differ in size"
        )
    a = np.clip(alpha, 0.0, 1.0)[..., None].astype(np.float32)
    blend = a * original.astype(np.float32) + (1.0 - a) * background.astype(np.float32)
    out = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return np.where(a >= 1.0, original, out)


def solid_background(color: tuple[int, int, int], width: int, height: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(color, dtype=np.uint8), (height, width, 3)).copy()
