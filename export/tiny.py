"""All the tiny offline models at once: SD1.5-inpainting, its LCM-LoRA and RMBG, random seeded weights.

Each has the real architecture and file layout of its published counterpart
(``stable-diffusion-v1-5/stable-diffusion-inpainting``, ``latent-consistency/lcm-lora-sdv1-5``,
``briaai/RMBG-1.4``) at a tiny size, so tests and the offline demo exercise the same
export and runtime code as the full models.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_NAMES = ("sd-inpainting", "lcm-lora", "rmbg")


def write_tiny_models(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write ``sd-inpainting/``, ``lcm-lora/``, ``rmbg/`` and ``taesd/`` (the tiny autoencoder of ``--vae tiny``) under ``folder``."""
    from trt_bgswap.export.tiny_rmbg import write_tiny_rmbg
    from trt_bgswap.export.tiny_sd import write_tiny_lcm_lora, write_tiny_sd_inpainting
    from trt_bgswap.export.tiny_taesd import write_tiny_taesd

    folder = Path(folder)
    sd = write_tiny_sd_inpainting(folder / "sd-inpainting", seed=seed)
    unet_config = json.loads((sd / "unet" / "config.json").read_text(encoding="utf-8"))
    lora = write_tiny_lcm_lora(folder / "lcm-lora", unet_config, seed=seed + 1)
    rmbg = Path(write_tiny_rmbg(folder / "rmbg", seed=seed + 2))
    vae_config = json.loads((sd / "vae" / "config.json").read_text(encoding="utf-8"))
    taesd = write_tiny_taesd(folder / "taesd", vae_config, seed=seed + 3)
    return {"sd-inpainting": sd, "lcm-lora": lora, "rmbg": rmbg, "taesd": taesd}
