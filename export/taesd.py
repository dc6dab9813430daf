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
import os
import shutil
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import make_staging_dir
from trt_bgswap.errors import ModelError
from trt_bgswap.export.onnx_export import DEFAULT_OPSET, export_onnx
from trt_bgswap.manifest import InpaintConfig, Manifest, ModelEntry, sha256_file
from trt_bgswap.specs import (
    VAE_DECODER,
    VAE_DECODER_IMAGE,
    VAE_ENCODER,
    VAE_ENCODER_SAMPLE,
    VaeDecoderIO,
    VaeEncoderIO,
    vae_decoder_spec,
    vae_encoder_spec,
)

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


def with_tiny_vae(export_dir: str | Path, src: str | Path, out_dir: str | Path, opset: int = DEFAULT_OPSET) -> Manifest:
    """A copy of an export (weights hard-linked, not copied) whose VAE graphs are the tiny autoencoder's.

    What ``export --vae tiny`` makes, without exporting the UNet and text encoder again (the
    benchmark's ``--vae tiny`` rows). The VAE device graphs, made from the full VAE, are left out.
    """
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    manifest = Manifest.load(export_dir)
    if manifest.inpaint is None:
        raise ModelError(f"{export_dir}: the export has no inpainting models; the tiny autoencoder replaces their VAE")
    inpaint, source = tiny_vae_inpaint(src, manifest.inpaint)
    stage = make_staging_dir(out_dir.parent, f".{out_dir.name}.")
    try:
        dropped = {VAE_ENCODER, VAE_DECODER, VAE_ENCODER_SAMPLE, VAE_DECODER_IMAGE}
        keep = [Path(e.file).parts[0] for n, e in manifest.models.items() if n not in dropped] + [inpaint.tokenizer_dir]
        for part in dict.fromkeys(keep):
            shutil.copytree(export_dir / part, stage / part, copy_function=os.link)
        models = {n: e for n, e in manifest.models.items() if n not in dropped}
        models[VAE_ENCODER], models[VAE_DECODER] = export_taesd(src, stage / VAE_ENCODER, stage / VAE_DECODER, manifest.extra.get("vae_precision") or "fp32", opset)
        extra = {**manifest.extra, "vae": "tiny"}
        dataclasses.replace(manifest, models=models, inpaint=inpaint, sources={**manifest.sources, "taesd": source}, extra=extra).save(stage)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return Manifest.load(out_dir)


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


def wrap_decoder(taesd: Any) -> Any:
    """latents -> image in about [-1, 1] (``AutoencoderTiny.decode``)."""
    import torch

    class TinyDecoderWrapper(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
            return self.model.decode(latent_sample, return_dict=False)[0]

    return TinyDecoderWrapper(taesd)


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
