"""The final composite: the original subject over the new background, with the compositing alpha.

The subject is never resampled: wherever the alpha is 1 the output is the input's pixels, bit
for bit; the generated background is resized up (Lanczos) to the photo's full size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from trt_bgswap.errors import UsageError


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
