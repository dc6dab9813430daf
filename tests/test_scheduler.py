"""Parity of the numpy LCM scheduler with diffusers' LCMScheduler (timesteps, coefficients, whole trajectories)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler as RefLCMScheduler
from tolerance import U32, assert_within

from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.export.tiny_sd import SD15_SCHEDULER_CONFIG
from trt_bgswap.runtime.scheduler import (
    COEFFICIENT_NAMES,
    LCMConfig,
    LCMScheduler,
    StepCoefficients,
    betas_from_alphas_bar,
    compute_coefficients,
    cumprod_alphas,
    lcm_step,
    rescaled_alphas_bar,
    schedule_betas,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "lcm_defaults": {},
    # SD1.5 inpainting's own scheduler_config.json (a PNDMScheduler config), as the pipeline converts it.
    "sd15_inpaint_pndm": SD15_SCHEDULER_CONFIG,
    "v_pred_zero_snr_linear": {
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "set_alpha_to_one": False,
    },
    "cosine_sample_clip": {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 1.5},
    "threshold_scaling5_orig40": {"thresholding": True, "sample_max_value": 3.0, "timestep_scaling": 5.0, "original_inference_steps": 40},
}
STEPS = [1, 2, 4, 8]
SHAPE = (2, 4, 8, 8)


def _pair(name: str) -> tuple[RefLCMScheduler, LCMScheduler]:
    return RefLCMScheduler.from_config(dict(CONFIGS[name])), LCMScheduler.from_config(CONFIGS[name])


@pytest.mark.parametrize("name", CONFIGS)
def test_from_config_reads_what_diffusers_reads(name: str) -> None:
    ref, ours = _pair(name)
    for field in LCMConfig.__dataclass_fields__:
        ref_value = ref.config[field]
        ref_value = tuple(ref_value) if isinstance(ref_value, list) else ref_value
        assert getattr(ours.config, field) == ref_value, f"{field}: ours {getattr(ours.config, field)!r} vs diffusers {ref_value!r}"
    assert ours.init_noise_sigma == ref.init_noise_sigma


def test_from_config_drops_use_default_values_like_diffusers() -> None:
    cfg = {**SD15_SCHEDULER_CONFIG, "timestep_scaling": 3.0, "_use_default_values": ["timestep_scaling"]}
    ref, ours = RefLCMScheduler.from_config(dict(cfg)), LCMScheduler.from_config(cfg)
    assert ours.config.timestep_scaling == ref.config.timestep_scaling == 10.0


def _one_ulp_sensitivity(config: LCMConfig) -> np.ndarray:
    """Per timestep, how far alphas_cumprod moves when each float32 intermediate a kernel may round differently moves by one ulp.

    diffusers computes the schedule with torch float32 kernels: ``linspace`` is not correctly
    rounded (a beta may differ by one ulp, which shows as a one-ulp difference of ``1 - beta``
    after rounding) and, for zero-terminal-SNR, the element-wise ``sqrt``/``**2`` vector paths
    may differ by one ulp from numpy's. Each such difference moves the result by the
    finite-difference sensitivity computed here; in the worst case they all add up (an L1 sum
    over the perturbed elements). The bound follows from the schedule's arithmetic alone, not
    from the CPU that ran it.
    """
    alphas = (np.float32(1) - schedule_betas(config)).astype(np.float32)
    up = np.float32(np.inf)

    def result(a: np.ndarray, bar: np.ndarray | None = None) -> np.ndarray:
        betas = (np.float32(1) - a).astype(np.float32)
        if config.rescale_betas_zero_snr:
            betas = betas_from_alphas_bar(rescaled_alphas_bar(betas) if bar is None else bar)
        # cumprod_alphas before its final float32 rounding: one alpha's one-ulp nudge moves a late
        # product by far less than the product's own ulp, and a float32 difference would read 0
        # there (SCHEDULE_FINAL_ROUNDINGS covers the final rounding itself)
        return np.cumprod((np.float32(1) - betas).astype(np.float64))

    def l1(values: np.ndarray, run: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        total = np.zeros_like(base)
        for i in range(len(values)):
            nudged = values.copy()
            nudged[i] = np.nextafter(nudged[i], up)
            total += np.abs(run(nudged) - base)
        return total

    base = result(alphas)
    sensitivity = l1(alphas, result)
    if config.rescale_betas_zero_snr:
        bar = rescaled_alphas_bar((np.float32(1) - alphas).astype(np.float32))
        sensitivity += l1(bar, lambda b: result(alphas, b))
    return sensitivity


# The float32 operations after the perturbed intermediates (1 - beta, the division undoing the
# cumulative product, the final rounding of the double-accumulated product) round once each.
SCHEDULE_FINAL_ROUNDINGS = 4


@functools.cache
def _alphas_cumprod_bound(name: str) -> np.ndarray:
    """Per timestep, how far our alphas_cumprod may be from diffusers' (see test_alphas_cumprod_match_diffusers)."""
    ours = LCMScheduler.from_config(CONFIGS[name])
    return _one_ulp_sensitivity(ours.config) + SCHEDULE_FINAL_ROUNDINGS * np.spacing(ours.alphas_cumprod).astype(np.float64)


def _sqrt_bound(value: np.ndarray, err: np.ndarray) -> np.ndarray:
    """|sqrt(v + e) - sqrt(v)| <= min(e / (2 sqrt v), sqrt e): the derivative bound, and concavity's near 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(value > 0, err / (2 * np.sqrt(np.maximum(value, 0))), np.inf)
    return np.minimum(slope, np.sqrt(err))


def _coefficient_bounds(name: str, sched: LCMScheduler) -> np.ndarray:
    """(steps, 6) bounds on |ours - diffusers'| for the coefficient table of ``sched`` (set_timesteps done).

    ``sqrt(a_t)`` and ``sqrt(1 - a_t)`` inherit alphas_cumprod's bound through the square root
    (``1 - a_t`` may round once more, an ulp of it); each result then rounds once, so a value
    on the other side of a rounding boundary is one ulp off. ``c_skip``/``c_out`` are the same
    float64 formula rounded to float32 on both sides: one ulp. The final row's 1 and 0 are exact.
    """
    assert sched.coefficients is not None
    ac = sched.alphas_cumprod.astype(np.float64)
    ac_bound = _alphas_cumprod_bound(name)
    ts = sched.coefficients.timesteps
    table = sched.coefficients.table().astype(np.float64)
    ulp = np.spacing(np.abs(table.astype(np.float32))).astype(np.float64)
    bounds = np.empty_like(table)
    for j, t in ((2, ts), (4, np.concatenate([ts[1:], ts[-1:]]))):
        a, e = ac[t], ac_bound[t]
        one_minus = np.spacing(np.float32(1) - sched.alphas_cumprod[t]).astype(np.float64)
        bounds[:, j] = _sqrt_bound(a, e) + ulp[:, j]
        bounds[:, j + 1] = _sqrt_bound(1 - a, e + one_minus) + ulp[:, j + 1]
    bounds[:, 0:2] = ulp[:, 0:2]
    bounds[-1, 4:6] = 0.0  # exact 1 and 0: the final step only denoises
    return bounds


@pytest.mark.numerics
@pytest.mark.parametrize("name", CONFIGS)
def test_alphas_cumprod_match_diffusers(name: str) -> None:
    ref, ours = _pair(name)
    expected = ref.alphas_cumprod.numpy()
    assert ours.alphas_cumprod.dtype == np.float32
    err = np.abs(ours.alphas_cumprod.astype(np.float64) - expected)
    tol = _one_ulp_sensitivity(ours.config) + SCHEDULE_FINAL_ROUNDINGS * np.spacing(expected).astype(np.float64)
    worst = int(np.argmax(err / tol))
    assert_within(
        err[worst], tol[worst], f"alphas_cumprod[{worst}] = {ours.alphas_cumprod[worst]!r} vs diffusers {expected[worst]!r} (max abs err {err.max():.3g})"
    )


def test_alphas_cumprod_bound_is_tight_enough_to_see_a_wrong_schedule() -> None:
    """A schedule slip (scaled_linear read as linear) is orders of magnitude beyond the rounding bound."""
    cfg = LCMScheduler.from_config(CONFIGS["sd15_inpaint_pndm"]).config
    wrong = cumprod_alphas(np.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=np.float32))
    tol = _one_ulp_sensitivity(cfg) + SCHEDULE_FINAL_ROUNDINGS * np.spacing(wrong)
    assert float((np.abs(wrong - LCMScheduler.from_config(CONFIGS["sd15_inpaint_pndm"]).alphas_cumprod) / tol).max()) > 1e3


@pytest.mark.parametrize("strength", [1.0, 0.6, 0.25])
@pytest.mark.parametrize("steps", STEPS + [16])
@pytest.mark.parametrize("name", ["lcm_defaults", "sd15_inpaint_pndm", "threshold_scaling5_orig40"])
def test_timesteps_equal_diffusers(name: str, steps: int, strength: float) -> None:
    ref, ours = _pair(name)
    if steps > int(ours.config.original_inference_steps * strength):
        with pytest.raises(ValueError):
            ref.set_timesteps(steps, strength=strength)
        with pytest.raises(UsageError, match=f"steps={steps}"):
            ours.set_timesteps(steps, strength=strength)
        return
    ref.set_timesteps(steps, strength=strength)
    ours.set_timesteps(steps, strength=strength)
    assert ours.timesteps.dtype == np.int64
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy(), err_msg=f"{name} steps={steps} strength={strength}")


def test_timesteps_equal_diffusers_at_max_steps() -> None:
    ref, ours = _pair("sd15_inpaint_pndm")
    ref.set_timesteps(50)
    ours.set_timesteps(50)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


@pytest.mark.numerics
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", CONFIGS)
def test_coefficients_match_diffusers(name: str, steps: int) -> None:
    ref, ours = _pair(name)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    coeff = ours.coefficients
    assert coeff is not None and len(coeff) == steps
    ts = ref.timesteps.tolist()
    ac = ref.alphas_cumprod
    expected = {name: [] for name in COEFFICIENT_NAMES}
    for i, t in enumerate(ts):
        c_skip, c_out = ref.get_scalings_for_boundary_condition_discrete(t)
        expected["c_skip"].append(c_skip)
        expected["c_out"].append(c_out)
        expected["sqrt_alpha_prod"].append(float(ac[t].sqrt()))
        expected["sqrt_beta_prod"].append(float((1 - ac[t]).sqrt()))
        final = i == steps - 1  # diffusers skips the re-noising there; our row makes it the identity
        expected["sqrt_alpha_prod_prev"].append(1.0 if final else float(ac[ts[i + 1]].sqrt()))
        expected["sqrt_beta_prod_prev"].append(0.0 if final else float((1 - ac[ts[i + 1]]).sqrt()))
    table = coeff.table()
    assert table.shape == (steps, len(COEFFICIENT_NAMES)) and table.dtype == np.float32
    want = np.stack([np.asarray(expected[cname], dtype=np.float32) for cname in COEFFICIENT_NAMES], axis=1).astype(np.float64)
    err = np.abs(table.astype(np.float64) - want)
    bound = _coefficient_bounds(name, ours)
    worst = np.unravel_index(np.argmax(err / np.where(bound > 0, bound, np.inf) + np.where((bound == 0) & (err > 0), np.inf, 0)), err.shape)
    assert_within(err[worst], bound[worst], f"{COEFFICIENT_NAMES[worst[1]]} at step {worst[0]}: ours {table[worst]!r}, diffusers {want[worst]!r}")


def test_coefficient_bounds_see_an_off_by_one_timestep() -> None:
    """Coefficients read one timestep off (t-1 for t) are far beyond the rounding bounds."""
    sched = LCMScheduler.from_config(CONFIGS["sd15_inpaint_pndm"])
    sched.set_timesteps(4)
    assert sched.coefficients is not None
    shifted = compute_coefficients(sched.config, sched.coefficients.timesteps - 1, sched.alphas_cumprod).table()
    bound = _coefficient_bounds("sd15_inpaint_pndm", sched)
    cols = [COEFFICIENT_NAMES.index(c) for c in ("c_skip", "sqrt_alpha_prod", "sqrt_beta_prod")]  # c_out is 1.0 in float32 here
    moved = np.abs(shifted - sched.coefficients.table())[:, cols]
    assert (moved > 100 * bound[:, cols]).all(), f"off-by-one moved coefficients by {moved} against bounds {bound[:, cols]}"


def _model_output(prediction_type: str, x_t: torch.Tensor, t: int, ac: torch.Tensor, x0: torch.Tensor, wobble: torch.Tensor) -> torch.Tensor:
    """A stand-in denoiser: the prediction that would recover ``x0`` from ``x_t``, perturbed."""
    sqrt_a, sqrt_b = ac[t].sqrt(), (1 - ac[t]).sqrt()
    eps = (x_t - sqrt_a * x0) / sqrt_b
    exact = {"epsilon": eps, "sample": x0, "v_prediction": sqrt_a * eps - sqrt_b * x0}[prediction_type]
    return exact + 0.1 * wobble


# Float32 operations in one LCM step (x0: 3, denoised: 3, re-noise: 3; clipping/thresholding
# and the quantile add a few, covered by this count's slack being per input). The step is
# backward stable: its roundings act as relative perturbations of at most this many u on its
# inputs and coefficients (Higham 2002, section 3.1), whatever order or FMA a kernel uses.
STEP_ROUNDINGS = 9


def _step_error_bound(
    sched: LCMScheduler, i: int, row_bound: np.ndarray, out: np.ndarray, x: np.ndarray, x_err: np.ndarray, noise: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """First-order per-element bounds on (prev_sample, denoised) of step ``i`` vs diffusers'.

    Sources: the incoming sample's error ``x_err``, the coefficients' bounds ``row_bound`` and
    the step's own roundings (``STEP_ROUNDINGS`` u of every input and coefficient). Each is
    carried through our own ``lcm_step`` by a finite difference (the step is affine in each,
    piecewise so with clipping: the larger of +/- is kept) and the effects are summed, as the
    schedule's bound sums its one-ulp sensitivities.
    """
    assert sched.coefficients is not None
    cfg = sched.config
    row = np.array(sched.coefficients.row(i), dtype=np.float64)
    ku = STEP_ROUNDINGS * U32

    def step(out_: np.ndarray, x_: np.ndarray, noise_: np.ndarray | None, coeff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return lcm_step(
            out_.astype(np.float32),
            x_.astype(np.float32),
            None if noise_ is None else noise_.astype(np.float32),
            StepCoefficients(*coeff.astype(np.float32)),
            prediction_type=cfg.prediction_type,
            clip_sample_range=cfg.clip_sample_range if cfg.clip_sample else None,
            threshold=(cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None,
        )

    base = [np.asarray(v, np.float64) for v in step(out, x, noise, row)]
    total = [np.zeros_like(base[0]), np.zeros_like(base[1])]

    def add(run: Callable[[float], tuple[np.ndarray, np.ndarray]]) -> None:
        moved = [np.maximum(np.abs(np.asarray(p, np.float64) - b), np.abs(np.asarray(m, np.float64) - b)) for p, m, b in zip(run(1.0), run(-1.0), base)]
        total[0] += moved[0]
        total[1] += moved[1]

    x64, out64 = x.astype(np.float64), out.astype(np.float64)
    add(lambda s: step(out64, x64 + s * (x_err + ku * np.abs(x64)), noise, row))
    add(lambda s: step(out64 + s * ku * np.abs(out64), x64, noise, row))
    if noise is not None:
        z = noise.astype(np.float64)
        add(lambda s: step(out64, x64, z + s * ku * np.abs(z), row))
    for j in range(len(row)):
        if noise is None and j >= 4:  # the final row's re-noise coefficients are exact constants
            continue
        delta = np.zeros_like(row)
        delta[j] = row_bound[j] + ku * abs(row[j])
        add(lambda s, d=delta: step(out64, x64, noise, row + s * d))
    return total[0], total[1]


def _worst(err: np.ndarray, bound: np.ndarray, worst: tuple[float, float]) -> tuple[float, float]:
    """The (err, bound) pair with the larger err / bound of ``worst`` and the element-wise worst of these arrays."""
    i = np.unravel_index(np.argmax(err / np.maximum(bound, np.finfo(np.float64).tiny)), err.shape)
    return max(worst, (float(err[i]), float(bound[i])), key=lambda p: p[0] / max(p[1], np.finfo(np.float64).tiny))


def _trajectory_errors(name: str, steps: int, structured: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    """Run both schedulers over a full schedule with identical model outputs and noise.

    Returns the worst (err, bound) of prev_sample and of denoised over all steps and elements,
    the bound propagated step by step with :func:`_step_error_bound`.
    """
    ref, ours = _pair(name)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    coefficient_bounds = _coefficient_bounds(name, ours)
    g_ref = torch.Generator().manual_seed(1234)  # diffusers draws its step noise from this
    g_ours = torch.Generator().manual_seed(1234)  # replays the same draws for our explicit noise
    g_data = torch.Generator().manual_seed(7)
    x_ref = torch.randn(SHAPE, generator=g_data)
    x_ours = x_ref.numpy().copy()
    x_err = np.zeros(SHAPE)
    x0 = 2.0 * torch.randn(SHAPE, generator=g_data)  # beyond [-1, 1] so clipping and thresholding act
    worst_prev = worst_den = (0.0, 1.0)
    for i, t in enumerate(ref.timesteps):
        wobble = torch.randn(SHAPE, generator=g_data)
        out = _model_output(ref.config.prediction_type, x_ref, int(t), ref.alphas_cumprod, x0, wobble) if structured else wobble * 10
        prev_ref, den_ref = ref.step(out, t, x_ref, generator=g_ref, return_dict=False)
        noise = torch.randn(SHAPE, generator=g_ours).numpy() if i < steps - 1 else None
        prev, den = ours.step(out.numpy(), int(t), x_ours, noise=noise)
        assert prev.dtype == np.float32 and den.dtype == np.float32
        prev_bound, den_bound = _step_error_bound(ours, i, coefficient_bounds[i], out.numpy(), x_ours, x_err, noise)
        worst_prev = _worst(np.abs(prev - prev_ref.numpy().astype(np.float64)), prev_bound, worst_prev)
        worst_den = _worst(np.abs(den - den_ref.numpy().astype(np.float64)), den_bound, worst_den)
        x_ref, x_ours, x_err = prev_ref, prev, prev_bound
    return worst_prev, worst_den


@pytest.mark.numerics
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", CONFIGS)
def test_trajectory_matches_diffusers(name: str, steps: int) -> None:
    (err_prev, tol_prev), (err_den, tol_den) = _trajectory_errors(name, steps, structured=True)
    assert_within(err_prev, tol_prev, f"{name}, {steps} steps: prev_sample")
    assert_within(err_den, tol_den, f"{name}, {steps} steps: denoised")


@pytest.mark.numerics
@pytest.mark.parametrize("steps", STEPS)
def test_trajectory_with_unstructured_outputs_matches_to_float32_precision(steps: int) -> None:
    """Model outputs unrelated to the sample inflate x0 (|x| ~ 100): the propagated bound scales with it."""
    (err_prev, tol_prev), (err_den, tol_den) = _trajectory_errors("sd15_inpaint_pndm", steps, structured=False)
    assert_within(err_prev, tol_prev, f"{steps} steps: prev_sample")
    assert_within(err_den, tol_den, f"{steps} steps: denoised")


def test_trajectory_bound_sees_a_wrong_coefficient() -> None:
    """A step that reads sqrt(alpha_prod) of the next timestep moves the sample far beyond the propagated bound."""
    _, ours = _pair("sd15_inpaint_pndm")
    ours.set_timesteps(4)
    assert ours.coefficients is not None
    rng = np.random.default_rng(3)
    x, out, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    prev_bound, _ = _step_error_bound(ours, 0, _coefficient_bounds("sd15_inpaint_pndm", ours)[0], out, x, np.zeros(SHAPE), noise)
    good = ours.coefficients.row(0)
    slipped = good._replace(sqrt_alpha_prod=ours.coefficients.sqrt_alpha_prod[1])
    moved = np.abs(lcm_step(out, x, noise, slipped)[0] - lcm_step(out, x, noise, good)[0])
    assert float((moved / prev_bound).max()) > 1e3, f"a wrong sqrt_alpha_prod moved prev_sample by {moved.max():.3g} against bounds {prev_bound.max():.3g}"


@pytest.mark.parametrize("timesteps", [[999, 759, 499, 259], [999, 499], [899, 599, 299, 99, 19], [999, 499, 9, 1, 0]])
def test_custom_timesteps_trajectory_matches_diffusers(timesteps: list[int]) -> None:
    ref, ours = _pair("sd15_inpaint_pndm")
    ref.set_timesteps(timesteps=timesteps)
    ours.set_timesteps(timesteps=timesteps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    coefficient_bounds = _coefficient_bounds("sd15_inpaint_pndm", ours)
    g_ref, g_ours, g_data = (torch.Generator().manual_seed(s) for s in (5, 5, 6))
    x_ref = torch.randn(SHAPE, generator=g_data)
    x_ours = x_ref.numpy().copy()
    x_err = np.zeros(SHAPE)
    x0 = torch.randn(SHAPE, generator=g_data)
    worst = (0.0, 1.0)
    for i, t in enumerate(timesteps):
        out = _model_output("epsilon", x_ref, t, ref.alphas_cumprod, x0, torch.randn(SHAPE, generator=g_data))
        x_ref, den_ref = ref.step(out, t, x_ref, generator=g_ref, return_dict=False)
        noise = torch.randn(SHAPE, generator=g_ours).numpy() if i < len(timesteps) - 1 else None
        prev_bound, den_bound = _step_error_bound(ours, i, coefficient_bounds[i], out.numpy(), x_ours, x_err, noise)
        x_ours, den = ours.step(out.numpy(), t, x_ours, noise=noise)
        worst = _worst(np.abs(x_ours - x_ref.numpy().astype(np.float64)), prev_bound, worst)
        worst = _worst(np.abs(den - den_ref.numpy().astype(np.float64)), den_bound, worst)
        x_err = prev_bound
    assert_within(*worst, f"custom timesteps {timesteps}: prev_sample / denoised")


@pytest.mark.parametrize("name", CONFIGS)
def test_pure_step_from_table_rows_equals_scheduler_step(name: str) -> None:
    """What an exported step graph computes from one table row is bit-identical to step()."""
    sched = LCMScheduler.from_config(CONFIGS[name])
    sched.set_timesteps(4)
    assert sched.coefficients is not None
    table = sched.coefficients.table()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    x_pure = x.copy()
    cfg = sched.config
    for i, t in enumerate(sched.timesteps):
        out = rng.standard_normal(SHAPE, dtype=np.float32)
        noise = rng.standard_normal(SHAPE, dtype=np.float32)  # passed on the final step too: the row zeroes it
        x, den = sched.step(out, int(t), x, noise=noise if i < 3 else None)
        row = StepCoefficients(*table[i])
        x_pure, den_pure = lcm_step(
            out,
            x_pure,
            noise,
            row,
            prediction_type=cfg.prediction_type,
            clip_sample_range=cfg.clip_sample_range if cfg.clip_sample else None,
            threshold=(cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None,
        )
        np.testing.assert_array_equal(x_pure, x, err_msg=f"prev_sample at step {i}")
        np.testing.assert_array_equal(den_pure, den, err_msg=f"denoised at step {i}")
    np.testing.assert_array_equal(x, den)  # the final step returns the denoised sample


@pytest.mark.parametrize(
    ("steps", "strength", "match"),
    [
        (0, 1.0, "steps=0"),
        (51, 1.0, "steps=51"),
        (-2, 1.0, "steps=-2"),
        (4, 0.0, "strength=0.0"),
        (4, 1.5, "strength=1.5"),
        (4, -0.1, "strength=-0.1"),
        (8, 0.1, "steps=8 with strength=0.1"),
    ],
)
def test_invalid_set_timesteps_raise_usage_error(steps: int, strength: float, match: str) -> None:
    sched = LCMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    with pytest.raises(UsageError, match=match):
        sched.set_timesteps(steps, strength=strength)


@pytest.mark.parametrize(
    ("timesteps", "strength", "match"),
    [
        ([999, 999, 499], 1.0, "strictly descending"),
        ([499, 999], 1.0, "strictly descending"),
        ([1000, 499], 1.0, r"lie in \[0, 999\]"),
        ([999, 499, -1], 1.0, r"lie in \[0, 999\]"),
        ([999, 499], 0.5, "strength=0.5 with custom timesteps"),
    ],
)
def test_invalid_custom_timesteps_raise_usage_error(timesteps: list[int], strength: float, match: str) -> None:
    sched = LCMScheduler()
    with pytest.raises(UsageError, match=match):
        sched.set_timesteps(timesteps=timesteps, strength=strength)


def test_custom_timesteps_off_schedule_warn(caplog: pytest.LogCaptureFixture) -> None:
    sched = LCMScheduler()
    with caplog.at_level(logging.WARNING, logger="trt_bgswap.runtime.scheduler"):
        sched.set_timesteps(timesteps=[999, 500])
    assert "[500]" in caplog.text


def test_step_misuse_raises_usage_error() -> None:
    sched = LCMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    x = np.zeros(SHAPE, dtype=np.float32)
    with pytest.raises(UsageError, match="set_timesteps"):
        sched.step(x, 999, x, noise=x)
    sched.set_timesteps(2)
    t0, t1 = (int(t) for t in sched.timesteps)
    with pytest.raises(UsageError, match="timestep=5 is not in the schedule"):
        sched.step(x, 5, x, noise=x)
    with pytest.raises(UsageError, match="noise=None at step 0"):
        sched.step(x, t0, x)
    with pytest.raises(UsageError, match="noise shape"):
        sched.step(x, t0, x, noise=x[:1])
    sched.set_timesteps(2)
    sched.step(x, t0, x, noise=x)
    with pytest.raises(UsageError, match=f"timestep={t0} but step 1"):
        sched.step(x, t0, x, noise=x)
    sched.step(x, t1, x)
    with pytest.raises(UsageError, match="finished"):
        sched.step(x, t1, x)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
        ({"prediction_type": "flow"}, "prediction_type='flow'"),
        ({"original_inference_steps": 2000}, "original_inference_steps=2000"),
        ({"trained_betas": [0.01, 0.02]}, "trained_betas has 2 values"),
    ],
)
def test_bad_config_raises_model_error(cfg: dict[str, Any], match: str) -> None:
    with pytest.raises(ModelError, match=match):
        LCMScheduler.from_config(cfg)


def test_trained_betas_match_diffusers() -> None:
    betas = np.linspace(0.0002, 0.015, 1000).tolist()
    cfg = {"trained_betas": betas}
    ref, ours = RefLCMScheduler.from_config(dict(cfg)), LCMScheduler.from_config(cfg)
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
