"""CLIP text encoder (SD1.5's ``text_encoder/``) as ONNX: int32 token ids in, last hidden state out.

Reference: ``transformers.CLIPTextModel`` as ``StableDiffusionInpaintPipeline.encode_prompt``
calls it (no attention mask, the causal mask built inside; ``last_hidden_state`` is the
prompt embedding, no CLIP skip). The graph takes int32 ids, friendlier to TensorRT
than int64, and casts them inside.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trt_bgswap.export.onnx_export import DEFAULT_OPSET, export_onnx
from trt_bgswap.manifest import ModelEntry
from trt_bgswap.specs import ModelSpec, text_encoder_spec

log = logging.getLogger(__name__)

SUBFOLDER = "text_encoder"
EXPORT_BATCH = 2  # trace with a batch of 2 so the batch dim cannot be folded into a constant


def load_text_encoder(src: str | Path) -> Any:
    """The pipeline's CLIPTextModel in fp32 eval mode, with eager attention (a plain traceable graph)."""
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(
        str(src), subfolder=SUBFOLDER, use_safetensors=True, attn_implementation="eager"
    ).eval()


def spec_for(text_encoder: Any) -> ModelSpec:
    config = text_encoder.config
    return text_encoder_spec(config.max_position_embeddings, config.hidden_size)


def wrap(text_encoder: Any) -> Any:
    """The module that is exported (tests run the very same forward)."""
    import torch

    class TextEncoderWrapper(torch.nn.Module):
        """int32 ids -> last_hidden_state; the cast lives in the graph."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids.to(torch.int64), return_dict=False)[0]

    return TextEncoderWrapper(text_encoder)


def export_text_encoder_module(
    model: Any,
    out_dir: str | Path,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
) -> ModelEntry:
    """Export a loaded (LoRA-fused, eval) CLIPTextModel to ``out_dir/model.onnx``."""
    import torch

    spec = spec_for(model)
    max_length = spec.inputs[0].shape[1]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (EXPORT_BATCH, max_length), generator=gen, dtype=torch.int32)
    return export_onnx(wrap(model), spec, {"input_ids": ids}, out_dir, precision=precision, opset=opset)
