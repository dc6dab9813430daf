"""A soft contact shadow from the subject's alpha, for product photos.

The classic drop shadow: the alpha, shifted by an offset, blurred (Gaussian) and scaled by an
opacity, darkens the background multiplicatively (``B * (1 - shadow)``) before the subject is
composited over it, so the shadow shows only where the subject does not cover it and never
brightens anything. Offset and blur are fractions of the subject's height, so one setting suits
a batch of photos of any size; the blur runs on an area-downsampled alpha (a blur of sigma
``s`` loses nothing at a resolution of ``s / 2`` pixels) and is resized back bilinearly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.mask_ops import gaussian_blur
from trt_bgswap.runtime.resize import resize_bilinear

BLUR_SAMPLES = 4.0  # work at a resolution where sigma is this many pixels (or at full size)


@dataclass(frozen=True)
class ShadowOptions:
    """Contact shadow geometry: offset (dx, dy) and blur as fractions of the subject's height."""

    offset: tuple[float, float] = (0.0, 0.02)  # down by 2 % of the subject's height
    blur: float = 0.03  # Gaussian sigma
    opacity: float = 0.5  # darkening where the shadow is full

    def validate(self) -> None:
        if not isinstance(self.offset, tuple) or len(self.offset) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in self.offset):
            raise UsageError(f"shadow offset={self.offset!r}: give two numbers DX,DY (fractions of the subject's height, e.g. 0,0.02)")
        if not all(-1.0 <= v <= 1.0 for v in self.offset):
            raise UsageError(f"shadow offset={self.offset}: keep DX and DY between -1 and 1 (fractions of the subject's height)")
        if isinstance(self.blur, bool) or not isinstance(self.blur, (int, float)) or not 0.0 <= self.blur <= 1.0:
            raise UsageError(f"shadow blur={self.blur!r}: --shadow-blur takes a fraction of the subject's height between 0 and 1 (e.g. 0.03)")
        if isinstance(self.opacity, bool) or not isinstance(self.opacity, (int, float)) or not 0.0 < self.opacity <= 1.0:
            raise UsageError(f"shadow opacity={self.opacity!r}: --shadow-opacity takes a value in (0, 1] (e.g. 0.5)")


@dataclass(frozen=True)
class ShadowReport:
    offset_px: tuple[float, float]
    blur_px: float
    opacity: float

    def summary(self) -> str:
        return f"shadow: offset {self.offset_px[0]:+.0f},{self.offset_px[1]:+.0f} px, blur {self.blur_px:.1f} px, opacity {self.opacity:g}"


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """x moved by (dy, dx) pixels, zeros where nothing moves in."""
    out = np.zeros_like(x)
    h, w = x.shape
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


def shadow_map(alpha: np.ndarray, options: ShadowOptions) -> tuple[np.ndarray, ShadowReport] | None:
    """float32 HxW darkening in [0, opacity] under the subject; None when there is no subject."""
    rows = np.flatnonzero((alpha > 0.5).any(axis=1))
    if rows.size == 0:
        return None
    height = float(rows[-1] - rows[0] + 1)
    h, w = alpha.shape
    sigma = options.blur * height
    factor = max(1.0, sigma / BLUR_SAMPLES)
    lh, lw = max(1, round(h / factor)), max(1, round(w / factor))
    low = alpha.astype(np.float32)
    if (lh, lw) != (h, w):
        low = np.asarray(Image.fromarray(low, "F").resize((lw, lh), Image.Resampling.BOX), dtype=np.float32)
    dy, dx = options.offset[1] * height * lh / h, options.offset[0] * height * lw / w
    low = gaussian_blur(_shift(low, round(dy), round(dx)), sigma * lh / h)
    full = resize_bilinear(low, (h, w)) if (lh, lw) != (h, w) else low
    report = ShadowReport((options.offset[0] * height, options.offset[1] * height), sigma, options.opacity)
    return np.clip(full, 0.0, 1.0) * np.float32(options.opacity), report


def cast_shadow(background: np.ndarray, alpha: np.ndarray, options: ShadowOptions) -> tuple[np.ndarray, ShadowReport | None]:
    """uint8 background darkened by the subject's shadow (never brightened)."""
    made = shadow_map(alpha, options)
    if made is None:
        return background, None
    darkening, report = made
    out = background.astype(np.float32) * (1.0 - darkening)[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), report
