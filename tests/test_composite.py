"""The composite's guarantees (runtime/composite.py)."""

from __future__ import annotations

import numpy as np
from skimage import data
from tolerance import rounding_bound

from trt_bgswap.runtime.composite import composite, upscale_background


def test_composite_keeps_subject_pixels_exactly() -> None:
    rgb = data.astronaut()
    rng = np.random.default_rng(0)
    bg = rng.integers(0, 256, rgb.shape, dtype=np.uint8)
    alpha = rng.random(rgb.shape[:2]).astype(np.float32)
    alpha[100:300, 150:350] = 1.0
    alpha[:50] = 0.0
    out = composite(rgb, bg, alpha)
    assert np.array_equal(out[alpha >= 1.0], rgb[alpha >= 1.0])
    assert np.array_equal(out[alpha <= 0.0], bg[alpha <= 0.0])
    mid = (alpha > 0.2) & (alpha < 0.8)
    blend = alpha[mid, None] * rgb[mid] + (1 - alpha[mid, None]) * bg[mid]
    # rounded to the nearest uint8 (half a step), from a blend computed with at most 4 float32 roundings
    # of values <= 255 on each side
    assert np.abs(out[mid].astype(np.float32) - blend).max() <= 0.5 + 2 * rounding_bound(255.0, 4)


def test_upscale_background_has_input_size() -> None:
    gen = np.random.default_rng(1).random((448, 576, 3)).astype(np.float32)
    up = upscale_background(gen, 1000, 777)
    assert up.shape == (777, 1000, 3) and up.dtype == np.uint8
