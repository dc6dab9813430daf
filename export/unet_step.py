"""One whole LCM inpainting denoising step as one ONNX graph: UNet + guidance + scheduler arithmetic.

Reference: one iteration of diffusers' ``StableDiffusionInpaintPipeline.__call__``
denoising loop with ``LCMScheduler.step`` (Luo et al. 2023, "Latent Consistency
Models", arXiv:2310.04378), as :mod:`trt_bgswap.runtime.pipeline` runs it on the host:

1. ``sample = cat([latents, mask, masked_image_latents], dim=1)``, repeated to the
   embeddings' batch (2 under classifier-free guidance, batch order [uncond, cond]);
2. ``eps = unet(sample, timestep, encoder_hidden_states)`` (the LCM-LoRA fused in);
3. ``eps = eps_uncond + guidance * (eps_cond - eps_uncond)`` (an identity when the
   batch is 1, since both halves are the same row);
4. :func:`trt_bgswap.runtime.scheduler.lcm_step` for epsilon prediction, with the
   step's six coefficients as an input (``COEFFICIENT_NAMES`` order): on the final
   step they make ``prev_latents == denoised`` without a branch.

Every step of every schedule runs the same graph, so a TensorRT engine of it keeps
the whole loop on the device (StreamDiffusion, arXiv:2312.12491, does the same
arithmetic in torch beside its UNet engine). I/O is declared by
:func:`trt_bgswap.specs.unet_step_spec`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from trt_bgswap.errors import ModelError
from trt_bgswap.export.onnx_export import DEFAULT_OPSET, export_onnx
from trt_bgswap.export.unet import downsample_factor, load_unet
from trt_bgswap.manifest import ModelEntry
from trt_bgswap.runtime.scheduler import COEFFICIENT_NAMES, LCMConfig
from trt_bgswap.runtime.denoise import check_step_scheduler
from trt_bgswap.specs import ModelSpec, unet_step_spec

log = logging.getLogger(__name__)

SUBFOLDER = "unet_step"
EXPORT_BATCH = 2  # trace with guidance's batch so B stays symbolic
SCHEDULER_CONFIG = ("scheduler", "scheduler_config.json")


def spec_for(unet: Any, max_length: int) -> ModelSpec:
    """The step graph's spec from the UNet's config: latents have out_channels, the UNet takes 2x+1."""
    config = unet.config
    if config.cross_attention_dim is None:
        raise ModelError("the UNet has no cross_attention_dim; it is not a text-conditioned SD UNet")
    latent = int(config.out_channels)
    if int(config.in_channels) != 2 * latent + 1:
        raise ModelError(
            f"UNet in_channels={config.in_channels} with out_channels={latent}: the fused inpainting step needs "
            f"{2 * latent + 1} (latents + mask + masked-image latents); use an inpainting UNet"
        )
    return unet_step_spec(latent, max_length, int(config.cross_attention_dim), len(COEFFICIENT_NAMES))


def wrap(unet: Any) -> Any:
    """The exported module: the spec's inputs, positional, -> (prev_latents, denoised)."""
    import torch

    index = {name: i for i, name in enumerate(COEFFICIENT_NAMES)}

    class UNetStep(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            latents: torch.Tensor,
            mask: torch.Tensor,
            masked_image_latents: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            timestep: torch.Tensor,
            guidance: torch.Tensor,
            coefficients: torch.Tensor,
            noise: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            batch = encoder_hidden_states.shape[0]
            sample = torch.cat([latents, mask, masked_image_latents], dim=1).expand(batch, -1, -1, -1)
            eps = self.model(sample, timestep.expand(batch), encoder_hidden_states, return_dict=False)[0]
            uncond, cond = eps[:1], eps[-1:]
            eps = uncond + guidance.reshape(1, 1, 1, 1) * (cond - uncond)
            # rank-4 (1, 1, 1, 1) scalars broadcast without implicit rank changes (TensorRT-friendly)
            c = coefficients.reshape(-1, 1, 1, 1)

            def coef(name: str) -> torch.Tensor:
                return c[index[name] : index[name] + 1]

            x0 = (latents - coef("sqrt_beta_prod") * eps) / coef("sqrt_alpha_prod")
            denoised = coef("c_out") * x0 + coef("c_skip") * latents
            prev = coef("sqrt_alpha_prod_prev") * denoised + coef("sqrt_beta_prod_prev") * noise
            return prev, denoised

    return UNetStep(unet)


def sample_inputs(unet: Any, spec: ModelSpec) -> dict[str, Any]:
    """Tracing inputs: batch 2, a small non-square latent size the UNet accepts, no dim equal to a fixed one."""
    import torch

    step = downsample_factor(unet)
    dims = {"B": EXPORT_BATCH, "h": step, "w": 2 * step}
    gen = torch.Generator().manual_seed(0)
    sample = {t.name: torch.randn(t.resolve(dims), generator=gen) for t in spec.inputs}
    sample["timestep"] = torch.tensor([999.0])
    sample["guidance"] = torch.tensor([1.5])
    sample["coefficients"] = torch.rand(len(COEFFICIENT_NAMES), generator=gen) + 0.5  # sqrt_alpha_prod divides
    return sample


def export_unet_step_module(
    unet: Any,
    out_dir: str | Path,
    max_length: int,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> ModelEntry:
    """Export a loaded (LoRA-fused, eval) diffusers UNet as the fused step graph ``out_dir/model.onnx``.

    The caller vouches that the scheduler predicts epsilon without clipping
    (:func:`trt_bgswap.runtime.denoise.check_step_scheduler`); :func:`export_unet_step` checks it.
    """
    spec = spec_for(unet, max_length)
    return export_onnx(wrap(unet), spec, sample_inputs(unet, spec), out_dir, precision=precision, opset=opset, external_data=external_data)


def _scheduler_config(src: Path) -> LCMConfig:
    path = src.joinpath(*SCHEDULER_CONFIG)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable scheduler config ({e}); download the model again") from e
    return LCMConfig.from_dict(cfg)


def export_unet_step(
    src: str | Path,
    out_dir: str | Path,
    max_length: int,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> ModelEntry:
    """Export ``src/unet`` (LoRA fused) + the LCM step as ``out_dir/model.onnx`` (``out_dir`` = ``<export>/unet_step``).

    ``lora``/``lora_scale`` as :func:`trt_bgswap.export.unet.load_unet`; the rest as
    :func:`trt_bgswap.export.unet.export_unet_module`; ``max_length`` is the tokenizer's.
    """
    src = Path(src)
    check_step_scheduler(_scheduler_config(src))
    unet = load_unet(src, lora, lora_scale)
    log.info("%s: UNet + LCM step fused into one graph", SUBFOLDER)
    return export_unet_step_module(unet, out_dir, max_length, precision, opset, external_data)
