"""Tiny Stable-Diffusion-1.5 inpainting and LCM-LoRA folders with random weights, for offline tests.

The folders copy the layout and config semantics of
``stable-diffusion-v1-5/stable-diffusion-inpainting`` (diffusers format: ``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) and of
``latent-consistency/lcm-lora-sdv1-5`` (``pytorch_lora_weights.safetensors``), with the real
architectures (9-channel ``UNet2DConditionModel`` with SD1.5's block types, 4-block
``AutoencoderKL``, ``CLIPTextModel``) at tiny sizes, so every export, fusion and parity
test runs the same code paths as the full-size models without a download.

LCM-LoRA file format (Luo et al. 2023, "LCM-LoRA: A Universal Stable-Diffusion
Acceleration Module", arXiv:2311.05556): kohya-style keys over diffusers' module
names, ``lora_unet_<module path, dots as underscores>.{lora_down.weight,lora_up.weight,alpha}``,
rank 64 with alpha 8 (PEFT's default ``lora_alpha`` the LCM distillation script trained with),
float16, on the modules that script targets: attention ``to_q/to_k/to_v/to_out.0``,
``proj_in/proj_out``, ``ff.net.0.proj/ff.net.2``, ResNet ``conv1/conv2/conv_shortcut/time_emb_proj``
and the down/up-sampler convs; no text-encoder keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import write_text_atomic

log = logging.getLogger(__name__)

# SD1.5 inpainting's scheduler (scheduler/scheduler_config.json): PNDM with SD's scaled-linear betas.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

SD15_VAE_SCALING_FACTOR = 0.18215  # vae/config.json of SD1.5; the tiny VAE declares the same

# SD1.5 inpainting's published configs (unet/, vae/, text_encoder/config.json of
# runwayml/stable-diffusion-inpainting; the VAE's scaling factor is diffusers' default, which that
# file relies on): the full-size benchmark models use them as they are, the tiny ones shrink them.
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
    "scaling_factor": SD15_VAE_SCALING_FACTOR,
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

# The module-name suffixes the LCM-LoRA distillation script puts LoRA layers on (diffusers names).
LCM_LORA_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
LCM_LORA_RANK = 64
LCM_LORA_ALPHA = 8.0
LCM_LORA_FILE = "pytorch_lora_weights.safetensors"


def tiny_unet_config(cross_attention_dim: int) -> dict[str, Any]:
    """SD1.5's UNet config with tiny channels; ``attention_head_dim`` keeps SD1.5's meaning (8 heads)."""
    return {
        **SD15_INPAINT_UNET_CONFIG,
        "block_out_channels": [32, 32, 64, 64],
        "cross_attention_dim": cross_attention_dim,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 16,  # x VAE factor 8 = 128 px default size
    }


def tiny_vae_config() -> dict[str, Any]:
    """SD1.5's VAE config with tiny channels; 4 blocks keep the downsampling factor at 8."""
    return {**SD15_VAE_CONFIG, "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 128}


def _tokenizer_ids(tokenizer_dir: Path) -> tuple[int, int, int, int, int]:
    """(vocab size, bos, eos, pad, model_max_length) of a CLIP tokenizer folder."""
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    special = json.loads((tokenizer_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    tok_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))

    def token_id(name: str) -> int:
        tok = special[name]
        return vocab[tok["content"] if isinstance(tok, dict) else tok]

    return len(vocab), token_id("bos_token"), token_id("eos_token"), token_id("pad_token"), int(tok_config["model_max_length"])


def _perturb_constant_params(module: Any, generator: Any) -> None:
    """Give every constant tensor (norm scales of 1, zero biases) random values so every layer matters."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            if p.numel() == 1 or float(p.std()) == 0.0:
                p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


# model_index.json of the SD1.5-inpainting diffusers layout (safety checker left out, as diffusers allows)
SD15_INPAINT_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionInpaintPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_json(path: Path, obj: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors(state: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    from trt_bgswap.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)


def write_sd_inpainting(
    folder: str | Path,
    text_encoder: dict[str, Any],
    unet_config: dict[str, Any],
    vae_config: dict[str, Any],
    seed: int,
    perturb: bool,
    pad_token: str | None = None,
) -> Path:
    """A diffusers SD-inpainting folder (SD1.5's layout, SD2's too) with random seeded weights, at any size; returns the folder.

    The tokenizer is the project's small CLIP tokenizer (padding with ``pad_token``, eos unless given:
    SD2's OpenCLIP tokenizer pads with ``!``); the text encoder is ``CLIPTextConfig(**text_encoder)``
    with the tokenizer's special ids (and its vocabulary size and length unless ``text_encoder`` gives them).
    ``perturb`` gives constant tensors (norm scales, zero biases) random values, so every layer of a tiny
    model matters to the parity tests.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trt_bgswap.export.tiny_tokenizer import write_tiny_clip_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(write_tiny_clip_tokenizer(folder / "tokenizer", **({"pad_token": pad_token} if pad_token is not None else {})))
    vocab_size, bos, eos, pad, max_length = _tokenizer_ids(tok_dir)
    gen = torch.Generator().manual_seed(seed)
    te_config = CLIPTextConfig(
        **{"vocab_size": vocab_size, "max_position_embeddings": max_length, **text_encoder}, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad
    )
    torch.manual_seed(seed)
    log.info("%s: text encoder", folder)
    model = CLIPTextModel(te_config).eval()
    if perturb:
        _perturb_constant_params(model, gen)
    te_dict = te_config.to_dict()
    te_dict["architectures"] = ["CLIPTextModel"]
    write_json(folder / "text_encoder" / "config.json", te_dict)
    save_safetensors(model.state_dict(), folder / "text_encoder" / "model.safetensors", {"format": "pt"})
    del model
    for name, cls, config in (("unet", UNet2DConditionModel, unet_config), ("vae", AutoencoderKL, vae_config)):
        log.info("%s: %s", folder, name)
        model = cls.from_config(config).eval()
        if perturb:
            _perturb_constant_params(model, gen)
        write_json(folder / name / "config.json", dict(model.config))
        save_safetensors(model.state_dict(), folder / name / "diffusion_pytorch_model.safetensors")
        del model
    write_json(folder / "scheduler" / "scheduler_config.json", dict(SD15_SCHEDULER_CONFIG))
    write_json(folder / "model_index.json", dict(SD15_INPAINT_MODEL_INDEX))
    return folder


# The tiny text encoder: SD1.5's architecture (openai/clip-vit-large-patch14's quick_gelu) at hidden size 32.
TINY_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_act": "quick_gelu",
}

# SD2's text encoder is OpenCLIP ViT-H (gelu, not quick_gelu); its tokenizer pads with "!".
TINY_SD2_TEXT_ENCODER: dict[str, Any] = {**TINY_TEXT_ENCODER, "hidden_act": "gelu"}
SD2_PAD_TOKEN = "!"


def sd2_variant(unet_config: dict[str, Any], vae_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The UNet and VAE configs of SD2 inpainting's tiny twin (``stabilityai/stable-diffusion-2-inpainting``).

    SD2's UNet declares a head size per block and uses linear projections in its transformers
    (``use_linear_projection``); its VAE is SD1's. The twin's VAE has 3 blocks (factor 4, not 8)
    so the SD2 parity does not pass by coincidence with SD1's sizes.
    """
    unet = {**unet_config, "attention_head_dim": [2, 4, 4, 4], "use_linear_projection": True}
    vae = {**vae_config, "block_out_channels": [16, 32, 32], "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3}
    return unet, vae


def write_tiny_sd_inpainting(folder: str | Path, seed: int = 0, sd2: bool = False) -> Path:
    """Write a tiny SD1.5-inpainting diffusers folder (random seeded weights); returns the folder.

    ``sd2``: SD2 inpainting's instead: the OpenCLIP text encoder (``hidden_act`` gelu) whose
    tokenizer pads with ``!``, and :func:`sd2_variant`'s UNet and VAE.
    """
    text_encoder = TINY_SD2_TEXT_ENCODER if sd2 else TINY_TEXT_ENCODER
    unet_config, vae_config = tiny_unet_config(cross_attention_dim=text_encoder["hidden_size"]), tiny_vae_config()
    if sd2:
        unet_config, vae_config = sd2_variant(unet_config, vae_config)
    write_sd_inpainting(folder, text_encoder, unet_config, vae_config, seed, perturb=True, pad_token=SD2_PAD_TOKEN if sd2 else None)
    log.info("tiny %s inpainting written to %s", "SD2" if sd2 else "SD-1.5", folder)
    return Path(folder)


def lcm_lora_module_names(unet: Any) -> list[str]:
    """The UNet modules the LCM-LoRA covers (diffusers names), in the model's order."""
    import torch

    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if any(name == t or name.endswith("." + t) for t in LCM_LORA_TARGETS):
            names.append(name)
    return names


def kohya_key(module_name: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return "lora_unet_" + module_name.replace(".", "_")


def write_tiny_lcm_lora(
    folder: str | Path,
    unet_config: dict[str, Any],
    seed: int = 0,
    rank: int = LCM_LORA_RANK,
    alpha: float = LCM_LORA_ALPHA,
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` in lcm-lora-sdv1-5's format for a UNet config; returns the folder.

    Up weights are nonzero (a trained LoRA, not PEFT's zero init) so fusing it changes the UNet.
    """
    import torch
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name in lcm_lora_module_names(unet):
        module = unet.get_submodule(name)
        key = kohya_key(name)
        if isinstance(module, torch.nn.Conv2d):
            down_shape: tuple[int, ...] = (rank, module.in_channels, *module.kernel_size)
            up_shape: tuple[int, ...] = (module.out_channels, rank, 1, 1)
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        else:
            down_shape = (rank, module.in_features)
            up_shape = (module.out_features, rank)
            fan_in = module.in_features
        down = torch.randn(down_shape, generator=gen) / fan_in**0.5
        up = torch.randn(up_shape, generator=gen) / rank**0.5
        state[f"{key}.lora_down.weight"] = down.to(torch.float16)
        state[f"{key}.lora_up.weight"] = up.to(torch.float16)
        state[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_safetensors(state, folder / LCM_LORA_FILE)
    log.info("tiny LCM-LoRA (%d modules, rank %d, alpha %g) written to %s", len(state) // 3, rank, alpha, folder)
    return folder
