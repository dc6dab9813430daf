"""Light matching: move the subject's colour statistics toward the new background's, bounded.

A pasted subject keeps the brightness and colour cast of the scene it was shot in. Following
Reinhard, Ashikhmin, Gooch and Shirley, "Color Transfer between Images" (IEEE CG&A 2001), the
subject's per-channel mean (and the lightness's spread) are moved toward the background's in a
perceptual, decorrelated colour space: OKLab (Ottosson, "A perceptual color space for image
processing", 2020), where a distance of ~0.02 is a just-noticeable difference.

- The background's statistics are weighted by nearness to the subject (its alpha blurred with a
  sigma of a fifth of the subject's size): the light that falls on the subject is the light around it.
- ``strength`` in [0, 1] scales the move; 0 changes nothing (the caller skips the step).
- Bounded, so skin and product colours survive a background of another colour: the chroma shift
  is at most ``MAX_CHROMA_SHIFT`` (a visible cast, not a recolouring), the lightness shift at most
  ``MAX_LIGHTNESS_SHIFT`` and the lightness contrast changes by at most ``MAX_CONTRAST_RATIO``;
  chroma spread (saturation) is never scaled.

Statistics are taken on an area-downsampled copy (``STATS_SIDE``); the transfer is a per-colour
function, applied to the subject's pixels in chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from trt_bgswap.runtime.mask_ops import gaussian_blur

STATS_SIDE = 256  # long side of the copy the statistics come from
PROXIMITY = 0.2  # sigma of the background's nearness weight, as a fraction of the subject's size
MAX_CHROMA_SHIFT = 0.04  # OKLab a/b units (2 JNDs)
MAX_LIGHTNESS_SHIFT = 0.12  # OKLab L units
MAX_CONTRAST_RATIO = 1.25  # lightness std scaled by at most this (or 1/this)
CHUNK = 1 << 20  # pixels converted at a time

# Ottosson's matrices: linear sRGB -> LMS, and cube-rooted LMS -> Lab.
_M1 = np.array(
    [[0.4122214708, 0.5363325363, 0.0514459929], [0.2119034982, 0.6806995451, 0.1073969566], [0.0883024619, 0.2817188376, 0.6299787005]],
    dtype=np.float64,
)
_M2 = np.array(
    [[0.2104542553, 0.7936177850, -0.0040720468], [1.9779984951, -2.4285922050, 0.4505937099], [0.0259040371, 0.7827717662, -0.8086757660]],
    dtype=np.float64,
)
_M1_INV = np.linalg.inv(_M1)
_M2_INV = np.linalg.inv(_M2)


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1.0 / 2.4) - 0.055)


def rgb_to_oklab(rgb01: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) -> OKLab (..., 3)."""
    lms = srgb_to_linear(rgb01.astype(np.float64)) @ _M1.T
    return np.cbrt(lms) @ _M2.T


def oklab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """OKLab (..., 3) -> sRGB in [0, 1] (out-of-gamut colours clipped)."""
    lms = (lab @ _M2_INV.T) ** 3
    return linear_to_srgb(lms @ _M1_INV.T)


@dataclass(frozen=True)
class Transfer:
    """The colour move: ``L' = mean_l + (L - mean_l) * contrast + shift[0]``, ``a' = a + shift[1]``, ``b' = b + shift[2]``."""

    strength: float
    shift: tuple[float, float, float]  # OKLab (L, a, b)
    contrast: float
    mean_l: float
    subject_mean: tuple[float, float, float]  # OKLab means before
    background_mean: tuple[float, float, float]  # of the background near the subject

    def summary(self) -> str:
        return (
            f"harmonize {self.strength:g}: OKLab shift L {self.shift[0]:+.3f} a {self.shift[1]:+.3f} "
            f"b {self.shift[2]:+.3f}, lightness contrast x{self.contrast:.2f}"
        )

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """float32 (n, 3) sRGB in [0, 1] after the move (any (n, 3) uint8 or float [0, 1] colours in)."""
        x = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
        out = np.empty(x.shape, np.float32)
        for start in range(0, x.shape[0], CHUNK):
            lab = rgb_to_oklab(x[start : start + CHUNK])
            lab[:, 0] = self.mean_l + (lab[:, 0] - self.mean_l) * self.contrast + self.shift[0]
            lab[:, 1] += self.shift[1]
            lab[:, 2] += self.shift[2]
            out[start : start + CHUNK] = oklab_to_rgb(lab)
        return out


def _weighted_stats(lab: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    total = weight.sum()
    mean = (lab * weight[..., None]).sum(axis=(0, 1)) / total
    var = (((lab - mean) ** 2) * weight[..., None]).sum(axis=(0, 1)) / total
    return mean, np.sqrt(var)


def plan_transfer(photo: np.ndarray, background: np.ndarray, alpha: np.ndarray, strength: float) -> Transfer | None:
    """The bounded colour move for the subject of ``photo`` (uint8 HxWx3, alpha HxW) over ``background``; None without a subject."""
    h, w = alpha.shape
    scale = min(1.0, STATS_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = lambda im: np.asarray(Image.fromarray(im, "RGB").resize(size, Image.Resampling.BOX), dtype=np.float64) / 255.0  # noqa: E731
    a = np.asarray(Image.fromarray(alpha.astype(np.float32), "F").resize(size, Image.Resampling.BOX), dtype=np.float64)
    a = np.clip(a, 0.0, 1.0)
    if a.sum() < 1.0 or (1.0 - a).sum() < 1.0:
        return None
    rows, cols = np.nonzero(a > 0.5)
    extent = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) if rows.size else max(size)
    near = gaussian_blur(a.astype(np.float32), PROXIMITY * extent).astype(np.float64)
    subject_mean, subject_std = _weighted_stats(rgb_to_oklab(small(photo)), a)
    back_weight = (1.0 - a) * near
    if back_weight.sum() <= 1e-6:
        back_weight = 1.0 - a
    back_mean, back_std = _weighted_stats(rgb_to_oklab(small(background)), back_weight)
    shift = strength * (back_mean - subject_mean)
    shift[0] = float(np.clip(shift[0], -MAX_LIGHTNESS_SHIFT, MAX_LIGHTNESS_SHIFT))
    chroma = math.hypot(shift[1], shift[2])
    if chroma > MAX_CHROMA_SHIFT:
        shift[1:] *= MAX_CHROMA_SHIFT / chroma
    ratio = float(np.clip(back_std[0] / max(subject_std[0], 1e-6), 1.0 / MAX_CONTRAST_RATIO, MAX_CONTRAST_RATIO))
    contrast = ratio**strength
    return Transfer(
        strength=strength,
        shift=(float(shift[0]), float(shift[1]), float(shift[2])),
        contrast=contrast,
        mean_l=float(subject_mean[0]),
        subject_mean=tuple(float(v) for v in subject_mean),  # type: ignore[arg-type]
        background_mean=tuple(float(v) for v in back_mean),  # type: ignore[arg-type]
    )
