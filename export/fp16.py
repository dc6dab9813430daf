"""fp16 ONNX graphs with fp32 inputs and outputs.

Uses ONNX Runtime's converter (``onnxruntime.transformers.float16.convert_float_to_float16``,
the one its Stable Diffusion optimizer uses) with ``keep_io_types=True``: weights and
activations become float16, casts at the graph boundary keep the I/O specs float32, so the
runtime feeds the same arrays whatever the precision. Working from the file path lets the
converter run shape inference on graphs over 2 GB.

The SD VAE overflows float16 (its decoder activations pass 65504; see madebyollin's
sdxl-vae-fp16-fix notes), so :func:`trt_bgswap.export.exporter.export_models` keeps the VAE
in fp32 unless asked otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trt_bgswap.errors import BackendUnavailable


def convert_to_fp16(path: str | Path) -> Any:
    """Load the fp32 graph at ``path`` and return it converted to fp16 with fp32 I/O (an ``onnx.ModelProto``)."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise BackendUnavailable(f"fp16 conversion needs onnxruntime's transformers tools ({e}); pip install onnxruntime") from e
    model = convert_float_to_float16(str(path), keep_io_types=True)
    # the converter appends the boundary casts after their consumers; ONNX requires topological order
    OnnxModel(model).topological_sort()
    return model
