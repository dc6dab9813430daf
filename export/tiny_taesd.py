"""A tiny random TAESD (diffusers ``AutoencoderTiny``) matching a tiny VAE's latent API, for tests and ``bench --mode tiny``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_WIDTH = 8  # channels per block: the real architecture (conv blocks, tanh clamp, nearest upsampling) at a few channels


def tiny_taesd_config(vae_config: dict[str, Any], width: int = TINY_WIDTH) -> dict[str, Any]:
    """AutoencoderTiny arguments with the VAE's latent channels and downsampling (one block per halving, plus one)."""
    blocks = len(vae_config["block_out_channels"])
    return {
        "encoder_block_out_channels": (width,) * blocks,
        "decoder_block_out_channels": (width,) * blocks,
        "num_encoder_blocks": (1,) * blocks,
        "num_decoder_blocks": (1,) * blocks,
        "latent_channels": int(vae_config["latent_channels"]),
    }


def write_tiny_taesd(folder: str | Path, vae_config: dict[str, Any], seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(**tiny_taesd_config(vae_config)).eval()
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder
