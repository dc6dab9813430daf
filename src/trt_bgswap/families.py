"""Model families of the inpainting model, decided from the model's own configs (never from its name).

A family is what the runtime must do differently, as data:

========= ======================================================================================
``sd1``   SD1.x inpainting: one CLIP ViT-L text encoder (``hidden_act`` quick_gelu), its last
          hidden state conditions the UNet (``StableDiffusionInpaintPipeline``)
``sd2``   SD2.x inpainting: one OpenCLIP ViT-H text encoder converted to ``CLIPTextModel``
          (``hidden_act`` gelu, 23 layers: the checkpoint already drops the last one), used exactly
          as SD1's; it differs by defaults only (no published LCM-LoRA)
``sdxl``  SDXL inpainting (``StableDiffusionXLInpaintPipeline``): two text encoders whose
          penultimate hidden states are concatenated, the second's projected pooled output as
          the UNet's ``text_embeds`` and the size/crop ``time_ids`` (``addition_embed_type``
          "text_time")
========= ======================================================================================

Detection (:func:`family_of`) reads ``model_index.json``, ``unet/config.json`` and
``text_encoder/config.json``: a ``text_time`` UNet with a ``text_encoder_2`` is SDXL; otherwise the
text encoder's activation tells OpenAI CLIP (SD1) from OpenCLIP (SD2). A config that fits no
family is refused with what was found. Pure Python: the exporter and the CLI both use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trt_bgswap.errors import ModelError

SD1, SD2, SDXL = "sd1", "sd2", "sdxl"
TEXT_TIME = "text_time"  # unet config addition_embed_type of SDXL's added conditions
OPENAI_CLIP_ACT = "quick_gelu"  # openai/clip-vit-large-patch14 (SD1.x)
OPENCLIP_ACT = "gelu"  # laion OpenCLIP ViT-H/14 (SD2.x), converted to CLIPTextModel


@dataclass(frozen=True)
class Family:
    """What differs between families, as data (rembg's "variants are data")."""

    name: str
    description: str
    lcm_lora: str | None  # the registry's LCM-LoRA for it; None: none is published
    tiny_vae: str  # the registry's tiny autoencoder (TAESD) for its latents: --vae tiny
    text_encoders: tuple[str, ...]  # pipeline components that encode the prompt, in concatenation order
    tokenizers: tuple[str, ...]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(SD1, "Stable Diffusion 1.x inpainting", "lcm-lora-sdv1-5", "taesd", ("text_encoder",), ("tokenizer",)),
        Family(SD2, "Stable Diffusion 2.x inpainting", None, "taesd", ("text_encoder",), ("tokenizer",)),
        Family(SDXL, "Stable Diffusion XL inpainting", "lcm-lora-sdxl", "taesdxl", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")),
    )
}


def _component(index: Mapping[str, Any], name: str) -> bool:
    """Whether ``model_index.json`` lists a component (diffusers writes ``[null, null]`` for an absent one)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def family_of(model_index: Mapping[str, Any], unet: Mapping[str, Any], text_encoder: Mapping[str, Any] | None, where: str = "") -> Family:
    """The family of a diffusers inpainting pipeline, from its configs; a ModelError names what does not fit."""
    label = f"{where}: " if where else ""
    added = unet.get("addition_embed_type")
    if added == TEXT_TIME:
        if not (_component(model_index, "text_encoder_2") and _component(model_index, "text_encoder")):
            raise ModelError(
                f"{label}the UNet takes SDXL's added conditions (addition_embed_type 'text_time') but model_index.json lacks "
                "text_encoder/text_encoder_2; give a complete SDXL inpainting pipeline (diffusers/stable-diffusion-xl-1.0-inpainting-0.1)"
            )
        return FAMILIES[SDXL]
    if added is not None:
        raise ModelError(f"{label}unet addition_embed_type={added!r} is not a family this tool runs (SD1, SD2, SDXL inpainting)")
    if _component(model_index, "text_encoder_2"):
        raise ModelError(f"{label}a text_encoder_2 without SDXL's 'text_time' UNet conditions; this pipeline is not SD1, SD2 or SDXL inpainting")
    act = (text_encoder or {}).get("hidden_act")
    if act == OPENAI_CLIP_ACT:
        return FAMILIES[SD1]
    if act == OPENCLIP_ACT:
        return FAMILIES[SD2]
    raise ModelError(
        f"{label}text_encoder hidden_act={act!r}: SD1 uses {OPENAI_CLIP_ACT!r} (OpenAI CLIP), SD2 {OPENCLIP_ACT!r} (OpenCLIP); "
        "this text encoder is neither"
    )


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ModelError(f"model family {name!r} is unknown; this trt-bgswap knows {', '.join(FAMILIES)}; re-run `trt-bgswap export`")
    return FAMILIES[name]
