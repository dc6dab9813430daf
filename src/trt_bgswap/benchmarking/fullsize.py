"""Full-size models with random weights, built from their published configurations (no downloads).

Random weights give real timings: latency, memory and FLOPs depend on the architecture
and the tensor sizes, not on the weight values. The configurations are the published ones:

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

import json
import logging
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import write_text_atomic

log = logging.getLogger(__name__)

SD15_INPAINT_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 9,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD15_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# SDXL inpainting (diffusers/stable-diffusion-xl-1.0-inpainting-0.1, unet/config.json): 9 channels, three blocks,
# transformer depths 1/2/10, linear projections, cross-attention 2048 (768 + 1280), the text_time added embedding
# (2816 = 256 x 6 time ids + 1280 pooled), sample_size 128 (1024 px).
SDXL_INPAINT_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 9,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

# SDXL's VAE (vae/config.json): SD's architecture, scaling_factor 0.13025, force_upcast (it overflows float16).
SDXL_VAE_CONFIG: dict[str, Any] = {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# SDXL's text_encoder_2 (OpenCLIP ViT-bigG/14's text tower as CLIPTextModelWithProjection).
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

RMBG_INPUT_SIZE = 1024
FULL_NAMES = ("sd-inpainting", "lcm-lora", "rmbg", "taesd")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    from trt_bgswap.export.tiny_sd import _write_json as write_json

    write_json(path, obj)


def _save(state: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    from trt_bgswap.export.tiny_sd import _save_safetensors

    _save_safetensors(state, path, metadata)


def _write_diffusers_module(folder: Path, cls: Any, config: dict[str, Any]) -> None:
    """A diffusers model folder (config.json + diffusion_pytorch_model.safetensors) with random weights; freed on return."""
    module = cls.from_config(config).eval()
    _write_json(folder / "config.json", dict(module.config))
    _save(module.state_dict(), folder / "diffusion_pytorch_model.safetensors")


def write_full_sd_inpainting(folder: str | Path, seed: int = 0) -> Path:
    """A diffusers SD1.5-inpainting folder at the published sizes with random seeded weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trt_bgswap.export.tiny_sd import SD15_INPAINT_MODEL_INDEX, SD15_SCHEDULER_CONFIG
    from trt_bgswap.export.tiny_tokenizer import write_tiny_clip_tokenizer

    folder = Path(folder)
    tok_dir = Path(write_tiny_clip_tokenizer(folder / "tokenizer"))
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    special = json.loads((tok_dir / "special_tokens_map.json").read_text(encoding="utf-8"))

    def token_id(name: str) -> int:
        tok = special[name]
        return int(vocab[tok["content"] if isinstance(tok, dict) else tok])

    torch.manual_seed(seed)
    te_config = CLIPTextConfig(
        **SD15_TEXT_ENCODER_CONFIG, bos_token_id=token_id("bos_token"), eos_token_id=token_id("eos_token"), pad_token_id=token_id("pad_token")
    )
    log.info("text encoder (CLIP ViT-L/14 text tower, random weights)")
    te = CLIPTextModel(te_config).eval()
    te_dict = te_config.to_dict()
    te_dict["architectures"] = ["CLIPTextModel"]
    _write_json(folder / "text_encoder" / "config.json", te_dict)
    _save(te.state_dict(), folder / "text_encoder" / "model.safetensors", {"format": "pt"})
    del te

    log.info("UNet (SD1.5 inpainting, 9 channels, random weights)")
    _write_diffusers_module(folder / "unet", UNet2DConditionModel, SD15_INPAINT_UNET_CONFIG)
    log.info("VAE (SD1.5, random weights)")
    _write_diffusers_module(folder / "vae", AutoencoderKL, SD15_VAE_CONFIG)

    _write_json(folder / "scheduler" / "scheduler_config.json", dict(SD15_SCHEDULER_CONFIG))
    _write_json(
        folder / "model_index.json",
        dict(SD15_INPAINT_MODEL_INDEX),
    )
    return folder


def write_full_rmbg(folder: str | Path, seed: int = 0) -> Path:
    """An RMBG-1.4 folder (config.json, preprocessor_config.json, model.safetensors) at full width."""
    from trt_bgswap.export.tiny_rmbg import RMBG14_CONFIG, random_isnet, rmbg_preprocessor_config

    folder = Path(folder)
    model = random_isnet(seed, channel_divisor=1)
    _write_json(folder / "config.json", dict(RMBG14_CONFIG))
    _write_json(folder / "preprocessor_config.json", rmbg_preprocessor_config(RMBG_INPUT_SIZE))
    _save({k: v.detach() for k, v in model.state_dict().items()}, folder / "model.safetensors", {"format": "pt"})
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

    from trt_bgswap.export.tiny_sd import _tokenizer_ids
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
        _write_json(folder / sub / "config.json", d)
        _save(te.state_dict(), folder / sub / "model.safetensors", {"format": "pt"})
        del te
    log.info("UNet (SDXL inpainting, 9 channels, 2.6e9 parameters, random weights)")
    _write_diffusers_module(folder / "unet", UNet2DConditionModel, SDXL_INPAINT_UNET_CONFIG)
    log.info("VAE (SDXL, random weights)")
    _write_diffusers_module(folder / "vae", AutoencoderKL, SDXL_VAE_CONFIG)
    _write_json(folder / "scheduler" / "scheduler_config.json", dict(SDXL_SCHEDULER_CONFIG))
    _write_json(folder / "model_index.json", dict(SDXL_INPAINT_MODEL_INDEX))
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
