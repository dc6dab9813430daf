"""Full-resolution alpha from a low-resolution mask, guided by the photo; flip test-time augmentation.

The masker sees the photo at its input size (1024x1024 for RMBG-1.4) and its alpha is resized
back, so on a 4000x3000 photo every edge is a ramp about four pixels wide with the blocky
staircase of the upsampling. The guided filter (He, Sun and Tang, "Guided Image Filtering",
ECCV 2010 / TPAMI 2013) fits, in every window, the alpha as an affine function of the photo's
colour (``q = a^T I + b``), so the output follows the photo's own edges; its colour-guide form
(a 3x3 covariance per window) separates subject and background that differ in any channel.
The fast guided filter (He and Sun, "Fast Guided Filter", arXiv 1505.00996, 2015) fits the
coefficients on a subsampled photo and applies them at full resolution, so the cost is that of
the masker's resolution, not the photo's.

Flip test-time augmentation averages the masker's alpha with that of the mirrored photo,
mirrored back (a standard ensembling for segmentation nets); it needs the masker, so it takes
the masker as a callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from trt_bgswap.runtime.mask_ops import box_blur, dilate
from trt_bgswap.runtime.resize import sample_bilinear

HALF_STEP = 0.5 / 255.0  # alpha this close to 0 or 1 after filtering is snapped (invisible in 8 bits)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel affine coefficients (a: HxWx3, b: HxW) of the colour guided filter, already box-averaged.

    ``guide`` float32 HxWx3 in [0, 1], ``src`` float32 HxW; the filtered image is
    ``(a * guide).sum(-1) + b`` (at this resolution or, upsampled, at a finer one).
    """
    mean_i = box_blur(guide, radius)
    mean_p = box_blur(src, radius)
    cov_ip = box_blur(guide * src[..., None], radius) - mean_i * mean_p[..., None]
    # Covariance of the guide's channels, + eps on the diagonal (the ridge that keeps flat windows at a ~ 0).
    pairs = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
    products = np.stack([guide[..., i] * guide[..., j] for i, j in pairs], axis=-1)
    sigma = box_blur(products, radius)
    for k, (i, j) in enumerate(pairs):
        sigma[..., k] -= mean_i[..., i] * mean_i[..., j]
        if i == j:
            sigma[..., k] += eps
    # The 3x3 solve in float64: window variances near eps (1e-4) leave float32 cofactors only ~3 digits.
    s00, s01, s02, s11, s12, s22 = (sigma[..., k].astype(np.float64) for k in range(6))
    # Inverse of the symmetric 3x3 by its adjugate; det >= eps^3 > 0 since sigma is positive semi-definite.
    c00 = s11 * s22 - s12 * s12
    c01 = s02 * s12 - s01 * s22
    c02 = s01 * s12 - s02 * s11
    c11 = s00 * s22 - s02 * s02
    c12 = s01 * s02 - s00 * s12
    c22 = s00 * s11 - s01 * s01
    det = s00 * c00 + s01 * c01 + s02 * c02
    v0, v1, v2 = cov_ip[..., 0], cov_ip[..., 1], cov_ip[..., 2]
    a = np.stack([c00 * v0 + c01 * v1 + c02 * v2, c01 * v0 + c11 * v1 + c12 * v2, c02 * v0 + c12 * v1 + c22 * v2], axis=-1)
    a = (a / det[..., None]).astype(np.float32)
    b = mean_p - (a * mean_i).sum(axis=-1)
    return box_blur(a, radius), box_blur(b, radius)


# Measured in benchmarks/composite_quality.py (boundary error against known alpha, masker simulated
# by area-downsampling the true alpha to its input size and resizing back as masker.py does):
RADIUS = 1  # window radius in the masker's pixels: best of 1, 2, 4
EPS = 1e-4  # ridge, in squared [0, 1] colour units: best of 1e-4, 1e-3, 1e-2
# The masker's edge is limited by its resolution only where its alpha jumps within its own 3x3
# neighbourhood; wider ramps (motion blur, defocus) are real, and filtering them prints the photo's
# texture on the alpha. The filter's weight goes from 0 to 1 as that local range goes from 0.3 to 0.6.
GATE = (0.3, 0.6)
MIN_UPSCALE = 1.25  # photo side / masker side; at 1.25 refining won on 14 of 15 composites, at 1.0 it is neutral, below 1 it loses


@dataclass(frozen=True)
class Refinement:
    """What :func:`refine_alpha_to_photo` did (for the composite's report)."""

    applied: bool
    upscale: float  # how much larger the photo is than the masker's input (the larger axis ratio)
    changed: int  # pixels whose alpha changed


def _area_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Box-filter (area) resize of an HxW float or HxWx3 uint8 array, float32 [0, 1]-scaled for uint8."""
    if x.ndim == 2:
        return np.asarray(Image.fromarray(x.astype(np.float32), "F").resize((width, height), Image.Resampling.BOX))
    small = Image.fromarray(x, "RGB").resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / np.float32(255.0)


def refine_alpha_to_photo(photo: np.ndarray, alpha: np.ndarray, mask_size: tuple[int, int]) -> tuple[np.ndarray, Refinement]:
    """Sharpen a masker's upsampled alpha along the photo's edges (fast colour guided filter, gated; see module doc).

    ``photo`` uint8 HxWx3, ``alpha`` float HxW in [0, 1] at the photo's size, ``mask_size``
    the masker's input (height, width). Pixels the filter does not reach keep their alpha bit for bit.
    """
    h, w = alpha.shape
    upscale = max(h / mask_size[0], w / mask_size[1])
    alpha = np.clip(alpha.astype(np.float32, copy=False), 0.0, 1.0)
    if upscale < MIN_UPSCALE:
        return alpha, Refinement(False, upscale, 0)
    lh, lw = min(h, mask_size[0]), min(w, mask_size[1])  # the masker's sampling grid (it squashes to its square)
    guide = _area_resize(photo, lh, lw)
    low = _area_resize(alpha, lh, lw)
    spread = dilate(low, 1) + dilate(-low, 1)  # max - min over the 4-neighbourhood
    weight = np.clip((spread - GATE[0]) / (GATE[1] - GATE[0]), 0.0, 1.0).astype(np.float32)
    reach = dilate((weight > 0).astype(np.uint8), 1) > 0  # low-res cells whose bilinear footprint has weight
    if not reach.any():
        return alpha, Refinement(True, upscale, 0)
    rows_map, cols_map = np.arange(h) * lh // h, np.arange(w) * lw // w
    ys, xs = np.nonzero(reach[rows_map[:, None], cols_map[None, :]])
    a, b = guided_filter(guide, low, RADIUS, EPS)
    coeff = sample_bilinear(np.concatenate([np.moveaxis(a, -1, 0), b[None], weight[None]]), (h, w), ys, xs)
    colour = photo[ys, xs].astype(np.float32) / np.float32(255.0)
    q = (coeff[:3].T * colour).sum(axis=1) + coeff[3]
    old = alpha[ys, xs]
    new = np.clip(old + np.clip(coeff[4], 0.0, 1.0) * (q - old), 0.0, 1.0)
    new = np.where(new < HALF_STEP, 0.0, np.where(new > 1.0 - HALF_STEP, 1.0, new)).astype(np.float32)
    out = alpha.copy()
    out[ys, xs] = new
    return out, Refinement(True, upscale, int(np.count_nonzero(new != old)))


def flip_tta(masker: Callable[[np.ndarray], np.ndarray], photo: np.ndarray) -> np.ndarray:
    """The masker's alpha averaged with its alpha of the mirrored photo, mirrored back (two masker runs)."""
    direct = masker(photo)
    mirrored = masker(np.ascontiguousarray(photo[:, ::-1]))
    return (0.5 * (direct.astype(np.float32) + mirrored[:, ::-1].astype(np.float32))).astype(np.float32)
