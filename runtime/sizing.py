"""The generation-size policy: what size the model paints at, for a photo of any size.

Policy (documented in the README): the image is generated at about the model's native area
(``default_size``², 512² for SD1.5) with the input's aspect ratio, each side rounded to the
model's size multiple (VAE factor x UNet downsampling, 64 for SD1.5); the background is then
resized up to the photo (:func:`trt_bgswap.runtime.composite.upscale_background`).
"""

from __future__ import annotations

import math

from trt_bgswap.errors import UsageError

MAX_ASPECT = 4.0  # beyond this the model's native area gives a side below one size multiple
MAX_SIDE = 2048  # the largest generation side accepted (memory is checked separately)


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


def check_generation_size(width: int, height: int, multiple: int, limit: int = MAX_SIDE) -> None:
    if width % multiple or height % multiple:
        raise UsageError(f"--size {width}x{height}: both sides must be multiples of {multiple} for this model")
    if not (multiple <= width <= limit and multiple <= height <= limit):
        raise UsageError(f"--size {width}x{height}: sides must be between {multiple} and {limit} pixels")
