"""Light matching: relight the subject with the new background's illuminant, bounded.

A pasted subject keeps the colour cast and exposure of the scene it was shot in. This moves its
colour statistics toward the new background's with a diagonal (von Kries) adaptation in linear
RGB: per-channel gains ``e_new / e_old``, where each scene's illuminant ``e`` is estimated by
*shades of gray* (Finlayson and Trezzi, "Shades of Gray and Colour Constancy", CIC 2004): the
Minkowski p-mean of linear RGB, p = 6 (p = 1 is gray world, p = infinity max-RGB).

- ``e_old`` comes from the whole original photo (the old scene, subject included); ``e_new`` from
  the new background, weighted by nearness to the subject (its alpha blurred with a sigma of a
  fifth of the subject's size): the light around the subject is the light on it.
- ``strength`` in [0, 1] is the exponent on the gains; 0 changes nothing (the caller skips the step).
- Bounded, so skin and product colours survive a background whose *content* has a colour (a
  lawn, a brick wall): the chromatic gains are limited so that white moves by at most
  ``MAX_CHROMA_SHIFT`` in OKLab (Ottosson 2020; ~0.02 is a just-noticeable difference), and the
  exposure (luminance gain) to within ``MAX_EXPOSURE`` either way.

Measured in ``benchmarks/composite_quality.py`` (CIEDE2000 against the subject truly lit by the
new light): this reduces the cast where the two scenes differ in light, and, thanks to the bounds,
changes little where they differ in content; a mean/std transfer in OKLab (Reinhard et al. 2001)
bounded the same way did worse in both. Statistics come from an area-downsampled copy
(``STATS_SIDE``); the gains are per channel, so 8-bit pixels go through a 256-entry table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from trt_bgswap.runtime.mask_ops import gaussian_blur

STATS_SIDE = 256  # long side of the copies the illuminants are estimated on
MINKOWSKI_P = 6.0  # shades of gray (Finlayson and Trezzi's best p)
PROXIMITY = 0.2  # sigma of the background's nearness weight, as a fraction of the subject's size
# Bounds, measured (benchmarks/composite_quality.py, 30 casts x 2 kinds of background): exposure 1.1 and
# chroma 0.04 keep most of the gain on relit scenes (mean CIEDE2000 6.8 -> 4.2) while capping the harm
# a background of another colour can do (worst +5.4 vs +7.8 with exposure 1.25; 0.03 chroma loses 0.4).
MAX_CHROMA_SHIFT = 0.04  # OKLab a/b distance white may move (about 2 JNDs)
MAX_EXPOSURE = 1.1  # luminance gain limited to [1/1.1, 1.1]
LUMINANCE = np.array([0.2126, 0.7152, 0.0722])  # Rec. 709 / sRGB relative luminance of linear RGB

# Ottosson's OKLab matrices: linear sRGB -> LMS, and cube-rooted LMS -> Lab.
_M1 = np.array(
    [[0.4122214708, 0.5363325363, 0.0514459929], [0.2119034982, 0.6806995451, 0.1073969566], [0.0883024619, 0.2817188376, 0.6299787005]]
)
_M2 = np.array(
    [[0.2104542553, 0.7936177850, -0.0040720468], [1.9779984951, -2.4285922050, 0.4505937099], [0.0259040371, 0.7827717662, -0.8086757660]]
)


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1.0 / 2.4) - 0.055)


def linear_to_oklab(linear: np.ndarray) -> np.ndarray:
    """Linear sRGB (..., 3) -> OKLab (..., 3)."""
    return np.cbrt(linear @ _M1.T) @ _M2.T


def oklab_to_linear(lab: np.ndarray) -> np.ndarray:
    """OKLab (..., 3) -> linear sRGB (..., 3), out-of-gamut values as they come."""
    return ((lab @ np.linalg.inv(_M2).T) ** 3) @ np.linalg.inv(_M1).T


@dataclass(frozen=True)
class Relight:
    """Per-channel gains in linear RGB (chromatic adaptation times exposure)."""

    strength: float
    gains: tuple[float, float, float]
    exposure: float  # the luminance part of the gains
    white_shift: float  # OKLab distance white moves by (<= MAX_CHROMA_SHIFT)

    def summary(self) -> str:
        g = "/".join(f"{v:.3f}" for v in self.gains)
        return f"harmonize {self.strength:g}: linear RGB gains {g} (exposure x{self.exposure:.2f}, white moves {self.white_shift:.3f} OKLab)"

    def table(self) -> np.ndarray:
        """(3, 256) uint8: each 8-bit level of each channel after the gains."""
        levels = srgb_to_linear(np.arange(256) / 255.0)
        out = linear_to_srgb(levels[None, :] * np.asarray(self.gains)[:, None]) * 255.0
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def apply_u8(self, rgb: np.ndarray) -> np.ndarray:
        """(..., 3) uint8 -> uint8, exactly the rounded float result (a table per channel)."""
        lut = self.table()
        return np.stack([lut[c][rgb[..., c]] for c in range(3)], axis=-1)

    def apply(self, rgb01: np.ndarray) -> np.ndarray:
        """(..., 3) float sRGB in [0, 1] -> float32 in [0, 1]."""
        lin = srgb_to_linear(np.clip(rgb01.astype(np.float64), 0.0, 1.0)) * np.asarray(self.gains)
        return linear_to_srgb(lin).astype(np.float32)


def _shades_of_gray(linear: np.ndarray, weight: np.ndarray) -> np.ndarray:
    w = weight[..., None] / max(float(weight.sum()), 1e-12)
    return ((linear**MINKOWSKI_P) * w).sum(axis=(0, 1)) ** (1.0 / MINKOWSKI_P)


def _white_shift(gains: np.ndarray) -> float:
    """OKLab distance between white and white under luminance-neutral ``gains``."""
    a, b = linear_to_oklab(gains / (LUMINANCE @ gains))[1:]
    return math.hypot(a, b)  # white itself is at a = b = 0


def plan_relight(photo: np.ndarray, background: np.ndarray, alpha: np.ndarray, strength: float) -> Relight | None:
    """The bounded relighting of ``photo``'s subject (alpha HxW) for ``background``; None when no background shows."""
    h, w = alpha.shape
    scale = min(1.0, STATS_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = lambda im: srgb_to_linear(np.asarray(Image.fromarray(im, "RGB").resize(size, Image.Resampling.BOX), dtype=np.float64) / 255.0)  # noqa: E731
    a = np.clip(np.asarray(Image.fromarray(alpha.astype(np.float32), "F").resize(size, Image.Resampling.BOX), dtype=np.float64), 0.0, 1.0)
    rows, cols = np.nonzero(a > 0.5)
    extent = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) if rows.size else max(size)
    near = (1.0 - a) * gaussian_blur(a.astype(np.float32), PROXIMITY * extent)
    if near.sum() <= 1e-6:  # the subject fills the frame, or there is none: use all the background shows
        near = 1.0 - a
    if near.sum() <= 1e-6:
        return None
    # A channel that is (nearly) absent, as in a saturated solid colour, gets a floor: its gain is then
    # large, and the chroma bound below is what limits it.
    old, new = (np.maximum(e, 1e-4 + 1e-3 * e.max()) for e in (_shades_of_gray(small(photo), np.ones_like(a)), _shades_of_gray(small(background), near)))
    chroma = (new / (LUMINANCE @ new)) / (old / (LUMINANCE @ old))  # luminance-neutral chromatic adaptation
    chroma = chroma**strength
    shift = _white_shift(chroma)
    if shift > MAX_CHROMA_SHIFT:  # shrink the gains in log space until white moves by the bound
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _white_shift(chroma**mid) <= MAX_CHROMA_SHIFT else (lo, mid)
        chroma = chroma**lo
    chroma = chroma / (LUMINANCE @ chroma)
    exposure = float(np.clip(((LUMINANCE @ new) / (LUMINANCE @ old)) ** strength, 1.0 / MAX_EXPOSURE, MAX_EXPOSURE))
    gains = chroma * exposure
    return Relight(strength, (float(gains[0]), float(gains[1]), float(gains[2])), exposure, _white_shift(chroma))
