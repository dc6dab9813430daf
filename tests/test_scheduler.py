"""Parity of the numpy LCM scheduler with diffusers' LCMScheduler (timesteps, coefficients, whole trajectories)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler as RefLCMScheduler

from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.export.tiny_sd import SD15_SCHEDULER_CONFIG
from trt_bgswap.runtime.scheduler import (
    COEFFICIENT_NAMES,
    LCMConfig,
    LCMScheduler,
    StepCoefficients,
    betas_from_alphas_bar,
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
ATOL = 1e-5


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
        return cumprod_alphas(betas).astype(np.float64)

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


@pytest.mark.parametrize("name", CONFIGS)
def test_alphas_cumprod_match_diffusers(name: str) -> None:
    ref, ours = _pair(name)
    expected = ref.alphas_cumprod.numpy()
    assert ours.alphas_cumprod.dtype == np.float32
    err = np.abs(ours.alphas_cumprod.astype(np.float64) - expected)
    tol = _one_ulp_sensitivity(ours.config) + SCHEDULE_FINAL_ROUNDINGS * np.spacing(expected).astype(np.float64)
    worst = int(np.argmax(err / tol))
    assert err[worst] <= tol[worst], (
        f"alphas_cumprod[{worst}] = {ours.alphas_cumprod[worst]!r} vs diffusers {expected[worst]!r}: abs err {err[worst]:.3g} "
        f"above the rounding bound {tol[worst]:.3g} (max abs err {err.max():.3g})"
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
    for j, cname in enumerate(COEFFICIENT_NAMES):
        want = np.asarray(expected[cname], dtype=np.float32)
        # relative: c_skip is ~1e-5 at LCM's timesteps, so an absolute bound would not see it
        rel = float((np.abs(table[:, j] - want) / np.maximum(np.abs(want), np.float32(1e-30))).max())
        assert rel <= 2e-6, f"{cname}: max relative err {rel:.3g} (ours {table[:, j]}, diffusers {want})"


def _model_output(prediction_type: str, x_t: torch.Tensor, t: int, ac: torch.Tensor, x0: torch.Tensor, wobble: torch.Tensor) -> torch.Tensor:
    """A stand-in denoiser: the prediction that would recover ``x0`` from ``x_t``, perturbed."""
    sqrt_a, sqrt_b = ac[t].sqrt(), (1 - ac[t]).sqrt()
    eps = (x_t - sqrt_a * x0) / sqrt_b
    exact = {"epsilon": eps, "sample": x0, "v_prediction": sqrt_a * eps - sqrt_b * x0}[prediction_type]
    return exact + 0.1 * wobble


def _trajectory_errors(name: str, steps: int, structured: bool) -> tuple[float, float, float]:
    """Run both schedulers over a full schedule with identical model outputs and noise; (prev err, denoised err, max |ref|)."""
    ref, ours = _pair(name)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    g_ref = torch.Generator().manual_seed(1234)  # diffusers draws its step noise from this
    g_ours = torch.Generator().manual_seed(1234)  # replays the same draws for our explicit noise
    g_data = torch.Generator().manual_seed(7)
    x_ref = torch.randn(SHAPE, generator=g_data)
    x_ours = x_ref.numpy().copy()
    x0 = 2.0 * torch.randn(SHAPE, generator=g_data)  # beyond [-1, 1] so clipping and thresholding act
    err_prev = err_den = scale = 0.0
    for i, t in enumerate(ref.timesteps):
        wobble = torch.randn(SHAPE, generator=g_data)
        out = _model_output(ref.config.prediction_type, x_ref, int(t), ref.alphas_cumprod, x0, wobble) if structured else wobble * 10
        prev_ref, den_ref = ref.step(out, t, x_ref, generator=g_ref, return_dict=False)
        noise = torch.randn(SHAPE, generator=g_ours).numpy() if i < steps - 1 else None
        prev, den = ours.step(out.numpy(), int(t), x_ours, noise=noise)
        assert prev.dtype == np.float32 and den.dtype == np.float32
        err_prev = max(err_prev, float(np.abs(prev - prev_ref.numpy()).max()))
        err_den = max(err_den, float(np.abs(den - den_ref.numpy()).max()))
        scale = max(scale, float(prev_ref.abs().max()), float(den_ref.abs().max()))
        x_ref, x_ours = prev_ref, prev
    return err_prev, err_den, scale


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", CONFIGS)
def test_trajectory_matches_diffusers(name: str, steps: int) -> None:
    err_prev, err_den, scale = _trajectory_errors(name, steps, structured=True)
    assert err_prev <= ATOL and err_den <= ATOL, f"{name}, {steps} steps: prev_sample max abs err {err_prev:.3g}, denoised {err_den:.3g} (|x| <= {scale:.3g})"


@pytest.mark.parametrize("steps", STEPS)
def test_trajectory_with_unstructured_outputs_matches_to_float32_precision(steps: int) -> None:
    """Model outputs unrelated to the sample inflate x0 (|x| ~ 100): agreement is then a few float32 ulps of |x|."""
    err_prev, err_den, scale = _trajectory_errors("sd15_inpaint_pndm", steps, structured=False)
    rel = max(err_prev, err_den) / scale
    assert rel <= 2e-6, f"{steps} steps: prev max abs err {err_prev:.3g}, denoised {err_den:.3g}, relative to |x| <= {scale:.3g}: {rel:.3g}"


@pytest.mark.parametrize("timesteps", [[999, 759, 499, 259], [999, 499], [899, 599, 299, 99, 19], [999, 499, 9, 1, 0]])
def test_custom_timesteps_trajectory_matches_diffusers(timesteps: list[int]) -> None:
    ref, ours = _pair("sd15_inpaint_pndm")
    ref.set_timesteps(timesteps=timesteps)
    ours.set_timesteps(timesteps=timesteps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    g_ref, g_ours, g_data = (torch.Generator().manual_seed(s) for s in (5, 5, 6))
    x_ref = torch.randn(SHAPE, generator=g_data)
    x_ours = x_ref.numpy().copy()
    x0 = torch.randn(SHAPE, generator=g_data)
    err = 0.0
    for i, t in enumerate(timesteps):
        out = _model_output("epsilon", x_ref, t, ref.alphas_cumprod, x0, torch.randn(SHAPE, generator=g_data))
        x_ref, den_ref = ref.step(out, t, x_ref, generator=g_ref, return_dict=False)
        noise = torch.randn(SHAPE, generator=g_ours).numpy() if i < len(timesteps) - 1 else None
        x_ours, den = ours.step(out.numpy(), t, x_ours, noise=noise)
        err = max(err, float(np.abs(x_ours - x_ref.numpy()).max()), float(np.abs(den - den_ref.numpy()).max()))
    assert err <= ATOL, f"custom timesteps {timesteps}: max abs err {err:.3g}"


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
