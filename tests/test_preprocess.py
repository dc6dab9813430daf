"""Inpainting inputs prepared as diffusers' VaeImageProcessor does (runtime/preprocess.py)."""

from __future__ import annotations

import numpy as np

from trt_bgswap.runtime.preprocess import resize_mask_for_model


def test_mask_resize_is_binary_like_diffusers() -> None:
    m = np.zeros((300, 400), np.uint8)
    m[:, 200:] = 255
    r = resize_mask_for_model(m, 128, 64)
    assert r.shape == (1, 1, 64, 128)
    assert set(np.unique(r)) == {0.0, 1.0}
