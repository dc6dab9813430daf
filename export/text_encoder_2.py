"""SDXL's second text encoder (``text_encoder_2/``, OpenCLIP ViT-bigG with its projection) as ONNX.

Reference: ``StableDiffusionXLInpaintPipeline.encode_prompt`` (diffusers 0.42) calls
``transformers.CLIPTextModelWithProjection(ids, output_hidden_states=True)`` and keeps two things:
``hidden_states[-2]`` (the penultimate layer, concatenated after the first encoder's on the
feature axis) and the output's first element, ``text_embeds`` (the pooled eos token through the
projection: the UNet's ``text_embeds`` added condition). The graph returns both, from int32 ids.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trt_bgswap.export.onnx_export import DEFAULT_OPSET, export_onnx
from trt_bgswap.export.text_encoder import sample_ids
from trt_bgswap.manifest import ModelEntry
from trt_bgswap.specs import TEXT_ENCODER_2, ModelSpec, TextEncoderIO, text_encoder_spec

log = logging.getLogger(__name__)

SUBFOLDER = "text_encoder_2"


def load_text_encoder_2(src: str | Path) -> Any:
    """The pipeline's CLIPTextModelWithProjection in fp32 eval mode, with eager attention (a plain traceable graph)."""
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection.from_pretrained(
        str(src), subfolder=SUBFOLDER, use_safetensors=True, attn_implementation="eager"
    ).eval()


def spec_for(model: Any) -> ModelSpec:
    config = model.config
    return text_encoder_spec(
        config.max_position_embeddings, config.hidden_size, TextEncoderIO.PENULTIMATE, int(config.projection_dim), name=TEXT_ENCODER_2
    )


def wrap(model: Any) -> Any:
    """int32 ids -> (penultimate hidden states, text_embeds), as the SDXL pipeline reads them."""
    import torch

    class TextEncoder2Wrapper(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.model = inner

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.model(input_ids=input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
            return out.hidden_states[-2], out.text_embeds

    return TextEncoder2Wrapper(model)


def export_text_encoder_2_module(model: Any, out_dir: str | Path, precision: str = "fp32", opset: int = DEFAULT_OPSET) -> ModelEntry:
    """Export a loaded (LoRA-fused, eval) CLIPTextModelWithProjection to ``out_dir/model.onnx``."""
    spec = spec_for(model)
    return export_onnx(wrap(model), spec, sample_ids(model, spec), out_dir, precision=precision, opset=opset)
