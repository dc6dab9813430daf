"""The tiny autoencoder (TAESD, ``madebyollin/taesd``, MIT; ``taesdxl`` for SDXL) in place of the VAE: ``--vae tiny``.

Reference: diffusers' ``AutoencoderTiny``. TAESD is distilled to work in its family's *scaled*
latent space ("the same latent API" as the VAE it replaces), so its own config says
``scaling_factor`` 1.0 and ``shift_factor`` 0.0; diffusers' pipelines apply them exactly as they
apply the full VAE's (``latents * scaling_factor`` after encode, ``/ scaling_factor`` before
decode). Its encoder is deterministic (``AutoencoderTiny.encode(...).latents``): the graphs keep
the VAE's interface (``vae_encoder_spec``: a mean and a std) with ``std = 0``, so the runtime's
VAE stages, the manifest's constants and the device graphs need no second code path; the draw
``mean + 0 * eps`` is the mean exactly. Latent channels, downsampling and scaling come from the
TAESD config and are checked against the family's VAE.

What it trades: detail (TAESD's decoder is a few convolutions; fine texture and small text
suffer). Its quality is not measured here (random weights); the benchmark measures its speed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from trt_bgswap.errors import ModelError
from trt_bgswap.export.onnx_export import DEFAULT_OPSET, export_onnx
from trt_bgswap.export.vae import wrap_decoder  # latents -> image in about [-1, 1]: AutoencoderTiny.decode has AutoencoderKL's call
from trt_bgswap.manifest import InpaintConfig, ModelEntry, sha256_file
from trt_bgswap.specs import VaeDecoderIO, VaeEncoderIO, vae_decoder_spec, vae_encoder_spec

log = logging.getLogger(__name__)

CONFIG = "config.json"
EXPORT_BATCH = 2


def read_taesd_config(src: str | Path) -> dict[str, Any]:
    path = Path(src) / CONFIG
    if not path.is_file():
        raise ModelError(f"{src}: no {CONFIG}; give the folder of a diffusers AutoencoderTiny (madebyollin/taesd, or taesdxl for SDXL)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("_class_name") not in (None, "AutoencoderTiny"):
        raise ModelError(f"{src}: {config.get('_class_name')} is not a tiny autoencoder (AutoencoderTiny)")
    return config


def downsampling(config: dict[str, Any]) -> int:
    """Pixels per latent: every encoder block but the first halves (diffusers' ``EncoderTiny``), and the decoder mirrors it."""
    blocks = config.get("encoder_block_out_channels") or config.get("block_out_channels") or (64, 64, 64, 64)
    return int(config.get("upsampling_scaling_factor", 2)) ** (len(blocks) - 1)


def latent_api(vae: dict[str, Any]) -> tuple[int, int]:
    """(latent channels, pixels per latent) of a diffusers ``AutoencoderKL`` config."""
    return int(vae["latent_channels"]), 2 ** (len(vae["block_out_channels"]) - 1)


def check_matches_vae(src: str | Path, taesd: dict[str, Any], vae_channels: int, vae_factor: int) -> None:
    """The tiny autoencoder must speak its family's latent API: the same channels and downsampling."""
    channels, factor = int(taesd.get("latent_channels", 4)), downsampling(taesd)
    if (channels, factor) != (vae_channels, vae_factor):
        raise ModelError(
            f"{src}: the tiny autoencoder has {channels} latent channels at 1/{factor} scale, the model's VAE {vae_channels} at "
            f"1/{vae_factor}; use the TAESD of this model family (taesd for SD1.x/2.x, taesdxl for SDXL)"
        )


def latent_constants(taesd: dict[str, Any]) -> tuple[float, float | None]:
    """(scaling factor, shift factor or None) the pipeline applies around the tiny autoencoder, from its config."""
    shift = float(taesd.get("shift_factor") or 0.0)
    return float(taesd.get("scaling_factor", 1.0)), (shift or None)


def tiny_vae_inpaint(src: str | Path, inpaint: InpaintConfig) -> tuple[InpaintConfig, dict[str, Any]]:
    """The inpainting constants with the tiny autoencoder's scaling, and its ``sources`` entry (path and weight hashes)."""
    taesd = read_taesd_config(src)
    check_matches_vae(src, taesd, inpaint.latent_channels, inpaint.vae_scale_factor)
    scaling, shift = latent_constants(taesd)
    files = sorted(p for p in Path(src).iterdir() if p.is_file())
    source = {"path": str(Path(src).resolve()), "sha256": {f.name: sha256_file(f) for f in files}}
    return dataclasses.replace(inpaint, vae_scaling_factor=scaling, vae_shift_factor=shift), source


def load_taesd(src: str | Path) -> Any:
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(str(src), use_safetensors=True).eval()


def wrap_encoder(taesd: Any) -> Any:
    """image in [-1, 1] -> (latents, zeros): the VAE encoder's (mean, std) interface, deterministic."""
    import torch

    class TinyEncoderWrapper(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            latents = self.model.encode(sample, return_dict=False)[0]
            return latents, torch.zeros_like(latents)

    return TinyEncoderWrapper(taesd)


def export_taesd(
    src: str | Path, encoder_dir: str | Path, decoder_dir: str | Path, precision: str = "fp32", opset: int = DEFAULT_OPSET
) -> tuple[ModelEntry, ModelEntry]:
    """Export the tiny autoencoder's encoder and decoder as the ``vae_encoder`` / ``vae_decoder`` graphs."""
    import torch

    taesd = load_taesd(src)
    cfg = taesd.config
    f = downsampling(dict(cfg))
    h, w = 1, 2  # latent size of the tracing sample: small and non-square
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(EXPORT_BATCH, cfg.in_channels, h * f, w * f, generator=gen) * 2 - 1
    latents = torch.randn(EXPORT_BATCH, cfg.latent_channels, h, w, generator=gen)
    enc_spec = vae_encoder_spec(cfg.in_channels, cfg.latent_channels)
    dec_spec = vae_decoder_spec(cfg.out_channels, cfg.latent_channels)
    enc = export_onnx(wrap_encoder(taesd), enc_spec, {VaeEncoderIO.SAMPLE: image}, encoder_dir, precision, opset)
    dec = export_onnx(wrap_decoder(taesd), dec_spec, {VaeDecoderIO.LATENTS: latents}, decoder_dir, precision, opset)
    return enc, dec
