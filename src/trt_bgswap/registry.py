"""Known model variants, as data (rembg keeps a model variant to a URL, a checksum and a name).

One table feeds the export defaults, the CLI's choices and the licence notices.
Adding a variant of an existing family means adding a row here, not a class.
"""

from __future__ import annotations

from dataclasses import dataclass

from trt_bgswap.errors import UsageError


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet statistics, BiRefNet's normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


def inpaint_pipeline_files(text_encoders: int) -> tuple[str, ...]:
    """What a diffusers inpainting folder needs: configs, tokenizer(s), text encoder(s), UNet and VAE safetensors.

    SDXL has a second tokenizer and text encoder (``tokenizer_2``, ``text_encoder_2``).
    """
    suffixes = ("", "_2")[:text_encoders]
    return (
        "model_index.json",
        "scheduler/*.json",
        *(f"tokenizer{s}/*" for s in suffixes),
        *(f for s in suffixes for f in (f"text_encoder{s}/config.json", f"text_encoder{s}/model.safetensors")),
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    )


@dataclass(frozen=True)
class Variant:
    name: str
    family: str  # "rmbg" | "sd-inpainting" | "lcm-lora" | "tiny-vae"
    repo_id: str  # Hugging Face hub id
    revision: str  # a branch, tag or commit; pin a commit for reproducible exports
    files: tuple[str, ...]  # glob patterns to download (safetensors only by default)
    license: str
    commercial_use: bool
    input_size: tuple[int, int] | None = None  # (height, width) for RMBG
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    note: str = ""
    gated: bool = False  # the hub asks users to accept the licence before downloading
    postprocess: str = "minmax"  # maskers: "minmax" (RMBG-1.4's reference) or "sigmoid" (BiRefNet's logits); see runtime/masker.py


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            name="rmbg-1.4",
            family="rmbg",
            repo_id="briaai/RMBG-1.4",
            revision="main",
            files=("config.json", "model.safetensors", "preprocessor_config.json", "onnx/model.onnx"),
            license="bria-rmbg-1.4 (non-commercial; a commercial licence is sold by BRIA AI)",
            commercial_use=False,
            input_size=(1024, 1024),
            mean=(0.5, 0.5, 0.5),
            std=(1.0, 1.0, 1.0),
            note="Gated on the hub: accept the licence on the model page and log in (huggingface-cli login).",
            gated=True,
        ),
        Variant(
            name="birefnet",
            family="rmbg",
            repo_id="onnx-community/BiRefNet-ONNX",
            revision="main",
            files=("config.json", "preprocessor_config.json", "onnx/model.onnx"),
            license="MIT (ZhengPeng7/BiRefNet)",
            commercial_use=True,
            input_size=(1024, 1024),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            note="BiRefNet (Zheng et al. 2024): input_image -> output_image logits; the mask is their sigmoid.",
            postprocess="sigmoid",
        ),
        Variant(
            name="rmbg-2.0",
            family="rmbg",
            repo_id="briaai/RMBG-2.0",
            revision="main",
            files=("config.json", "onnx/model.onnx"),
            license="CC BY-NC 4.0 (non-commercial; a commercial licence is sold by BRIA AI)",
            commercial_use=False,
            input_size=(1024, 1024),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            note="BiRefNet architecture trained by BRIA. Gated on the hub: accept the licence on the model page and log in.",
            gated=True,
            postprocess="sigmoid",
        ),
        Variant(
            name="sd15-inpainting",
            family="sd-inpainting",
            repo_id="stable-diffusion-v1-5/stable-diffusion-inpainting",
            revision="main",
            files=inpaint_pipeline_files(text_encoders=1),
            license="creativeml-openrail-m",
            commercial_use=True,
        ),
        Variant(
            name="sdxl-inpainting",
            family="sd-inpainting",
            repo_id="diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
            revision="main",
            files=inpaint_pipeline_files(text_encoders=2),
            license="openrail++",
            commercial_use=True,
            note="SDXL family: 1024x1024 native area, two text encoders; pair it with lcm-lora-sdxl. The VAE stays fp32 (force_upcast).",
        ),
        Variant(
            name="sd2-inpainting",
            family="sd-inpainting",
            repo_id="stabilityai/stable-diffusion-2-inpainting",
            revision="main",
            files=inpaint_pipeline_files(text_encoders=1),
            license="openrail++",
            commercial_use=True,
            note="SD2 family: 512x512, OpenCLIP ViT-H text encoder; no LCM-LoRA is published for it (give --lcm-lora FILE or none).",
        ),
        Variant(
            name="lcm-lora-sdxl",
            family="lcm-lora",
            repo_id="latent-consistency/lcm-lora-sdxl",
            revision="main",
            files=("pytorch_lora_weights.safetensors",),
            license="openrail++",
            commercial_use=True,
        ),
        Variant(
            name="lcm-lora-sdv1-5",
            family="lcm-lora",
            repo_id="latent-consistency/lcm-lora-sdv1-5",
            revision="main",
            files=("pytorch_lora_weights.safetensors",),
            license="openrail++",
            commercial_use=True,
        ),
        Variant(
            name="taesd",
            family="tiny-vae",
            repo_id="madebyollin/taesd",
            revision="main",
            files=("config.json", "diffusion_pytorch_model.safetensors"),
            license="MIT",
            commercial_use=True,
            note="Tiny autoencoder (diffusers' AutoencoderTiny) for SD1.x/SD2.x latents: --vae tiny.",
        ),
        Variant(
            name="taesdxl",
            family="tiny-vae",
            repo_id="madebyollin/taesdxl",
            revision="main",
            files=("config.json", "diffusion_pytorch_model.safetensors"),
            license="MIT",
            commercial_use=True,
            note="Tiny autoencoder (diffusers' AutoencoderTiny) for SDXL latents: --vae tiny.",
        ),
    )
}

DEFAULTS = {"rmbg": "rmbg-1.4", "sd-inpainting": "sd15-inpainting", "lcm-lora": "lcm-lora-sdv1-5", "tiny-vae": "taesd"}
# The LCM-LoRA and tiny-autoencoder defaults follow the inpainting model's family (trt_bgswap.families.Family.lcm_lora,
# .tiny_vae), read from its configs: a TAESD's own config cannot tell SD1's latents from SDXL's.


def get_variant(name: str) -> Variant:
    """Look a variant up by name or hub id; an unknown name lists the valid ones."""
    if name in VARIANTS:
        return VARIANTS[name]
    for v in VARIANTS.values():
        if v.repo_id == name:
            return v
    raise UsageError(f"unknown model {name!r}; choose one of {', '.join(sorted(VARIANTS))} or give a local path")


def variants_of(family: str) -> list[Variant]:
    """The registry's variants of one model family (the --masker choices are the rmbg ones)."""
    return [v for v in VARIANTS.values() if v.family == family]
