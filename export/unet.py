"""The inpainting UNet (SD1.5's ``unet/``, 9 input channels) as ONNX, LCM-LoRA fused in.

Reference: ``diffusers.UNet2DConditionModel.forward(sample, timestep, encoder_hidden_states)``
as ``StableDiffusionInpaintPipeline`` calls it, with ``sample`` = [latents, mask, masked-image
latents] on the channel axis and one float timestep per batch row. An SDXL UNet
(``addition_embed_type`` "text_time") also takes ``added_cond_kwargs={"text_embeds", "time_ids"}``
as ``StableDiffusionXLInpaintPipeline`` passes them; the graph takes them as two more inputs.
LoRAs are merged into the weights first (:mod:`trt_bgswap.export.lora`), so the graph is a plain UNet.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trt_bgswap.errors import ModelError
from trt_bgswap.export.lora import LoraSource, fuse_loras
from trt_bgswap.export.onnx_export import DEFAULT_OPSET, export_onnx
from trt_bgswap.manifest import ModelEntry
from trt_bgswap.families import TEXT_TIME
from trt_bgswap.specs import ModelSpec, UnetIO, unet_spec

log = logging.getLogger(__name__)

SUBFOLDER = "unet"
EXPORT_BATCH = 2


def load_unet(src: str | Path, lora: str | Path | None = None, lora_scale: float = 1.0) -> Any:
    """The UNet in fp32 eval mode, with a UNet-only LoRA (a folder or .safetensors file) fused at ``lora_scale``.

    LoRAs that also change the text encoder are fused with both models loaded (:func:`fuse_loras`).
    """
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(src), subfolder=SUBFOLDER, use_safetensors=True).eval()
    if lora is not None:
        fuse_loras(unet, None, [LoraSource(Path(lora), lora_scale)])
    return unet


def downsample_factor(unet: Any) -> int:
    """2 ** (number of downsamplers): latent sizes must divide by it for the skip connections to line up."""
    n = sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))
    return 2**n


def added_dims(unet: Any, text_embeds_dim: int | None) -> tuple[int, int] | None:
    """(text_embeds width, number of time ids) of an SDXL UNet, from its config; None for SD1/SD2 UNets.

    ``projection_class_embeddings_input_dim`` = ``addition_time_embed_dim`` x time ids + text_embeds width
    (what diffusers' ``_get_add_time_ids`` checks); a config that does not add up is refused.
    """
    config = unet.config
    if getattr(config, "addition_embed_type", None) != TEXT_TIME:
        return None
    if text_embeds_dim is None:
        raise ModelError("an SDXL UNet (addition_embed_type 'text_time') needs the second text encoder's projection_dim")
    total, per_id = int(config.projection_class_embeddings_input_dim), int(config.addition_time_embed_dim)
    ids, rest = divmod(total - text_embeds_dim, per_id)
    if rest or ids < 1:
        raise ModelError(
            f"unet projection_class_embeddings_input_dim={total} is not text_embeds {text_embeds_dim} + a whole number of "
            f"time ids x addition_time_embed_dim {per_id}; the UNet and text_encoder_2 configs do not belong together"
        )
    return text_embeds_dim, ids


def spec_for(unet: Any, max_length: int, text_embeds_dim: int | None = None) -> ModelSpec:
    config = unet.config
    if config.cross_attention_dim is None:
        raise ModelError("the UNet has no cross_attention_dim; it is not a text-conditioned SD UNet")
    added = added_dims(unet, text_embeds_dim)
    return unet_spec(config.in_channels, config.out_channels, max_length, int(config.cross_attention_dim), added=added)


def wrap(unet: Any, added: bool = False) -> Any:
    """The module that is exported: positional (sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) -> out_sample."""
    import torch

    class UNetWrapper(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
            return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class AddedCondUNetWrapper(UNetWrapper):
        def forward(  # type: ignore[override]
            self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, text_embeds: torch.Tensor, time_ids: torch.Tensor
        ) -> torch.Tensor:
            cond = {UnetIO.TEXT_EMBEDS: text_embeds, UnetIO.TIME_IDS: time_ids}
            return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]

    return AddedCondUNetWrapper(unet) if added else UNetWrapper(unet)


def export_unet_module(
    unet: Any,
    out_dir: str | Path,
    max_length: int,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    text_embeds_dim: int | None = None,
) -> ModelEntry:
    """Export a loaded (LoRA-fused, eval) diffusers UNet to ``out_dir/model.onnx``; SDXL UNets need ``text_embeds_dim``."""
    import torch

    spec = spec_for(unet, max_length, text_embeds_dim)
    step = downsample_factor(unet)
    dims = {"B": EXPORT_BATCH, "h": step, "w": 2 * step}  # small, non-square, valid: tracing cost does not depend on the real size
    gen = torch.Generator().manual_seed(0)
    sample = {t.name: torch.randn(t.resolve(dims), generator=gen) for t in spec.inputs}
    sample[UnetIO.TIMESTEP] = torch.tensor([999.0, 499.0][:EXPORT_BATCH])
    added = UnetIO.TIME_IDS in spec.input_names
    if added:  # sizes and crops as the pipeline passes them (pixels), not unit noise
        sample[UnetIO.TIME_IDS] = torch.randint(0, 2048, tuple(spec.tensor(UnetIO.TIME_IDS).resolve(dims)), generator=gen).float()
    return export_onnx(wrap(unet, added), spec, sample, out_dir, precision=precision, opset=opset, external_data=external_data)
