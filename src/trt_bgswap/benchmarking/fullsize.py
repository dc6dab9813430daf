"""Full-size models with random weights, built from their published configurations (no downloads).

Random weights give real timings: latency, memory and FLOPs depend on the architecture
and the tensor sizes, not on the weight values. The configurations are the published ones
(declared in :mod:`trt_bgswap.export.tiny_sd` and :mod:`trt_bgswap.export.tiny_sdxl`, whose
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
from typing import Any

from trt_bgswap.atomic import write_text_atomic
from trt_bgswap.export.tiny_sd import SD15_INPAINT_UNET_CONFIG, SD15_TEXT_ENCODER_CONFIG, SD15_VAE_CONFIG
from trt_bgswap.export.tiny_sdxl import SDXL_INPAINT_UNET_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG, SDXL_VAE_CONFIG

log = logging.getLogger(__name__)

RMBG_INPUT_SIZE = 1024
FULL_NAMES = ("sd-inpainting", "lcm-lora", "rmbg", "taesd")


def _write_diffusers_module(folder: Path, cls: Any, config: dict[str, Any]) -> None:
    """A diffusers model folder (config.json + diffusion_pytorch_model.safetensors) with random weights; freed on return."""
    from trt_bgswap.export.tiny_sd import save_safetensors, write_json

    module = cls.from_config(config).eval()
    write_json(folder / "config.json", dict(module.config))
    save_safetensors(module.state_dict(), folder / "diffusion_pytorch_model.safetensors")


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


def write_full_sdxl_inpainting(folder: str | Path, seed: int = 0) -> Path:
    """A diffusers SDXL-inpainting folder at the published sizes (:data:`SDXL_INPAINT_UNET_CONFIG` ...) with random weights.

    One module at a time is built, saved and freed: the UNet alone is 2.6e9 parameters (10.3 GB in fp32).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trt_bgswap.export.tiny_sd import _tokenizer_ids, save_safetensors, write_json
    from trt_bgswap.export.tiny_sdxl import SDXL_INPAINT_MODEL_INDEX, SDXL_SCHEDULER_CONFIG
    from trt_bgswap.export.tiny_tokenizer import write_tiny_clip_tokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    for sub, pad, cls, config in (
        ("text_encoder", None, CLIPTextModel, SD15_TEXT_ENCODER_CONFIG),
        ("text_encoder_2", "!", CLIPTextModelWithProjection, SDXL_TEXT_ENCODER_2_CONFIG),
    ):
        tok = Path(write_tiny_clip_tokenizer(folder / sub.replace("text_encoder", "tokenizer"), **({"pad_token": pad} if pad else {})))
        _, bos, eos, pad_id, _ = _tokenizer_ids(tok)
        te_config = CLIPTextConfig(**config, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad_id)
        log.info("%s (%s, random weights)", sub, cls.__name__)
        te = cls(te_config).eval()
        d = te_config.to_dict()
        d["architectures"] = [cls.__name__]
        write_json(folder / sub / "config.json", d)
        save_safetensors(te.state_dict(), folder / sub / "model.safetensors", {"format": "pt"})
        del te
    log.info("UNet (SDXL inpainting, 9 channels, 2.6e9 parameters, random weights)")
    _write_diffusers_module(folder / "unet", UNet2DConditionModel, SDXL_INPAINT_UNET_CONFIG)
    log.info("VAE (SDXL, random weights)")
    _write_diffusers_module(folder / "vae", AutoencoderKL, SDXL_VAE_CONFIG)
    write_json(folder / "scheduler" / "scheduler_config.json", dict(SDXL_SCHEDULER_CONFIG))
    write_json(folder / "model_index.json", dict(SDXL_INPAINT_MODEL_INDEX))
    return folder


def write_full_models(folder: str | Path, seed: int = 0, family: str = "sd15") -> dict[str, Path]:
    """The family's inpainting model and LCM-LoRA, and ``rmbg/``, at full size under ``folder`` (reused when complete).

    ``sd15``: ``sd-inpainting/`` + ``lcm-lora/``; ``sdxl``: ``sdxl-inpainting/`` + ``lcm-lora-sdxl/``
    (the LCM-LoRA format, rank 64, over SDXL's UNet: latent-consistency/lcm-lora-sdxl's layout).
    """
    from trt_bgswap.export.tiny_sd import write_tiny_lcm_lora

    folder = Path(folder)
    inpaint, lora = ("sd-inpainting", "lcm-lora") if family == "sd15" else ("sdxl-inpainting", "lcm-lora-sdxl")
    writer, unet_config = (write_full_sd_inpainting, SD15_INPAINT_UNET_CONFIG) if family == "sd15" else (write_full_sdxl_inpainting, SDXL_INPAINT_UNET_CONFIG)
    paths = {inpaint: folder / inpaint, lora: folder / lora, "rmbg": folder / "rmbg"}
    if family == "sd15":
        paths["taesd"] = folder / "taesd"  # the --vae tiny rows (TAESD decodes SD1/SD2 latents; SDXL's would be taesdxl)
    done = {name: folder / f".complete-{name}" for name in paths}
    if family == "sd15" and (folder / ".complete").is_file():  # written by earlier versions for the SD1.5 set
        for name in ("sd-inpainting", "lcm-lora", "rmbg"):
            write_text_atomic(done[name], "ok\n")
    for name, write in (
        (inpaint, lambda: writer(paths[inpaint], seed)),
        (lora, lambda: write_tiny_lcm_lora(paths[lora], unet_config, seed=seed + 1)),
        ("rmbg", lambda: write_full_rmbg(paths["rmbg"], seed + 2)),
        ("taesd", lambda: write_full_taesd(paths["taesd"], seed + 3)),
    ):
        if name not in paths:
            continue
        if done[name].is_file():
            log.info("full-size random %s already in %s", name, paths[name])
            continue
        log.info("writing full-size random %s", name)
        write()
        write_text_atomic(done[name], "ok\n")
    return paths
