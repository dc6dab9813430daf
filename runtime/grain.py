"""Grain matching: give the upscaled background the subject's sensor noise.

A 4000x3000 photo generates at 576x448 and the background is upscaled ~7x (Lanczos): smooth and
grainless behind a subject that keeps the camera's noise. This measures the noise of both and adds
seeded Gaussian grain to the background so that its high-frequency noise matches the subject's.

Noise level: Immerkaer, "Fast Noise Variance Estimation" (CVIU 64(2), 1996): the 3x3 mask
``N = [1 -2 1]^T [1 -2 1]`` cancels locally planar content, and for white Gaussian noise of
standard deviation s the response has mean absolute value ``6 s sqrt(2/pi)``. Texture and edges
would count as noise, so, as in Tai and Yang, "Fast Noise Level Estimation" (2008), only the
flatter half of the pixels (Sobel gradient of the luminance at or below its median) is used, and
pixels within ``CLIP_MARGIN`` of 0 or 255 (their noise is clipped away) are left out. On
scikit-image's photos with 6/255 of added noise this reads 6.0-7.7, the photos' own noise and
texture included (they read 0.4-4.5 with nothing added). Both masks are separable, so they run on a
sample of 3-row strips.

Sharpness (reported, not changed): the 90th percentile of the luminance's Sobel gradient, per
region; an upscaled background reads lower than a sharp subject.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_SAMPLE_PIXELS = 1 << 22  # noise is a statistic: ~4 M pixels of strips are plenty and bound the cost
MIN_PIXELS = 1000  # fewer flat pixels than this in a region: its noise is not measured
GRAIN_ROWS = 256  # rows of grain drawn at a time (bounds memory; the draws are seeded and ordered)
CLIP_MARGIN = 16  # 8-bit levels from 0 and 255 within which noise is clipped (3 sigma of 5/255 noise)
LUMA = (0.299, 0.587, 0.114)  # Rec. 601 weights for the gradient used to pick flat pixels


@dataclass(frozen=True)
class NoiseEstimate:
    sigma: tuple[float, float, float]  # per channel, in 8-bit units
    sharpness: float  # 90th percentile of the luminance's Sobel gradient magnitude (8-bit units)
    pixels: int  # flat pixels the estimate used


@dataclass(frozen=True)
class GrainReport:
    """What grain matching measured and applied (8-bit units)."""

    subject: NoiseEstimate | None  # None: too few whole subject pixels to measure
    background: NoiseEstimate | None  # of the background before grain
    added: tuple[float, float, float]  # standard deviation of the grain added, per channel

    def summary(self) -> str:
        if self.subject is None:
            return "grain: not applied (too few subject pixels to measure noise)"
        subject = "/".join(f"{s:.1f}" for s in self.subject.sigma)
        added = "/".join(f"{s:.1f}" for s in self.added)
        background = "/".join(f"{s:.1f}" for s in self.background.sigma) if self.background else "unmeasured"
        sharp = f"; sharpness subject {self.subject.sharpness:.0f}"
        if self.background is not None:
            sharp += f", background {self.background.sharpness:.0f}"
        return f"grain: subject noise {subject}, background {background}, added {added} (R/G/B, 8-bit){sharp}"


def _strip_rows(height: int, width: int) -> np.ndarray:
    """Centre rows of the 3-row strips sampled (every row when the image is small enough)."""
    step = max(1, math.ceil(height * width / MAX_SAMPLE_PIXELS))
    return np.arange(1, height - 1, step)


def _second_difference(x: np.ndarray) -> np.ndarray:
    return x[..., :-2] - 2.0 * x[..., 1:-1] + x[..., 2:]


def estimate_noise(image: np.ndarray, region: np.ndarray) -> NoiseEstimate | None:
    """Noise standard deviation per channel of a uint8 HxWx3 image over a bool HxW region (see module doc)."""
    h, w = region.shape
    if h < 3 or w < 3:
        return None
    ys = _strip_rows(h, w)
    above, centre, below = (image[ys + d].astype(np.float32) for d in (-1, 0, 1))  # (n, W, 3)
    inside = region[ys - 1] & region[ys] & region[ys + 1]
    # Values near 0 or 255 have their noise clipped away: leave those pixels out.
    unclipped = ((centre >= CLIP_MARGIN) & (centre <= 255 - CLIP_MARGIN)).all(axis=-1)
    inside = (inside & unclipped)[:, 1:-1] & inside[:, :-2] & inside[:, 2:]
    if np.count_nonzero(inside) < 2 * MIN_PIXELS:
        return None
    luma = np.asarray(LUMA, np.float32)
    la, lc, lb = above @ luma, centre @ luma, below @ luma
    smooth_v = la + 2.0 * lc + lb
    gx = smooth_v[:, 2:] - smooth_v[:, :-2]  # Sobel: [1 2 1]^T (x) [-1 0 1]
    diff_v = lb - la
    gy = diff_v[:, :-2] + 2.0 * diff_v[:, 1:-1] + diff_v[:, 2:]
    gradient = np.abs(gx) + np.abs(gy)
    flat = inside & (gradient <= np.median(gradient[inside]))
    count = int(np.count_nonzero(flat))
    if count < MIN_PIXELS:
        return None
    vertical = above - 2.0 * centre + below  # Immerkaer's mask, separably: [1 -2 1]^T then [1 -2 1]
    response = np.abs(np.moveaxis(_second_difference(np.moveaxis(vertical, -1, 0)), 0, -1))  # (n, W-2, 3)
    sigma = response[flat].mean(axis=0) * math.sqrt(math.pi / 2.0) / 6.0
    sharpness = float(np.percentile(gradient[inside], 90))
    return NoiseEstimate(tuple(float(s) for s in sigma), sharpness, count)  # type: ignore[arg-type]


def match_grain(
    background: np.ndarray, subject_photo: np.ndarray, alpha: np.ndarray, seed: int
) -> tuple[np.ndarray, GrainReport]:
    """Background (uint8 HxWx3) with seeded Gaussian grain bringing its noise to the subject's.

    The subject is measured where alpha is 1, the background where alpha is 0 (what stays
    visible); the grain added per channel is sqrt(subject^2 - background^2), so a background that
    is already as noisy gets none.
    """
    subject = estimate_noise(subject_photo, alpha >= 1.0)
    if subject is None:
        return background, GrainReport(None, None, (0.0, 0.0, 0.0))
    own = estimate_noise(background, alpha <= 0.0)
    own_sigma = own.sigma if own is not None else (0.0, 0.0, 0.0)
    added = tuple(math.sqrt(max(s * s - b * b, 0.0)) for s, b in zip(subject.sigma, own_sigma))
    report = GrainReport(subject, own, added)  # type: ignore[arg-type]
    if not any(added):
        return background, report
    rng = np.random.default_rng(seed)
    scale = np.asarray(added, np.float32)
    out = np.empty_like(background)
    for top in range(0, background.shape[0], GRAIN_ROWS):
        rows = background[top : top + GRAIN_ROWS]
        grain = rng.standard_normal(rows.shape, dtype=np.float32) * scale
        grain += rows
        np.rint(grain, out=grain)
        out[top : top + GRAIN_ROWS] = np.clip(grain, 0, 255)
    return out, report
