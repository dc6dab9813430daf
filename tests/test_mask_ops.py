"""Mask refinement vs scikit-image's morphology, and the inpainting-mask contract."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data, filters, morphology

from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.mask_ops import MaskOptions, dilate, erode, gaussian_blur, inpaint_mask, refine_alpha


@pytest.fixture(scope="module")
def coin_mask() -> np.ndarray:
    """A real binary shape: the coins photo thresholded (Otsu)."""
    img = data.coins()
    return (img > filters.threshold_otsu(img)).astype(np.uint8)


@pytest.mark.parametrize("radius", [1, 2, 5, 9])
def test_dilate_matches_skimage_disk(coin_mask: np.ndarray, radius: int) -> None:
    ours = dilate(coin_mask, radius)
    ref = morphology.dilation(coin_mask, morphology.disk(radius))
    assert np.array_equal(ours, ref), f"dilate r={radius}: {np.count_nonzero(ours != ref)} pixels differ"


@pytest.mark.parametrize("radius", [1, 3, 7])
def test_erode_matches_skimage_disk_inside(coin_mask: np.ndarray, radius: int) -> None:
    ours = erode(coin_mask, radius)
    # skimage pads erosion with the max value too (no border erosion)
    ref = morphology.erosion(coin_mask, morphology.disk(radius))
    assert np.array_equal(ours, ref), f"erode r={radius}: {np.count_nonzero(ours != ref)} pixels differ"


def test_float_dilate_is_grey_dilation() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((60, 80)).astype(np.float32)
    ref = morphology.dilation(x, morphology.disk(4))
    np.testing.assert_array_equal(dilate(x, 4), ref)


@pytest.mark.parametrize("sigma", [1.0, 3.0, 8.0])
def test_gaussian_blur_close_to_skimage(sigma: float) -> None:
    x = data.camera().astype(np.float32) / 255.0
    ours = gaussian_blur(x, sigma)
    ref = filters.gaussian(x, sigma=sigma, mode="nearest", preserve_range=True)
    err = float(np.abs(ours - ref)[20:-20, 20:-20].mean())
    # The box-filter approximation of a Gaussian (Wells 1986), not rounding: the same on every CPU
    # (sequential float32 cumsums and scipy's float64 filter; their rounding is ~1e-6). Measured
    # 3.2e-3 at sigma=1 (the coarsest boxes), 8.8e-4 and 6.6e-4 at sigma=3 and 8.
    assert err < 4e-3, f"box-blur Gaussian sigma={sigma}: mean abs error {err:.4g} vs skimage"
    assert abs(float(ours.mean()) - float(x.mean())) < 2e-3  # normalised boxes keep the mean but for the extended edges (measured <= 3e-6)


def test_inpaint_mask_band_reaches_into_subject(coin_mask: np.ndarray) -> None:
    alpha = coin_mask.astype(np.float32)
    no_band = inpaint_mask(alpha, MaskOptions(band=0))
    band = inpaint_mask(alpha, MaskOptions(band=6))
    assert set(np.unique(band)) <= {0, 255}
    # precondition: without a band, the repaint region is exactly the background
    assert np.array_equal(no_band == 255, coin_mask == 0)
    # the band only adds repaint pixels, all within 6 px of the background
    grown = (band == 255) & (no_band == 0)
    assert grown.any()
    assert not ((band == 0) & (no_band == 255)).any()
    near_bg = morphology.dilation((coin_mask == 0).astype(np.uint8), morphology.disk(6)) > 0
    assert not (grown & ~near_bg).any()


def test_refine_threshold_grow_feather() -> None:
    alpha = np.zeros((50, 50), np.float32)
    alpha[20:30, 20:30] = 0.7
    hard = refine_alpha(alpha, MaskOptions(threshold=0.5))
    assert set(np.unique(hard)) == {0.0, 1.0}
    grown = refine_alpha(alpha, MaskOptions(threshold=0.5, grow=3))
    assert grown.sum() > hard.sum()
    shrunk = refine_alpha(alpha, MaskOptions(threshold=0.5, grow=-3))
    assert 0 < shrunk.sum() < hard.sum()
    soft = refine_alpha(alpha, MaskOptions(threshold=0.5, feather=2.0))
    assert 0 < soft.min() + 1e-9 or soft.min() == 0
    assert ((soft > 0) & (soft < 1)).sum() > 0


@pytest.mark.parametrize(
    "opts, word",
    [
        (MaskOptions(threshold=1.5), "threshold"),
        (MaskOptions(feather=-1), "feather"),
        (MaskOptions(band=-2), "band"),
        (MaskOptions(grow=10_000), "grow"),
    ],
)
def test_bad_mask_options(opts: MaskOptions, word: str) -> None:
    with pytest.raises(UsageError, match=word):
        opts.validate()
