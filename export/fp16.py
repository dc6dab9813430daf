"""fp16 ONNX graphs with fp32 inputs and outputs, and fp32 islands where fp16 is unsafe.

The pass itself lives in the core (:func:`trt_bgswap.mixed_precision.to_mixed_fp16`) because
``trt-bgswap build`` applies the same one to fp32 exports built for fp16 TensorRT engines: one
pass, so the graph exported fp16 and the graph built fp16 are the same graph. It uses ONNX
Runtime's converter (``keep_io_types=True``): the runtime feeds the same fp32 arrays whatever the
precision.

The SD VAE overflows float16 (its decoder activations pass 65504; see madebyollin's
sdxl-vae-fp16-fix notes), so :func:`trt_bgswap.export.exporter.export_models` keeps the VAE
in fp32 unless asked otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trt_bgswap.mixed_precision import to_mixed_fp16


def convert_to_fp16(path: str | Path, graph_name: str | None = None) -> Any:
    """Load the fp32 graph at ``path`` and return it as fp16 with fp32 I/O and islands (an ``onnx.ModelProto``)."""
    return to_mixed_fp16(path, graph_name)
