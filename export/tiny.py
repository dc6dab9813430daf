"""All the tiny offline models at once: SD1.5-, SD2- and SDXL-inpainting, LCM-LoRAs for each and RMBG, random seeded weights.

Each has the real architecture and file layout of its published counterpart
(``stable-diffusion-v1-5/stable-diffusion-inpainting``, ``latent-consistency/lcm-lora-sdv1-5``,
``diffusers/stable-diffusion-xl-1.0-inpainting-0.1``, ``latent-consistency/lcm-lora-sdxl``,
``stabilityai/stable-diffusion-2-inpainting``,
``briaai/RMBG-1.4``) at a tiny size, so tests and the offline demo exercise the same
export and runtime code as the full models.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_NAMES = ("sd-inpainting", "lcm-lora", "rmbg", "sdxl-inpainting", "lcm-lora-sdxl", "sd2-inpainting", "lcm-lora-sd2")


def write_tiny_models(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write every tiny model (:data:`TINY_NAMES`) under ``folder``; returns their paths by name."""
    from trt_bgswap.export.tiny_rmbg import write_tiny_rmbg
    from trt_bgswap.export.tiny_sd import write_tiny_lcm_lora, write_tiny_sd_inpainting
    from trt_bgswap.export.tiny_sdxl import write_tiny_sdxl_inpainting
    from trt_bgswap.export.tiny_taesd import write_tiny_taesd

    folder = Path(folder)
    sd = write_tiny_sd_inpainting(folder / "sd-inpainting", seed=seed)
    unet_config = json.loads((sd / "unet" / "config.json").read_text(encoding="utf-8"))
    lora = write_tiny_lcm_lora(folder / "lcm-lora", unet_config, seed=seed + 1)
    rmbg = Path(write_tiny_rmbg(folder / "rmbg", seed=seed + 2))
    vae_config = json.loads((sd / "vae" / "config.json").read_text(encoding="utf-8"))
    taesd = write_tiny_taesd(folder / "taesd", vae_config, seed=seed + 7)
    sdxl = write_tiny_sdxl_inpainting(folder / "sdxl-inpainting", seed=seed + 3)
    sdxl_unet = json.loads((sdxl / "unet" / "config.json").read_text(encoding="utf-8"))
    lora_sdxl = write_tiny_lcm_lora(folder / "lcm-lora-sdxl", sdxl_unet, seed=seed + 4)
    sd2 = write_tiny_sd_inpainting(folder / "sd2-inpainting", seed=seed + 5, sd2=True)
    # no LCM-LoRA is published for SD2: this one (the LCM-LoRA format over SD2's UNet) stands for a user's own distillation
    sd2_unet = json.loads((sd2 / "unet" / "config.json").read_text(encoding="utf-8"))
    lora_sd2 = write_tiny_lcm_lora(folder / "lcm-lora-sd2", sd2_unet, seed=seed + 6)
    return {
        "sd-inpainting": sd, "lcm-lora": lora, "rmbg": rmbg, "sdxl-inpainting": sdxl, "lcm-lora-sdxl": lora_sdxl,
        "sd2-inpainting": sd2, "lcm-lora-sd2": lora_sd2, "taesd": taesd,
    }
