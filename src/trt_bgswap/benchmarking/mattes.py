"""Composites with a known foreground F, background B and alpha a, to measure the composite.

Each case is ``I = a*F + (1-a)*B`` (rounded to 8 bits, as a photo is) from public-domain photos
(scikit-image's samples; see :mod:`trt_bgswap.benchmarking.photos`) and a procedural alpha with
one of the soft edges that show colour spill and blocky masks in practice:

- ``hair``: a silhouette with long thin strands (0.4-1.2 px wide) reaching out of it;
- ``fur``: a silhouette fringed with thousands of short strands;
- ``motion``: a silhouette under linear motion blur (8-30 px);
- ``antialiased``: a polygon rendered with 4x4 supersampling (one-pixel soft outline);
- ``defocus``: a silhouette under Gaussian blur (sigma 1.5-4 px).

Shapes are drawn at 4x supersampling and box-averaged, so partial coverage is what a camera
records; alpha is quantised to 1/255 (what a mask PNG holds), and the same quantised alpha
makes the image, so the truth is exact. Everything is seeded: the same arguments give the
same cases on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from trt_bgswap.runtime.mask_ops import gaussian_blur

EDGE_KINDS = ("hair", "fur", "motion", "antialiased", "defocus")
SUPERSAMPLE = 4
# Subjects and old backgrounds: scikit-image's colour photos, and its grey textures tinted.
FOREGROUND_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina", "hubble_deep_field")
BACKGROUND_PHOTOS = ("grass", "coffee", "brick", "rocket", "gravel", "chelsea", "astronaut")
TINTS = {"grass": (0.55, 0.85, 0.35), "brick": (0.9, 0.45, 0.3), "gravel": (0.6, 0.6, 0.75)}


@dataclass(frozen=True)
class MatteCase:
    """One composite with its truth."""

    name: str
    foreground: np.ndarray  # uint8 HxWx3: F
    background: np.ndarray  # uint8 HxWx3: B, the old scene
    alpha: np.ndarray  # float32 HxW in [0, 1], multiples of 1/255
    image: np.ndarray  # uint8 HxWx3: rint(a*F + (1-a)*B)


def fit_photo(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop to the aspect ratio, then Lanczos-resize to (height, width)."""
    h, w = rgb.shape[:2]
    if w * height > h * width:
        cw = max(1, round(h * width / height))
        rgb = rgb[:, (w - cw) // 2 : (w - cw) // 2 + cw]
    else:
        ch = max(1, round(w * height / width))
        rgb = rgb[(h - ch) // 2 : (h - ch) // 2 + ch]
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), Image.Resampling.LANCZOS))


def scene_photo(name: str, height: int, width: int) -> np.ndarray:
    """A sample photo at (height, width); grey textures get a colour tint so backgrounds differ in hue."""
    from trt_bgswap.benchmarking.photos import load_photo

    rgb = fit_photo(load_photo(name), height, width)
    if name in TINTS:
        rgb = np.clip(rgb.astype(np.float32) * np.asarray(TINTS[name], np.float32), 0, 255).astype(np.uint8)
    return rgb


def _downsample(canvas: np.ndarray, factor: int) -> np.ndarray:
    h, w = canvas.shape[0] // factor, canvas.shape[1] // factor
    return canvas[: h * factor, : w * factor].reshape(h, factor, w, factor).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of the supersampled canvas, in output pixels."""
    s = SUPERSAMPLE
    ys = (np.arange(height * s, dtype=np.float32) + 0.5) / s
    xs = (np.arange(width * s, dtype=np.float32) + 0.5) / s
    return ys[:, None], xs[None, :]


def silhouette(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A head-and-shoulders-like union of ellipses, bool at the supersampled size."""
    y, x = _grid(height, width)
    cx = width * rng.uniform(0.4, 0.6)
    head_r = min(height, width) * rng.uniform(0.16, 0.22)
    head_cy = height * rng.uniform(0.35, 0.45)
    shape = ((x - cx) / (head_r * rng.uniform(0.8, 1.0))) ** 2 + ((y - head_cy) / head_r) ** 2 <= 1.0
    body_cy = height * rng.uniform(0.95, 1.05)
    body_rx, body_ry = width * rng.uniform(0.28, 0.4), height * rng.uniform(0.3, 0.4)
    shape |= ((x - cx) / body_rx) ** 2 + ((y - body_cy) / body_ry) ** 2 <= 1.0
    return shape


def polygon(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A star-like polygon (5-11 points), bool at the supersampled size (even-odd rule)."""
    y, x = _grid(height, width)
    n = int(rng.integers(5, 12))
    cy, cx = height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6)
    r_out = min(height, width) * rng.uniform(0.3, 0.42)
    angles = np.arange(2 * n) * math.pi / n + rng.uniform(0, math.pi)
    radii = np.where(np.arange(2 * n) % 2 == 0, r_out, r_out * rng.uniform(0.4, 0.7))
    vy, vx = cy + radii * np.sin(angles), cx + radii * np.cos(angles)
    inside = np.zeros(np.broadcast_shapes(y.shape, x.shape), dtype=bool)
    for i in range(2 * n):
        y0, x0, y1, x1 = vy[i], vx[i], vy[(i + 1) % (2 * n)], vx[(i + 1) % (2 * n)]
        if y0 == y1:
            continue
        crosses = (y0 > y) != (y1 > y)
        x_at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_at)
    return inside


def _outward_normals(shape_ss: np.ndarray, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random boundary points (supersampled pixels) of a shape and their outward unit normals."""
    soft = gaussian_blur(shape_ss.astype(np.float32), 2.0 * SUPERSAMPLE)
    gy, gx = np.gradient(soft)
    edge = np.argwhere((soft > 0.45) & (soft < 0.55))
    pick = edge[rng.integers(0, len(edge), count)]
    ny, nx = -gy[pick[:, 0], pick[:, 1]], -gx[pick[:, 0], pick[:, 1]]
    norm = np.maximum(np.hypot(ny, nx), 1e-12)
    return pick.astype(np.float32), np.stack([ny / norm, nx / norm], axis=1)


def draw_strands(
    canvas: np.ndarray,
    starts: np.ndarray,
    normals: np.ndarray,
    rng: np.random.Generator,
    length: tuple[float, float],
    width: tuple[float, float],
    spread: float,
) -> None:
    """Stamp curved strands (lengths/widths in output pixels) into a supersampled float canvas, in place."""
    s = SUPERSAMPLE
    h, w = canvas.shape
    for (y, x), (ny, nx) in zip(starts, normals):
        theta = math.atan2(ny, nx) + rng.uniform(-spread, spread)
        n_steps = int(rng.uniform(*length) * s / 0.5)
        # gentle bends: a random walk of the heading plus a steady curl of at most ~1.1 rad over 70 px
        turn = rng.normal(0.0, 0.01, n_steps).cumsum() + rng.uniform(-0.002, 0.002) * np.arange(n_steps)
        path_t = theta + turn
        py = y + np.cumsum(0.5 * np.sin(path_t))
        px = x + np.cumsum(0.5 * np.cos(path_t))
        radius = rng.uniform(*width) * s / 2.0
        opacity = rng.uniform(0.6, 1.0)
        r = int(math.ceil(radius))
        oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
        disc = (oy**2 + ox**2) <= radius * radius + 0.25
        oy, ox = oy[disc], ox[disc]
        yy = (np.rint(py)[:, None] + oy[None]).astype(np.int64).ravel()
        xx = (np.rint(px)[:, None] + ox[None]).astype(np.int64).ravel()
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        np.maximum.at(canvas, (yy[ok], xx[ok]), np.float32(opacity))


def _motion_blur(alpha: np.ndarray, length: float, angle: float) -> np.ndarray:
    """Average of the alpha shifted along a line of ``length`` pixels (a linear motion blur)."""
    taps = max(2, int(round(length)))
    offsets = np.linspace(-length / 2, length / 2, taps)
    h, w = alpha.shape
    pad = int(math.ceil(length / 2)) + 1
    padded = np.pad(alpha, pad, mode="edge")
    out = np.zeros_like(alpha, dtype=np.float64)
    for t in offsets:
        dy, dx = int(round(t * math.sin(angle))), int(round(t * math.cos(angle)))
        out += padded[pad + dy : pad + dy + h, pad + dx : pad + dx + w]
    return (out / taps).astype(np.float32)


def render_alpha(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A float32 alpha with the named kind of soft edge, quantised to 1/255."""
    if kind not in EDGE_KINDS:
        raise ValueError(f"edge kind {kind!r}: pick one of {', '.join(EDGE_KINDS)}")
    base = polygon(height, width, rng) if kind == "antialiased" else silhouette(height, width, rng)
    if kind in ("hair", "fur"):
        canvas = base.astype(np.float32)
        count = int(rng.integers(150, 400)) if kind == "hair" else int(rng.integers(1500, 3500))
        starts, normals = _outward_normals(base, rng, count)
        if kind == "hair":
            draw_strands(canvas, starts, normals, rng, length=(15.0, 70.0), width=(0.4, 1.2), spread=0.6)
        else:
            draw_strands(canvas, starts, normals, rng, length=(3.0, 12.0), width=(0.5, 1.0), spread=0.5)
        alpha = _downsample(canvas, SUPERSAMPLE)
    else:
        alpha = _downsample(base.astype(np.float32), SUPERSAMPLE)
        if kind == "motion":
            alpha = _motion_blur(alpha, rng.uniform(8.0, 30.0), rng.uniform(0.0, math.pi))
        elif kind == "defocus":
            alpha = gaussian_blur(alpha, rng.uniform(1.5, 4.0))
    return (np.rint(np.clip(alpha, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def make_case(name: str, foreground: np.ndarray, background: np.ndarray, alpha: np.ndarray) -> MatteCase:
    a = alpha[..., None]
    image = np.clip(np.rint(a * foreground.astype(np.float32) + (1.0 - a) * background.astype(np.float32)), 0, 255).astype(np.uint8)
    return MatteCase(name, foreground, background, alpha, image)


def matte_cases(
    count: int = 35,
    height: int = 480,
    width: int = 640,
    seed: int = 0,
    kinds: Sequence[str] = EDGE_KINDS,
) -> list[MatteCase]:
    """``count`` composites cycling through ``kinds``, subject and background photos paired off by a rotation."""
    photos: dict[str, np.ndarray] = {}

    def photo(name: str) -> np.ndarray:
        if name not in photos:
            photos[name] = scene_photo(name, height, width)
        return photos[name]

    cases = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        fg = FOREGROUND_PHOTOS[(i // len(kinds) + i) % len(FOREGROUND_PHOTOS)]
        bg = BACKGROUND_PHOTOS[(i // len(kinds) + 2 * i + 1) % len(BACKGROUND_PHOTOS)]
        if bg == fg:
            bg = BACKGROUND_PHOTOS[(BACKGROUND_PHOTOS.index(bg) + 1) % len(BACKGROUND_PHOTOS)]
        rng = np.random.default_rng([seed, i])
        alpha = render_alpha(kind, height, width, rng)
        cases.append(make_case(f"{i:02d}-{kind}-{fg}-on-{bg}", photo(fg), photo(bg), alpha))
    return cases


# New solid backgrounds the composites are measured on (the acceptance's `--bg-color` case).
NEW_COLOURS = ((255, 255, 255), (0, 0, 0), (128, 128, 128), (30, 144, 255), (220, 20, 60), (34, 139, 34))
SOFT = (0.02, 0.98)  # the soft band the acceptance measures


def truth_on(case: MatteCase, colour: Sequence[int]) -> np.ndarray:
    """float32 HxWx3: the true composite ``a*F + (1-a)*C`` of the case on a solid colour (no rounding)."""
    a = case.alpha[..., None]
    return a * case.foreground.astype(np.float32) + (1.0 - a) * np.asarray(colour, np.float32)


def soft_band_error(case: MatteCase, composite: np.ndarray, colour: Sequence[int]) -> tuple[float, int]:
    """(sum of absolute 8-bit errors over the soft band's pixels and channels, number of values summed)."""
    band = (case.alpha > SOFT[0]) & (case.alpha < SOFT[1])
    err = np.abs(composite[band].astype(np.float64) - truth_on(case, colour)[band])
    return float(err.sum()), int(err.size)


def simulated_mask(alpha: np.ndarray, side: int) -> np.ndarray:
    """A masker's alpha: the true one area-averaged to ``side`` x ``side`` (what an ideal net at that
    input size can say) and resized back with torch's bilinear, as :class:`~trt_bgswap.runtime.masker.Masker` does."""
    from trt_bgswap.runtime.resize import resize_bilinear

    low = np.asarray(Image.fromarray(alpha.astype(np.float32), "F").resize((side, side), Image.Resampling.BOX))
    return np.clip(resize_bilinear(low, alpha.shape), 0.0, 1.0)


def boundary_metrics(estimate: np.ndarray, truth: np.ndarray, width: int) -> tuple[float, float]:
    """(mean abs alpha error within ``width`` px of the true edge or soft band, IoU of the masks at 0.5)."""
    from trt_bgswap.runtime.mask_ops import dilate, erode

    edge = (dilate(truth, 1) != erode(truth, 1)) | ((truth > 0.0) & (truth < 1.0))
    near = dilate(edge.astype(np.uint8), width) > 0
    inter = np.count_nonzero((estimate > 0.5) & (truth > 0.5))
    union = np.count_nonzero((estimate > 0.5) | (truth > 0.5))
    return float(np.abs(estimate - truth)[near].mean()), inter / max(union, 1)
