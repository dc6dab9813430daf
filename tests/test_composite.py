"""Generation-size policy and the composite's guarantees."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data
from tolerance import rounding_bound

from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.composite import (
    check_generation_size,
    composite,
    generation_size,
    resize_mask_for_model,
    upscale_background,
)


@pytest.mark.parametrize(
    "w, h, expected",
    [
        (512, 512, (512, 512)),
        (4000, 3000, (576, 448)),  # 4:3 photo: about 512^2 pixels, multiples of 64
        (3000, 4000, (448, 576)),
        (1920, 1080, (704, 384)),
        (100, 10000, (256, 1024)),  # extreme aspect clamped to 1:4
    ],
)
def test_generation_size_policy(w: int, h: int, expected: tuple[int, int]) -> None:
    gw, gh = generation_size(w, h, default_size=512, multiple=64)
    assert (gw, gh) == expected
    assert gw % 64 == 0 and gh % 64 == 0
    assert 0.7 < gw * gh / 512**2 < 1.3


def test_check_generation_size_rejects_bad_sizes() -> None:
    check_generation_size(576, 448, 64)
    with pytest.raises(UsageError, match="multiples of 64"):
        check_generation_size(500, 448, 64)
    with pytest.raises(UsageError, match="between"):
        check_generation_size(4096, 448, 64)


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


def test_mask_resize_is_binary_like_diffusers() -> None:
    m = np.zeros((300, 400), np.uint8)
    m[:, 200:] = 255
    r = resize_mask_for_model(m, 128, 64)
    assert r.shape == (1, 1, 64, 128)
    assert set(np.unique(r)) == {0.0, 1.0}
