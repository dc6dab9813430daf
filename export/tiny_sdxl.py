"""A tiny SDXL-inpainting folder and LCM-LoRA-SDXL file with random weights, for offline tests.

The folder copies the layout and config semantics of ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1``
(diffusers format: ``model_index.json`` naming ``StableDiffusionXLInpaintPipeline`` with
``force_zeros_for_empty_prompt``/``requires_aesthetics_score``, ``unet/``, ``vae/``,
``text_encoder/`` (``CLIPTextModel``, OpenAI CLIP's quick_gelu), ``text_encoder_2/``
(``CLIPTextModelWithProjection``, OpenCLIP's gelu), ``tokenizer/`` (pads with eos),
``tokenizer_2/`` (pads with ``!``), ``scheduler/`` (SDXL's EulerDiscreteScheduler config)), with
the real architectures at tiny sizes: a 9-channel ``UNet2DConditionModel`` with SDXL's block
types, linear projections, per-block transformer depths and the ``text_time`` added embedding
(``projection_class_embeddings_input_dim`` = ``addition_time_embed_dim`` x 6 time ids +
``text_encoder_2``'s ``projection_dim``, as the real 2816 = 256 x 6 + 1280).

Unusual on purpose, so nothing passes by coincidence: a 3-block VAE (factor 4, not 8), a
projection width (40) different from the second encoder's hidden width (48), two encoders of
different widths (32 + 48 = the UNet's cross-attention width 80).

``latent-consistency/lcm-lora-sdxl`` is, like the SD1.5 one, kohya keys over diffusers' module
names with alphas (``lora_unet_<module>.{lora_down.weight,lora_up.weight,alpha}``), rank 64,
float16, on the same module kinds: :func:`~.tiny_sd.write_tiny_lcm_lora` writes it for this UNet.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trt_bgswap.export.tiny_sd import SD15_VAE_CONFIG, _perturb_constant_params, _tokenizer_ids, save_safetensors, write_json

log = logging.getLogger(__name__)

# SDXL's scheduler/scheduler_config.json (stable-diffusion-xl-base-1.0 and the inpainting 0.1 model)
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

SDXL_VAE_SCALING_FACTOR = 0.13025  # vae/config.json of SDXL; the tiny VAE declares the same

SDXL_INPAINT_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionXLInpaintPipeline",
    "_diffusers_version": "0.21.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "requires_aesthetics_score": False,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
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
SDXL_VAE_CONFIG: dict[str, Any] = {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": SDXL_VAE_SCALING_FACTOR, "force_upcast": True}

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

HIDDEN_1, HIDDEN_2, PROJECTION_2 = 32, 48, 40  # text_encoder, text_encoder_2 widths; text_encoder_2's projection_dim
TIME_EMBED_DIM = 8  # addition_time_embed_dim (256 in SDXL)
TIME_IDS = 6  # original size (2) + crop top-left (2) + target size (2)


def tiny_sdxl_unet_config() -> dict[str, Any]:
    """SDXL inpainting's UNet config with tiny channels and depths."""
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": TIME_EMBED_DIM,
        "attention_head_dim": [2, 4, 4],
        "block_out_channels": [32, 64, 64],
        "center_input_sample": False,
        "cross_attention_dim": HIDDEN_1 + HIDDEN_2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 9,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": TIME_EMBED_DIM * TIME_IDS + PROJECTION_2,
        "sample_size": 32,  # x VAE factor 4 = 128 px native size
        "transformer_layers_per_block": [1, 1, 2],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    }


def tiny_sdxl_vae_config() -> dict[str, Any]:
    """SDXL's VAE config (force_upcast: it overflows float16) with 3 blocks: downsampling factor 4."""
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": 128,
        "scaling_factor": SDXL_VAE_SCALING_FACTOR,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
    }


def _text_encoder(folder: Path, tokenizer_dir: Path, hidden: int, act: str, projection: int | None, seed: int, gen: Any) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab_size, bos, eos, pad, max_length = _tokenizer_ids(tokenizer_dir)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection or hidden,
        num_hidden_layers=3,  # SDXL reads the penultimate layer: the last must exist and be skipped
        num_attention_heads=4,
        max_position_embeddings=max_length,
        hidden_act=act,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection is not None else CLIPTextModel
    model = cls(config).eval()
    _perturb_constant_params(model, gen)
    folder.mkdir(parents=True, exist_ok=True)
    d = config.to_dict()
    d["architectures"] = [cls.__name__]
    write_json(folder / "config.json", d)
    save_safetensors(model.state_dict(), folder / "model.safetensors", {"format": "pt"})


def write_tiny_sdxl_inpainting(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny SDXL-inpainting diffusers folder (random seeded weights); returns the folder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from trt_bgswap.export.tiny_tokenizer import write_tiny_clip_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Path(write_tiny_clip_tokenizer(folder / "tokenizer"))
    tok_2 = Path(write_tiny_clip_tokenizer(folder / "tokenizer_2", pad_token="!"))  # OpenCLIP's tokenizer pads with "!"
    gen = torch.Generator().manual_seed(seed)
    _text_encoder(folder / "text_encoder", tok, HIDDEN_1, "quick_gelu", None, seed, gen)
    _text_encoder(folder / "text_encoder_2", tok_2, HIDDEN_2, "gelu", PROJECTION_2, seed + 1, gen)

    unet = UNet2DConditionModel.from_config(tiny_sdxl_unet_config()).eval()
    _perturb_constant_params(unet, gen)
    write_json(folder / "unet" / "config.json", dict(unet.config))
    save_safetensors(unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.safetensors")

    vae = AutoencoderKL.from_config(tiny_sdxl_vae_config()).eval()
    _perturb_constant_params(vae, gen)
    write_json(folder / "vae" / "config.json", dict(vae.config))
    save_safetensors(vae.state_dict(), folder / "vae" / "diffusion_pytorch_model.safetensors")

    write_json(folder / "scheduler" / "scheduler_config.json", dict(SDXL_SCHEDULER_CONFIG))
    write_json(folder / "model_index.json", dict(SDXL_INPAINT_MODEL_INDEX))
    log.info("tiny SDXL inpainting written to %s", folder)
    return folder
