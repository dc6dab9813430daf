"""SD1.5's VAE (``vae/``, ``AutoencoderKL``) as two ONNX graphs: encoder and decoder.

Reference: diffusers' ``AutoencoderKL.encode`` -> ``DiagonalGaussianDistribution`` and
``AutoencoderKL.decode``. The encoder graph returns the posterior's ``mean`` and
``std = exp(0.5 * clamp(logvar, -30, 20))`` exactly as that class computes them, so the
runtime draws ``mean + std * eps`` with noise it controls (diffusers samples inside).
The decoder includes ``post_quant_conv``; scaling by ``scaling_factor`` stays outside the
graphs, in the pipeline, as in diffusers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from trt_bgswap.errors import ModelError
from trt_bgswap.export.onnx_export import DEFAULT_OPSET, export_onnx
from trt_bgswap.manifest import ModelEntry
from trt_bgswap.specs import ModelSpec, vae_decoder_spec, vae_encoder_spec

log = logging.getLogger(__name__)

SUBFOLDER = "vae"
CONFIG = "config.json"
EXPORT_BATCH = 2


def vae_subfolder(src: str | Path) -> str | None:
    """``vae`` for a pipeline folder, None for a standalone ``AutoencoderKL`` folder (e.g. madebyollin/sdxl-vae-fp16-fix)."""
    src = Path(src)
    if (src / SUBFOLDER / CONFIG).is_file():
        return SUBFOLDER
    if (src / CONFIG).is_file():
        return None
    raise ModelError(f"{src}: no {SUBFOLDER}/{CONFIG} nor {CONFIG}; give a diffusers pipeline folder or an AutoencoderKL folder")


def vae_source_config(src: str | Path) -> dict[str, Any]:
    """The VAE's config.json (of a pipeline or a standalone VAE folder), checked to be an AutoencoderKL's."""
    sub = vae_subfolder(src)
    path = Path(src) / sub / CONFIG if sub else Path(src) / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable VAE config ({e}); download the VAE again") from e
    if config.get("_class_name") != "AutoencoderKL":
        raise ModelError(f"{path}: _class_name={config.get('_class_name')!r}; --vae takes a diffusers AutoencoderKL folder")
    return config


def load_vae(src: str | Path) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(src), subfolder=vae_subfolder(src), use_safetensors=True).eval()


def scale_factor(vae: Any) -> int:
    """Pixel -> latent downsampling: one halving per block but the last."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encoder_spec_for(vae: Any) -> ModelSpec:
    return vae_encoder_spec(vae.config.in_channels, vae.config.latent_channels)


def decoder_spec_for(vae: Any) -> ModelSpec:
    return vae_decoder_spec(vae.config.out_channels, vae.config.latent_channels)


def wrap_encoder(vae: Any) -> Any:
    """image in [-1, 1] -> (latent_mean, latent_std) of diffusers' DiagonalGaussianDistribution."""
    import torch

    class VaeEncoderWrapper(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            posterior = self.model.encode(sample, return_dict=False)[0]
            return posterior.mean, posterior.std

    return VaeEncoderWrapper(vae)


def wrap_decoder(vae: Any) -> Any:
    """unscaled latents -> image in about [-1, 1]."""
    import torch

    class VaeDecoderWrapper(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
            return self.model.decode(latent_sample, return_dict=False)[0]

    return VaeDecoderWrapper(vae)


def export_vae(
    src: str | Path,
    encoder_dir: str | Path,
    decoder_dir: str | Path,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
) -> tuple[ModelEntry, ModelEntry]:
    """Export the VAE encoder and decoder; returns their manifest entries."""
    import torch

    vae = load_vae(src)
    f = scale_factor(vae)
    h, w = 1, 2  # latent size of the tracing sample: small and non-square
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(EXPORT_BATCH, vae.config.in_channels, h * f, w * f, generator=gen) * 2 - 1
    latents = torch.randn(EXPORT_BATCH, vae.config.latent_channels, h, w, generator=gen)
    enc = export_onnx(wrap_encoder(vae), encoder_spec_for(vae), {"sample": image}, encoder_dir, precision, opset)
    dec = export_onnx(wrap_decoder(vae), decoder_spec_for(vae), {"latent_sample": latents}, decoder_dir, precision, opset)
    return enc, dec
