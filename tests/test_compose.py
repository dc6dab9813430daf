"""The composite's steps against known truth: clean edges, alpha refinement, grain, light, shadow, options.

Composites come from :mod:`trt_bgswap.benchmarking.mattes` (seeded, scikit-image photos), smaller
than the benchmark's (benchmarks/composite_quality.py has the full numbers).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from trt_bgswap.benchmarking.mattes import (
    EDGE_KINDS,
    NEW_COLOURS,
    MatteCase,
    boundary_metrics,
    make_case,
    matte_cases,
    render_alpha,
    scene_photo,
    simulated_mask,
    soft_band_error,
)
from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.compose import CompositeOptions, compose, refine_masker_alpha
from trt_bgswap.runtime.composite import composite, solid_background
from trt_bgswap.runtime.foreground import estimate_foreground
from trt_bgswap.runtime.grain import estimate_noise
from trt_bgswap.runtime.guided_filter import flip_tta, refine_alpha_to_photo
from trt_bgswap.runtime.harmonize import MAX_CHROMA_SHIFT, MAX_EXPOSURE, linear_to_srgb, plan_relight, srgb_to_linear
from trt_bgswap.runtime.mask_ops import dilate
from trt_bgswap.runtime.shadow import ShadowOptions

H, W = 240, 320
OFF = CompositeOptions(decontaminate=False, refine_alpha=False)


@pytest.fixture(scope="module")
def cases() -> list[MatteCase]:
    return matte_cases(len(EDGE_KINDS), H, W, seed=0)  # one composite per edge kind


# --- clean edges ---------------------------------------------------------------------------


def test_soft_band_error_stays_well_below_naive(cases: list[MatteCase]) -> None:
    """The acceptance asks <= 0.7x naive; pymatting's ML estimate reaches 0.49x on this set. Ours measured
    0.27x when written; the data are seeded and the solver elementwise float32 (no BLAS), so the ratio moves
    by ~1e-6 across machines and thread counts, and 0.35 fails on any regression toward pymatting's level."""
    ours = naive = 0.0
    for i, case in enumerate(cases):
        colour = NEW_COLOURS[i % len(NEW_COLOURS)]
        bg = solid_background(colour, W, H)
        naive += soft_band_error(case, composite(case.image, bg, case.alpha), colour)[0]
        ours += soft_band_error(case, compose(case.image, bg, case.alpha)[0], colour)[0]
    assert ours / naive <= 0.35, f"soft-band error {ours / naive:.3f}x naive (measured 0.27x when written)"


@pytest.mark.parametrize("options", [CompositeOptions(), CompositeOptions(grain=True), CompositeOptions(shadow=ShadowOptions(opacity=1.0))], ids=["default", "grain", "shadow"])
def test_core_pixels_are_the_input_bit_for_bit(cases: list[MatteCase], options: CompositeOptions) -> None:
    case = cases[0]
    bg = solid_background((30, 144, 255), W, H)
    out, report = compose(case.image, bg, case.alpha, options, seed=1)
    core = case.alpha >= 1.0
    assert core.sum() > 1000 and report.decontaminated > 1000
    assert np.array_equal(out[core], case.image[core])


def test_all_steps_off_equals_naive_compositing(cases: list[MatteCase]) -> None:
    case = cases[1]
    bg = np.random.default_rng(0).integers(0, 256, case.image.shape, dtype=np.uint8)
    out, report = compose(case.image, bg, case.alpha, OFF)
    assert np.array_equal(out, composite(case.image, bg, case.alpha))
    assert report.foreground is None and report.decontaminated == 0


def test_two_colour_edge_is_recovered() -> None:
    """Constant F and B under a soft ramp: the estimate's only error is the photo's 8-bit rounding (0.5 of a
    level in I) plus the output's rounding (0.5), so the composite is within 1 level of the truth; naive
    compositing is off by up to a(1-a)|F-B| (~50 levels here)."""
    alpha = np.tile(np.clip(np.linspace(-0.5, 1.5, 64, dtype=np.float32), 0, 1), (48, 1))
    alpha = np.rint(alpha * 255) / 255
    f = np.full((48, 64, 3), (200, 40, 60), np.uint8)
    b = np.full((48, 64, 3), (10, 180, 90), np.uint8)
    case = make_case("ramp", f, b, alpha.astype(np.float32))
    colour = (255, 255, 255)
    bg = solid_background(colour, 64, 48)
    truth = alpha[..., None] * f.astype(np.float32) + (1 - alpha[..., None]) * np.float32(255)
    out, _ = compose(case.image, bg, case.alpha)
    assert np.abs(out - truth).max() <= 1.0
    assert np.abs(composite(case.image, bg, case.alpha) - truth).max() > 40


def test_foreground_image_keeps_the_photo_outside_the_band(cases: list[MatteCase]) -> None:
    case = cases[2]
    fg = estimate_foreground(case.image, case.alpha)
    img = fg.image(case.image)
    outside = np.ones(H * W, bool)
    outside[fg.index] = False
    assert np.array_equal(img.reshape(-1, 3)[outside], case.image.reshape(-1, 3)[outside])
    assert fg.color.min() >= 0.0 and fg.color.max() <= 1.0


# --- alpha refinement ------------------------------------------------------------------------


def test_refined_alpha_beats_the_plain_resized_one(cases: list[MatteCase]) -> None:
    """Masker at a quarter of the photo's side (a 4000 px photo at 1024): lower boundary error, higher IoU, on average."""
    side = W // 4
    plain_err = refined_err = plain_iou = refined_iou = 0.0
    for case in cases:
        plain = simulated_mask(case.alpha, side)
        refined, info = refine_alpha_to_photo(case.image, plain, (side, side))
        assert info.applied and info.changed > 0
        e0, i0 = boundary_metrics(plain, case.alpha, 8)
        e1, i1 = boundary_metrics(refined, case.alpha, 8)
        plain_err, refined_err, plain_iou, refined_iou = plain_err + e0, refined_err + e1, plain_iou + i0, refined_iou + i1
    assert refined_err < 0.9 * plain_err and refined_iou > plain_iou


def test_refinement_leaves_far_pixels_and_small_photos_alone(cases: list[MatteCase]) -> None:
    case = cases[3]
    side = W // 4
    plain = simulated_mask(case.alpha, side)
    refined, _ = refine_alpha_to_photo(case.image, plain, (side, side))
    # The filter reaches 1 mask pixel around its weighted cells plus the bilinear footprint: < 4 mask
    # pixels = 16 photo pixels from anything soft. Beyond that the alpha must be untouched, bit for bit.
    far = dilate(((plain > 0.0) & (plain < 1.0)).astype(np.uint8), 16) == 0
    assert far.sum() > 1000 and np.array_equal(refined[far], plain[far])
    same, info = refine_alpha_to_photo(case.image, plain, (H, W))  # mask as large as the photo: nothing to sharpen
    assert not info.applied and np.array_equal(same, plain)
    kept, none = refine_masker_alpha(case.image, plain, (H // 4, W // 4), CompositeOptions(refine_alpha=False))
    assert none is None and kept is plain


def test_flip_tta_averages_the_mirrored_prediction() -> None:
    calls = []

    def masker(rgb: np.ndarray) -> np.ndarray:  # a masker biased to the left: not mirror-symmetric
        calls.append(rgb.copy())
        return np.tile(np.linspace(1.0, 0.0, rgb.shape[1], dtype=np.float32), (rgb.shape[0], 1))

    photo = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = flip_tta(masker, photo)
    assert len(calls) == 2 and np.array_equal(calls[1], photo[:, ::-1])
    np.testing.assert_allclose(out, 0.5, atol=1e-6)  # ramp + mirrored ramp = 1 everywhere; float32 rounding only


# --- grain -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, sigma", [("chelsea", 6.0), ("rocket", 10.0)])
def test_grain_brings_background_noise_to_the_subjects(name: str, sigma: float) -> None:
    photo = scene_photo(name, H, W).astype(np.float32)
    noisy = np.clip(np.rint(photo + np.random.default_rng(0).normal(0, sigma, photo.shape)), 0, 255).astype(np.uint8)
    small = scene_photo("coffee", H // 7, W // 7)  # a generated background, upscaled 7x
    from PIL import Image

    bg = np.asarray(Image.fromarray(small).resize((W, H), Image.Resampling.LANCZOS))
    alpha = render_alpha("antialiased", H, W, np.random.default_rng(3))
    out, report = compose(noisy, bg, alpha, CompositeOptions(grain=True), seed=5)
    assert report.grain is not None and report.grain.subject is not None
    after = estimate_noise(out, alpha <= 0.0)
    assert after is not None
    for s in after.sigma:  # the acceptance: within 25 % of the subject's known noise
        assert abs(s / sigma - 1.0) <= 0.25, f"background noise {after.sigma} vs known {sigma}"
    again, _ = compose(noisy, bg, alpha, CompositeOptions(grain=True), seed=5)
    other, _ = compose(noisy, bg, alpha, CompositeOptions(grain=True), seed=6)
    assert np.array_equal(out, again) and not np.array_equal(out, other)


def test_grain_off_changes_nothing(cases: list[MatteCase]) -> None:
    case = cases[4]
    bg = np.random.default_rng(1).integers(0, 256, case.image.shape, dtype=np.uint8)
    out, report = compose(case.image, bg, case.alpha, CompositeOptions(grain=False), seed=9)
    assert report.grain is None
    clear = case.alpha <= 0.0
    assert np.array_equal(out[clear], bg[clear])


# --- light -----------------------------------------------------------------------------------


def _relit(rgb: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    return np.clip(np.rint(linear_to_srgb(srgb_to_linear(rgb / 255.0) * np.asarray(gains)) * 255), 0, 255).astype(np.uint8)


def test_harmonize_reduces_a_known_cast() -> None:
    from skimage.color import deltaE_ciede2000, rgb2lab

    scene = scene_photo("astronaut", H, W)
    alpha = render_alpha("antialiased", H, W, np.random.default_rng(7))
    photo, background, truth = _relit(scene, (1.2, 1.0, 0.75)), _relit(scene, (0.8, 1.0, 1.25)), _relit(scene, (0.8, 1.0, 1.25))
    core = alpha >= 1.0
    before = deltaE_ciede2000(rgb2lab(photo[core]), rgb2lab(truth[core])).mean()
    out, report = compose(photo, background, alpha, CompositeOptions(harmonize=0.5))
    after = deltaE_ciede2000(rgb2lab(out[core]), rgb2lab(truth[core])).mean()
    assert report.harmonize is not None
    assert after < 0.8 * before, f"CIEDE2000 {before:.2f} -> {after:.2f}"


def test_harmonize_zero_is_bit_identical_to_off(cases: list[MatteCase]) -> None:
    case = cases[0]
    bg = np.random.default_rng(2).integers(0, 256, case.image.shape, dtype=np.uint8)
    off, _ = compose(case.image, bg, case.alpha, CompositeOptions())
    zero, report = compose(case.image, bg, case.alpha, CompositeOptions(harmonize=0.0))
    assert report.harmonize is None and np.array_equal(off, zero)


def test_harmonize_is_bounded_on_a_coloured_background() -> None:
    scene = scene_photo("chelsea", H, W)
    alpha = render_alpha("defocus", H, W, np.random.default_rng(1))
    green = solid_background((0, 200, 0), W, H)
    plan = plan_relight(scene, green, alpha, 1.0)
    assert plan is not None
    # the bisection stops within 2**-30 of the bound's exponent: far below any visible amount
    assert plan.white_shift <= MAX_CHROMA_SHIFT + 1e-6
    assert 1 / MAX_EXPOSURE - 1e-12 <= plan.exposure <= MAX_EXPOSURE + 1e-12


# --- shadow ----------------------------------------------------------------------------------


def test_shadow_only_darkens_outside_the_subject(cases: list[MatteCase]) -> None:
    case = cases[3]
    bg = scene_photo("coffee", H, W)
    plain, _ = compose(case.image, bg, case.alpha)
    shaded, report = compose(case.image, bg, case.alpha, CompositeOptions(shadow=ShadowOptions(offset=(0.05, 0.05), blur=0.05, opacity=0.8)))
    assert report.shadow is not None
    assert np.all(shaded <= plain)
    core = case.alpha >= 1.0
    assert np.array_equal(shaded[core], plain[core])
    assert np.count_nonzero(shaded < plain) > 500


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (CompositeOptions(harmonize=1.5), "--harmonize takes a strength between 0"),
        (CompositeOptions(harmonize=math.nan), "--harmonize"),
        (CompositeOptions(harmonize=-0.1), "--harmonize"),
        (CompositeOptions(decontaminate="yes"), "decontaminate='yes': give True or False"),  # type: ignore[arg-type]
        (CompositeOptions(shadow=ShadowOptions(opacity=0.0)), "--shadow-opacity takes a value in \\(0, 1\\]"),
        (CompositeOptions(shadow=ShadowOptions(blur=-1.0)), "--shadow-blur"),
        (CompositeOptions(shadow=ShadowOptions(offset=(0.1,))), "DX,DY"),  # type: ignore[arg-type]
        (CompositeOptions(shadow=ShadowOptions(offset=(0.0, 3.0))), "between -1 and 1"),
    ],
)
def test_invalid_options_fail_with_the_fix(options: CompositeOptions, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        options.validate()
    with pytest.raises(UsageError, match=message):
        compose(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32), options)


def test_mismatched_sizes_are_refused() -> None:
    with pytest.raises(UsageError, match="differ in size"):
        compose(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8), np.zeros((4, 4), np.float32))
