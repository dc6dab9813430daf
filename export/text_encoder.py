"""CLIP text encoder (``text_encoder/``) as ONNX: int32 token ids in, hidden states out.

Reference: ``transformers.CLIPTextModel`` as the diffusers pipelines' ``encode_prompt`` calls it
(no attention mask, the causal mask built inside). SD1/SD2 (``StableDiffusionInpaintPipeline``)
condition on ``last_hidden_state`` (no CLIP skip); SDXL (``StableDiffusionXLInpaintPipeline``) on
``hidden_states[-2]``, the output of the layer before the last, without the final layer norm
(``penultimate=True``; the unused last layer is dropped from the graph by the exporter's dead-code
pass). The graph takes int32 ids, friendlier to TensorRT than int64, and casts them inside.
SDXL's second encoder, with its projection, is :mod:`trt_bgswap.export.text_encoder_2`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trt_bgswap.export.onnx_export import DEFAULT_OPSET, export_onnx
from trt_bgswap.manifest import ModelEntry
from trt_bgswap.specs import ModelSpec, TextEncoderIO, text_encoder_spec

log = logging.getLogger(__name__)

SUBFOLDER = "text_encoder"
EXPORT_BATCH = 2  # trace with a batch of 2 so the batch dim cannot be folded into a constant


def load_text_encoder(src: str | Path) -> Any:
    """The pipeline's CLIPTextModel in fp32 eval mode, with eager attention (a plain traceable graph)."""
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(
        str(src), subfolder=SUBFOLDER, use_safetensors=True, attn_implementation="eager"
    ).eval()


def hidden_output(penultimate: bool) -> str:
    return TextEncoderIO.PENULTIMATE if penultimate else TextEncoderIO.HIDDEN_STATES


def spec_for(text_encoder: Any, penultimate: bool = False) -> ModelSpec:
    config = text_encoder.config
    return text_encoder_spec(config.max_position_embeddings, config.hidden_size, hidden_output(penultimate))


def wrap(text_encoder: Any, penultimate: bool = False) -> Any:
    """The module that is exported (tests run the very same forward)."""
    import torch

    class TextEncoderWrapper(torch.nn.Module):
        """int32 ids -> last_hidden_state (or the penultimate layer's); the cast lives in the graph."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            ids = input_ids.to(torch.int64)
            if penultimate:
                return self.model(input_ids=ids, output_hidden_states=True, return_dict=True).hidden_states[-2]
            return self.model(input_ids=ids, return_dict=False)[0]

    return TextEncoderWrapper(text_encoder)


def sample_ids(model: Any, spec: ModelSpec) -> dict[str, Any]:
    """Tracing ids: a batch of 2 random rows (the batch dim cannot fold into a constant)."""
    import torch

    max_length = spec.inputs[0].shape[1]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (EXPORT_BATCH, max_length), generator=gen, dtype=torch.int32)
    return {TextEncoderIO.INPUT_IDS: ids}


def export_text_encoder_module(
    model: Any,
    out_dir: str | Path,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    penultimate: bool = False,
) -> ModelEntry:
    """Export a loaded (LoRA-fused, eval) CLIPTextModel to ``out_dir/model.onnx``; ``penultimate`` for SDXL."""
    spec = spec_for(model, penultimate)
    return export_onnx(wrap(model, penultimate), spec, sample_ids(model, spec), out_dir, precision=precision, opset=opset)
