"""Numpy Latent Consistency Model (LCM) multi-step scheduler, no torch.

Implements multistep latent consistency sampling (Luo et al. 2023, "Latent Consistency
Models", arXiv:2310.04378, Algorithm 1 with the boundary-condition scalings of
Song et al. 2023, "Consistency Models") with diffusers' ``LCMScheduler`` contract
(``diffusers/schedulers/scheduling_lcm.py``): ``from_config``, ``set_timesteps``,
``timesteps``, ``step`` returning ``(prev_sample, denoised)``; the numbered comments in
:func:`lcm_step` and :meth:`LCMScheduler.step` follow diffusers' ``step``.

As in StreamDiffusion (Kodaira et al. 2023, arXiv:2312.12491) every per-step coefficient
(``c_skip``, ``c_out`` and the square roots of the cumulative alphas/betas at the step and
at the next step) is computed once in ``set_timesteps``; a step is then plain float32
arithmetic (:func:`lcm_step`), which an exported "UNet + LCM step" graph can mirror by
taking one row of :meth:`LCMCoefficients.table` as an input.

Differences from diffusers, all on invalid input: the caller passes the noise injected on
non-final steps (diffusers draws it with ``randn``), bad arguments raise
:class:`~trt_bgswap.errors.UsageError` instead of ``ValueError``, a timestep that is not
the next one of the schedule is an error, and custom timesteps cannot be combined with
``strength < 1`` (diffusers then re-noises the final sample; pass the shortened schedule).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from trt_bgswap.errors import ModelError, UsageError

log = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SIGMA_DATA = 0.5  # consistency-model data std in the c_skip/c_out boundary condition (diffusers' sigma_data)
COSINE_MAX_BETA = 0.999  # betas_for_alpha_bar's cap for the squaredcos_cap_v2 schedule


@dataclass(frozen=True)
class LCMConfig:
    """``LCMScheduler.__init__``'s arguments with diffusers' defaults (a scheduler_config.json's keys)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    original_inference_steps: int = 50  # the LCM distillation schedule the few-step schedule is taken from
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # accepted for compatibility: LCM's step never looks before timestep 0
    steps_offset: int = 0  # accepted for compatibility: LCM's schedule ignores it (so does diffusers')
    prediction_type: str = "epsilon"
    thresholding: bool = False  # dynamic thresholding (Imagen); unsuitable for latent diffusion
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"  # accepted for compatibility: unused by LCM
    timestep_scaling: float = 10.0  # timestep multiplier inside c_skip/c_out
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023, "Common Diffusion Noise Schedules ... Are Flawed"

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> LCMConfig:
        """Keep LCMScheduler's keys as diffusers' ``from_config`` does; other schedulers' keys are ignored."""
        used_defaults = set(cfg.get("_use_default_values", ()))
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in fields and k not in used_defaults}
        ignored = sorted(k for k in cfg if k not in fields and not k.startswith("_"))
        if ignored:
            log.debug("scheduler config keys not used by LCM: %s", ignored)
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES and self.trained_betas is None:
            raise ModelError(f"scheduler beta_schedule={self.beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ModelError(f"scheduler prediction_type={self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
        if not 1 <= self.original_inference_steps <= self.num_train_timesteps:
            raise ModelError(
                f"scheduler original_inference_steps={self.original_inference_steps}: must be between 1 and "
                f"num_train_timesteps={self.num_train_timesteps}"
            )
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ModelError(
                f"scheduler trained_betas has {len(self.trained_betas)} values; num_train_timesteps={self.num_train_timesteps} are needed"
            )


def _torch_like_linspace(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace computed in float64 then rounded (torch's float32 kernel may differ by 1 ulp)."""
    return np.linspace(start, end, n, dtype=np.float64).astype(np.float32)


def _cosine_betas(n: int) -> np.ndarray:
    """Glide's squaredcos_cap_v2 betas (Nichol & Dhariwal 2021), diffusers' betas_for_alpha_bar("cosine")."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), COSINE_MAX_BETA) for i in range(n)], dtype=np.float32)


def cumprod_alphas(betas: np.ndarray) -> np.ndarray:
    """float32 cumulative product of (1 - beta); torch's CPU cumprod accumulates float32 in double, so does this."""
    return np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32)


def rescaled_alphas_bar(betas: np.ndarray) -> np.ndarray:
    """Zero-terminal-SNR alphas_bar: sqrt(alphas_cumprod) shifted/scaled so the last one is 0 (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = np.sqrt(cumprod_alphas(betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    return alphas_bar_sqrt**2


def betas_from_alphas_bar(alphas_bar: np.ndarray) -> np.ndarray:
    """Undo the cumulative product: beta_t = 1 - alphas_bar_t / alphas_bar_(t-1)."""
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def schedule_betas(config: LCMConfig) -> np.ndarray:
    """The float32 betas of the training schedule, before any zero-SNR rescaling."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return np.asarray(config.trained_betas, dtype=np.float32)
    if config.beta_schedule == "linear":
        return _torch_like_linspace(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":  # latent diffusion's schedule: linear in sqrt(beta)
        return _torch_like_linspace(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    return _cosine_betas(n)


def alphas_cumprod(config: LCMConfig) -> np.ndarray:
    """float32 cumulative product of (1 - beta) over the training timesteps."""
    betas = schedule_betas(config)
    if config.rescale_betas_zero_snr:
        betas = betas_from_alphas_bar(rescaled_alphas_bar(betas))
    return cumprod_alphas(betas)


def boundary_scalings(timestep: int, timestep_scaling: float) -> tuple[float, float]:
    """LCM's (c_skip, c_out) at a discrete timestep: c_skip -> 1 and c_out -> 0 as t -> 0."""
    scaled = timestep * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def lcm_origin_timesteps(config: LCMConfig, strength: float) -> np.ndarray:
    """The distillation schedule (k-spaced from k-1 up) that inference timesteps are picked from."""
    k = config.num_train_timesteps // config.original_inference_steps
    return np.arange(1, int(config.original_inference_steps * strength) + 1, dtype=np.int64) * k - 1


def lcm_timesteps(config: LCMConfig, num_inference_steps: int, strength: float = 1.0) -> np.ndarray:
    """diffusers' standard LCM schedule: evenly spaced indices into the reversed distillation schedule."""
    if not 0.0 < strength <= 1.0:
        raise UsageError(f"strength={strength}: must be in (0, 1]")
    origin = lcm_origin_timesteps(config, strength)
    if not 1 <= num_inference_steps <= config.original_inference_steps:
        raise UsageError(f"steps={num_inference_steps}: must be between 1 and {config.original_inference_steps} (the LCM distillation schedule)")
    if len(origin) < num_inference_steps:
        raise UsageError(
            f"steps={num_inference_steps} with strength={strength}: only {len(origin)} distillation timesteps remain; "
            f"use at most {len(origin)} steps or strength >= {num_inference_steps / config.original_inference_steps}"
        )
    origin = origin[::-1]
    indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return origin[indices].copy()


class StepCoefficients(NamedTuple):
    """The six float32 scalars one LCM step needs (the inputs an exported step graph takes)."""

    c_skip: np.float32
    c_out: np.float32
    sqrt_alpha_prod: np.float32
    sqrt_beta_prod: np.float32
    sqrt_alpha_prod_prev: np.float32  # 1 on the final step: prev_sample == denoised
    sqrt_beta_prod_prev: np.float32  # 0 on the final step: no noise injected


COEFFICIENT_NAMES = StepCoefficients._fields


@dataclass(frozen=True)
class LCMCoefficients:
    """Per-step coefficients for one schedule, float32 arrays of shape (steps,)."""

    timesteps: np.ndarray  # int64
    c_skip: np.ndarray
    c_out: np.ndarray
    sqrt_alpha_prod: np.ndarray
    sqrt_beta_prod: np.ndarray
    sqrt_alpha_prod_prev: np.ndarray
    sqrt_beta_prod_prev: np.ndarray

    def __len__(self) -> int:
        return len(self.timesteps)

    def row(self, index: int) -> StepCoefficients:
        return StepCoefficients(*(getattr(self, name)[index] for name in COEFFICIENT_NAMES))

    def table(self) -> np.ndarray:
        """(steps, 6) float32, columns in ``COEFFICIENT_NAMES`` order."""
        return np.stack([getattr(self, name) for name in COEFFICIENT_NAMES], axis=1).astype(np.float32)


def compute_coefficients(config: LCMConfig, timesteps: np.ndarray, cumprod: np.ndarray) -> LCMCoefficients:
    """Steps 1-3 of diffusers' ``step`` for every timestep of a (non-empty) schedule at once."""
    alpha_t = cumprod[timesteps]
    # 1. the previous (next-lower) timestep; the final step uses its own, and injects no noise
    alpha_prev = cumprod[np.concatenate([timesteps[1:], timesteps[-1:]])]
    # 2. alphas and betas, in float32 as diffusers computes them from its float32 alphas_cumprod
    one = np.float32(1)
    sqrt_alpha_prev = np.sqrt(alpha_prev)
    sqrt_beta_prev = np.sqrt(one - alpha_prev)
    sqrt_alpha_prev[-1], sqrt_beta_prev[-1] = one, np.float32(0)
    # 3. boundary-condition scalings from the integer timestep (Python floats, then float32 as torch casts them)
    scalings = np.array([boundary_scalings(int(t), config.timestep_scaling) for t in timesteps], dtype=np.float64)
    return LCMCoefficients(
        timesteps=timesteps.astype(np.int64),
        c_skip=scalings[:, 0].astype(np.float32),
        c_out=scalings[:, 1].astype(np.float32),
        sqrt_alpha_prod=np.sqrt(alpha_t).astype(np.float32),
        sqrt_beta_prod=np.sqrt(one - alpha_t).astype(np.float32),
        sqrt_alpha_prod_prev=sqrt_alpha_prev.astype(np.float32),
        sqrt_beta_prod_prev=sqrt_beta_prev.astype(np.float32),
    )


def dynamic_threshold(x0: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Imagen's dynamic thresholding (Saharia et al. 2022): clamp each sample to its ratio-quantile |x0|."""
    flat = x0.reshape(x0.shape[0], -1)
    s = np.quantile(np.abs(flat), ratio, axis=1).astype(np.float32)
    s = np.minimum(np.maximum(s, np.float32(1)), np.float32(max_value))[:, None]
    return (np.clip(flat, -s, s) / s).reshape(x0.shape).astype(np.float32)


def lcm_step(
    model_output: np.ndarray,
    sample: np.ndarray,
    noise: np.ndarray | None,
    coeff: StepCoefficients,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    threshold: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One LCM step as pure float32 arithmetic: returns (prev_sample, denoised).

    A graph mirrors it with the six ``coeff`` scalars as inputs; on the final step the
    coefficients make ``prev_sample == denoised`` with no branch, and ``noise`` may be None.
    ``threshold`` is (dynamic_thresholding_ratio, sample_max_value) and takes precedence over
    ``clip_sample_range``, as in diffusers.
    """
    x = np.asarray(sample, dtype=np.float32)
    out = np.asarray(model_output, dtype=np.float32)
    # 4. predicted original sample x_0 from the model's parameterization
    if prediction_type == "epsilon":
        x0 = (x - coeff.sqrt_beta_prod * out) / coeff.sqrt_alpha_prod
    elif prediction_type == "sample":
        x0 = out
    elif prediction_type == "v_prediction":
        x0 = coeff.sqrt_alpha_prod * x - coeff.sqrt_beta_prod * out
    else:
        raise UsageError(f"prediction_type={prediction_type!r}: use one of {PREDICTION_TYPES}")
    # 5. clip or threshold x_0
    if threshold is not None:
        x0 = dynamic_threshold(x0, threshold[0], threshold[1])
    elif clip_sample_range is not None:
        x0 = np.clip(x0, np.float32(-clip_sample_range), np.float32(clip_sample_range))
    # 6. denoise with the consistency boundary condition
    denoised = coeff.c_out * x0 + coeff.c_skip * x
    # 7. re-noise to the next timestep on non-final steps
    if noise is None:
        if coeff.sqrt_beta_prod_prev != 0 or coeff.sqrt_alpha_prod_prev != 1:
            raise UsageError("noise=None on a non-final LCM step: pass the noise to inject (a standard normal array of the sample's shape)")
        return denoised, denoised
    z = np.asarray(noise, dtype=np.float32)
    if z.shape != denoised.shape:
        raise UsageError(f"noise shape {z.shape} differs from the sample's {denoised.shape}: pass noise of the sample's shape")
    return coeff.sqrt_alpha_prod_prev * denoised + coeff.sqrt_beta_prod_prev * z, denoised


class LCMScheduler:
    """diffusers' ``LCMScheduler`` on numpy, with the randomness handed in by the caller."""

    init_noise_sigma = 1.0  # LCM starts from unit-variance noise
    order = 1

    def __init__(self, config: LCMConfig | None = None) -> None:
        self.config = config if config is not None else LCMConfig()
        self.config.validate()
        self.alphas_cumprod = alphas_cumprod(self.config)
        self.timesteps = np.arange(self.config.num_train_timesteps, dtype=np.int64)[::-1].copy()
        self.num_inference_steps: int | None = None
        self.coefficients: LCMCoefficients | None = None
        self._step_index: int | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> LCMScheduler:
        """From a pipeline's scheduler_config.json dict (any scheduler class, as diffusers converts it)."""
        return cls(LCMConfig.from_dict(cfg))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Pick the schedule (standard, or custom ``timesteps``) and precompute every step's coefficients."""
        if (num_inference_steps is None) == (timesteps is None):
            raise UsageError("pass exactly one of num_inference_steps or timesteps to set_timesteps")
        if timesteps is not None:
            schedule = self._custom_timesteps(timesteps, strength)
        else:
            assert num_inference_steps is not None
            schedule = lcm_timesteps(self.config, int(num_inference_steps), strength)
        self.timesteps = schedule
        self.num_inference_steps = len(schedule)
        self.coefficients = compute_coefficients(self.config, schedule, self.alphas_cumprod)
        self._step_index = None

    def _custom_timesteps(self, timesteps: Sequence[int], strength: float) -> np.ndarray:
        schedule = np.asarray(timesteps, dtype=np.int64)
        n_train = self.config.num_train_timesteps
        if schedule.ndim != 1 or len(schedule) == 0:
            raise UsageError(f"timesteps={list(timesteps)}: pass a non-empty list of integers")
        if np.any(np.diff(schedule) >= 0):
            raise UsageError(f"timesteps={schedule.tolist()}: custom timesteps must be strictly descending")
        if schedule[0] >= n_train or schedule[-1] < 0:
            raise UsageError(f"timesteps={schedule.tolist()}: custom timesteps must lie in [0, {n_train - 1}]")
        if strength != 1.0:
            raise UsageError(f"strength={strength} with custom timesteps: pass the shortened schedule itself with strength=1.0")
        if schedule[0] != n_train - 1:
            log.warning("custom LCM schedule starts at %d, not %d; results may be off", schedule[0], n_train - 1)
        off_schedule = sorted(set(schedule.tolist()) - set(lcm_origin_timesteps(self.config, 1.0).tolist()))
        if off_schedule:
            log.warning("custom LCM timesteps %s are not on the distillation schedule; results may be off", off_schedule)
        if len(schedule) > self.config.original_inference_steps:
            log.warning("custom LCM schedule has %d steps, more than the %d it was distilled for", len(schedule), self.config.original_inference_steps)
        return schedule

    def step(
        self,
        model_output: np.ndarray,
        timestep: int,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(prev_sample, denoised) for the schedule's next timestep; ``noise`` is needed on all but the last."""
        if self.coefficients is None or self.num_inference_steps is None:
            raise UsageError("step() before set_timesteps(): call set_timesteps(steps) first")
        if self._step_index is None:
            matches = np.flatnonzero(self.timesteps == int(timestep))
            if len(matches) == 0:
                raise UsageError(f"timestep={timestep} is not in the schedule {self.timesteps.tolist()}; step through scheduler.timesteps")
            self._step_index = int(matches[0])
        i = self._step_index
        if i >= self.num_inference_steps:
            raise UsageError(f"the {self.num_inference_steps}-step schedule is finished: call set_timesteps() again")
        if int(timestep) != int(self.timesteps[i]):
            raise UsageError(f"timestep={timestep} but step {i} of the schedule is {int(self.timesteps[i])}; step through scheduler.timesteps in order")
        final = i == self.num_inference_steps - 1
        if not final and noise is None:
            raise UsageError(f"noise=None at step {i} of {self.num_inference_steps}: pass a standard normal array of the sample's shape")
        cfg = self.config
        result = lcm_step(
            model_output,
            sample,
            None if final else noise,
            self.coefficients.row(i),
            prediction_type=cfg.prediction_type,
            clip_sample_range=cfg.clip_sample_range if cfg.clip_sample else None,
            threshold=(cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else None,
        )
        self._step_index = i + 1
        return result
