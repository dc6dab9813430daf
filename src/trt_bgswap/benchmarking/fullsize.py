"""Full-size models with random weights, built from their published configurations (no downloads).

Random weights give real timings: latency, memory and FLOPs depend on the architecture
and the tensor sizes, not on the weight values. The configurations are the published ones (declared in :mod:`trt_bgswap.export.tiny_sd`, whose
tiny models shrink them):

- SD1.5 inpainting UNet: ``unet/config.json`` of ``runwayml/stable-diffusion-inpainting``
  (mirrored on GitHub as ``jack-op11/stable-diffusion-inpainting``): 9 input channels,
  ``block_out_channels`` [320, 640, 1280, 1280], 2 layers per block, 8 attention heads,
  cross-attention dim 768, 32 norm groups, ``sample_size`` 64 (512 px);
- its VAE: ``vae/config.json`` of the same repo: ``AutoencoderKL`` with
  ``block_out_channels`` [128, 256, 512, 512], 2 layers per block, 4 latent channels,
  32 norm groups; ``scaling_factor`` 0.18215 (diffusers' default, which that file relies on);
- its text encoder: ``text_encoder/config.json`` (CLIP ViT-L/14's text tower): hidden 768,
  intermediate 3072, 12 layers, 12 heads, 77 positions, vocabulary 49408, ``quick_gelu``;
- the LCM-LoRA: ``latent-consistency/lcm-lora-sdv1-5``'s format and rank (64, alpha 8) over
  the full UNet (:func:`trt_bgswap.export.tiny_sd.write_tiny_lcm_lora` writes that format
  for any UNet config);
- TAESD (``--vae tiny``): diffusers' ``AutoencoderTiny`` defaults, which are ``madebyollin/taesd``'s
  ``config.json`` (encoder/decoder blocks of 64 channels, (1, 3, 3, 3) / (3, 3, 3, 1) blocks,
  4 latent channels, ``scaling_factor`` 1.0; ``taesdxl`` has the same architecture);
- RMBG-1.4: :class:`trt_bgswap.export.isnet.BriaRMBG` at full width (its channel plan is
  RMBG-1.4's ``briarmbg.py``) with a 1024x1024 input (``preprocessor_config.json``, and
  ``model_input_size = [1024, 1024]`` in BRIA's example code).

The tokenizer is the project's small CLIP-format tokenizer (the real vocabulary cannot be
downloaded here); it only changes which ids a prompt becomes, not any tensor size.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trt_bgswap.atomic import write_text_atomic
from trt_bgswap.export.tiny_sd import SD15_INPAINT_UNET_CONFIG, SD15_TEXT_ENCODER_CONFIG, SD15_VAE_CONFIG

log = logging.getLogger(__name__)

RMBG_INPUT_SIZE = 1024
FULL_NAMES = ("sd-inpainting", "lcm-lora", "rmbg", "taesd")


def write_full_sd_inpainting(folder: str | Path, seed: int = 0) -> Path:
    """A diffusers SD1.5-inpainting folder at the published sizes with random seeded weights."""
    from trt_bgswap.export.tiny_sd import write_sd_inpainting

    return write_sd_inpainting(folder, SD15_TEXT_ENCODER_CONFIG, SD15_INPAINT_UNET_CONFIG, SD15_VAE_CONFIG, seed, perturb=False)


def write_full_rmbg(folder: str | Path, seed: int = 0) -> Path:
    """An RMBG-1.4 folder (config.json, preprocessor_config.json, model.safetensors) at full width."""
    from trt_bgswap.export.tiny_rmbg import RMBG14_CONFIG, random_isnet, rmbg_preprocessor_config
    from trt_bgswap.export.tiny_sd import save_safetensors, write_json

    folder = Path(folder)
    model = random_isnet(seed, channel_divisor=1)
    write_json(folder / "config.json", dict(RMBG14_CONFIG))
    write_json(folder / "preprocessor_config.json", rmbg_preprocessor_config(RMBG_INPUT_SIZE))
    save_safetensors({k: v.detach() for k, v in model.state_dict().items()}, folder / "model.safetensors", {"format": "pt"})
    return folder


def write_full_taesd(folder: Path, seed: int) -> Path:
    """TAESD at its published architecture (diffusers' AutoencoderTiny defaults), random weights: 2.4 M parameters."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny().eval().save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_full_models(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """``sd-inpainting/``, ``lcm-lora/``, ``rmbg/`` and ``taesd/`` at full size under ``folder`` (reused when complete)."""
    from trt_bgswap.export.tiny_sd import write_tiny_lcm_lora

    folder = Path(folder)
    done = folder / ".complete"
    paths = {name: folder / name for name in FULL_NAMES}
    if done.is_file():
        log.info("full-size random models already in %s", folder)
        if not (paths["taesd"] / "config.json").is_file():  # a work folder from before --vae tiny
            write_full_taesd(paths["taesd"], seed + 3)
        return paths
    write_full_sd_inpainting(paths["sd-inpainting"], seed)
    log.info("LCM-LoRA (rank 64, alpha 8) over the full UNet")
    write_tiny_lcm_lora(paths["lcm-lora"], SD15_INPAINT_UNET_CONFIG, seed=seed + 1)
    log.info("RMBG-1.4 IS-Net at full width")
    write_full_rmbg(paths["rmbg"], seed + 2)
    write_full_taesd(paths["taesd"], seed + 3)
    write_text_atomic(done, "ok\n")
    return paths
