"""The inpainting UNet (SD1.5's ``unet/``, 9 input channels) as ONNX, LCM-LoRA fused in.

Reference: ``diffusers.UNet2DConditionModel.forward(sample, timestep, encoder_hidden_states)``
as ``StableDiffusionInpaintPipeline`` calls it, with ``sample`` = [latents, mask, masked-image
latents] on the channel axis and one float timestep per batch row. LoRAs are merged into
the weights first (:mod:`trt_bgswap.export.lora`), so the graph is a plain UNet.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trt_bgswap.errors import ModelError
from trt_bgswap.export.lora import LoraSource, fuse_loras
from trt_bgswap.export.onnx_export import DEFAULT_OPSET, export_onnx
from trt_bgswap.manifest import ModelEntry
from trt_bgswap.specs import ModelSpec, unet_spec

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


def spec_for(unet: Any, max_length: int) -> ModelSpec:
    config = unet.config
    if config.cross_attention_dim is None:
        raise ModelError("the UNet has no cross_attention_dim; it is not a text-conditioned SD UNet")
    return unet_spec(config.in_channels, config.out_channels, max_length, int(config.cross_attention_dim))


def wrap(unet: Any) -> Any:
    """The module that is exported: positional (sample, timestep, encoder_hidden_states) -> out_sample."""
    import torch

    class UNetWrapper(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
            return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    return UNetWrapper(unet)


def export_unet_module(
    unet: Any,
    out_dir: str | Path,
    max_length: int,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> ModelEntry:
    """Export a loaded (LoRA-fused, eval) diffusers UNet to ``out_dir/model.onnx``."""
    import torch

    spec = spec_for(unet, max_length)
    step = downsample_factor(unet)
    h, w = step, 2 * step  # small, non-square, valid: tracing cost does not depend on the real size
    gen = torch.Generator().manual_seed(0)
    sample = {
        "sample": torch.randn(EXPORT_BATCH, unet.config.in_channels, h, w, generator=gen),
        "timestep": torch.tensor([999.0, 499.0][:EXPORT_BATCH]),
        "encoder_hidden_states": torch.randn(EXPORT_BATCH, max_length, int(unet.config.cross_attention_dim), generator=gen),
    }
    return export_onnx(wrap(unet), spec, sample, out_dir, precision=precision, opset=opset, external_data=external_data)
