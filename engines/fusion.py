"""ONNX Runtime's transformer fusions for the CPU: fused attention and normalisation in one graph.

ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer``, model types
``unet`` / ``clip`` / ``vae`` as its Stable Diffusion scripts use them) rewrites attention
subgraphs into its ``Attention`` / ``MultiHeadAttention`` contrib ops and fuses
LayerNormalization / SkipLayerNormalization. On the CPU provider a fused attention node
computes softmax(QK^T)V without materialising the full score tensor through separate
MatMul/Softmax kernels (measured here: ~25% faster on a 4096-token SD1.5 self-attention).
Fusions whose ops only have CUDA kernels (GroupNorm, SkipGroupNorm, BiasSplitGelu,
NhwcConv, BiasAdd, packed QKV/KV) are switched off.

Two details of the optimizer are worked around here, without patching it:

- its symbolic shape inference runs sympy over every symbolic dim and takes minutes on the
  full UNet; the graph inputs are pinned to the benchmark's sizes while fusing, and the
  original symbolic inputs/outputs are put back afterwards (the fused ops carry no
  size-specific constants; :mod:`~trt_bgswap.engines.cpu_fast` checks parity at another
  size to prove it);
- with current numpy its UNet attention fusion fails reading ``num_heads`` from a
  one-element array; :class:`_FusionAttentionUnet` reads it with ``.item()``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trt_bgswap.engines.attention import bound_attention
from trt_bgswap.engines.upsample import subpixel_upsampling
from trt_bgswap.engines.winograd import winograd_convolutions
from trt_bgswap.errors import BackendUnavailable, UsageError
from trt_bgswap.onnx_graph import pin_symbols, write_with_external_data

log = logging.getLogger(__name__)

# Our model name -> the optimizer's model type. VAE attention in today's diffusers export
# does not match the optimizer's VAE pattern (nothing fuses), so it is not in the default set.
FUSION_MODEL_TYPES = {"unet": "unet", "text_encoder": "clip", "vae_encoder": "vae", "vae_decoder": "vae"}
DEFAULT_FUSED = ("unet", "text_encoder")
CUDA_ONLY_FUSIONS = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_packed_qkv",
    "enable_packed_kv",
    "enable_bias_add",
)
FUSION_VERSION = 1  # bump when the fusion recipe changes: it is part of the cache key


def _optimizer_modules() -> tuple[Any, Any, Any, Any]:
    try:
        import onnxruntime.transformers.optimizer  # noqa: F401  (puts the tools' folder on sys.path)
        from onnxruntime.transformers.fusion_attention_unet import FusionAttentionUnet
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import MODEL_TYPES
        from onnxruntime.transformers.onnx_model_unet import UnetOnnxModel
    except ImportError as e:
        raise BackendUnavailable(f"the transformer optimizer needs onnx and onnxruntime's tools ({e}); pip install onnx") from e
    return FusionAttentionUnet, FusionOptions, MODEL_TYPES, UnetOnnxModel


def _model_class(model_type: str) -> Any:
    FusionAttentionUnet, _, MODEL_TYPES, UnetOnnxModel = _optimizer_modules()

    class _FusionAttentionUnet(FusionAttentionUnet):  # type: ignore[misc, valid-type]
        def get_num_heads(self, reshape_q: Any, is_torch2: bool = False) -> int:
            if is_torch2:
                parent = self.model.get_parent(reshape_q, 1)
                if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                    value = self.model.get_constant_value(parent.input[2])
                    if isinstance(value, np.ndarray) and value.size == 1 and int(value.item()) > 0:
                        return int(value.item())
            return int(super().get_num_heads(reshape_q, is_torch2))

    class _UnetModel(UnetOnnxModel):  # type: ignore[misc, valid-type]
        def optimize(self, options: Any = None) -> None:
            self._optimize(options, None)  # the same passes, without the tqdm bar on stderr

        def fuse_multi_head_attention(self, options: Any = None) -> None:
            for cross in (False, True):
                _FusionAttentionUnet(
                    self, self.hidden_size, self.num_heads, is_cross_attention=cross, enable_packed_qkv=False, enable_packed_kv=False
                ).apply()

    if model_type == "unet":
        return _UnetModel
    if model_type not in MODEL_TYPES:
        raise UsageError(f"model type {model_type!r}: the transformer optimizer knows {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type][0]


def cpu_fusion_options(model_type: str) -> Any:
    """The optimizer's options for ``model_type`` with the CUDA-only fusions off."""
    _, FusionOptions, _, _ = _optimizer_modules()
    options = FusionOptions(model_type)
    for name in CUDA_ONLY_FUSIONS:
        if hasattr(options, name):
            setattr(options, name, False)
    return options


PARKED = "weights-not-loaded-while-fusing"  # the location large weights point at while the optimizer runs
PARK_ABOVE = 1 << 20  # bytes: matrices and kernels this large stay on disk while fusing (biases, norm scales and shape constants are far smaller)


def park_large_weights(model: Any, base_dir: Path, above: int = PARK_ABOVE) -> dict[str, list[tuple[str, str]]]:
    """Load ``model``'s small external tensors; point the large ones (rank >= 2, over ``above`` bytes) at :data:`PARKED`, in place.

    Returns each parked tensor's real ``external_data`` entries, for :func:`unpark_weights`.
    Why: the optimizer's passes copy the whole model (shape inference serializes it, the
    symbolic inference clones it): the full SD1.5 UNet (3.44 GB of weights) peaked at 20.3 GB
    fused with its weights loaded. The CPU fusions read values of small tensors only (biases,
    norm scales, shape constants; attention is tiled before the optimizer runs, so its
    attention fusion, which reads the Q/K/V matrices, finds nothing); a pass that reads a
    parked tensor fails loudly (no such file) and :func:`fuse_transformer` fuses again with
    every weight loaded.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    parked: dict[str, list[tuple[str, str]]] = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        nbytes = math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if len(t.dims) < 2 or nbytes <= above:
            load_external_data_for_tensor(t, str(base_dir))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
            continue
        parked[t.name] = [(e.key, e.value) for e in t.external_data]
        del t.external_data[:]
        t.external_data.add(key="location", value=PARKED)
    return parked


def unpark_weights(model: Any, parked: Mapping[str, list[tuple[str, str]]]) -> None:
    """Give parked tensors that survived the fusions their real ``external_data`` entries back."""
    for t in model.graph.initializer:
        entries = parked.get(t.name)
        if entries is not None and any(e.value == PARKED for e in t.external_data):
            del t.external_data[:]
            for key, value in entries:
                t.external_data.add(key=key, value=value)


def _optimize(model: Any, model_type: str, symbols: Mapping[str, int]) -> tuple[Any, dict[str, int]]:
    """The optimizer's passes on ``model`` (changed in place): the fused model and its fused-op counts."""
    inputs = {v.name: copy.deepcopy(v) for v in model.graph.input}
    outputs = {v.name: copy.deepcopy(v) for v in model.graph.output}
    bound_attention(model)  # first: the optimizer's own attention fusion (contrib Attention) holds the scores on the CPU
    pin_symbols(model, symbols)
    optimizer = _model_class(model_type)(model, 0, 0)
    optimizer.optimize(cpu_fusion_options(model_type))
    optimizer.topological_sort()
    fused = optimizer.get_fused_operator_statistics()
    graph = optimizer.model.graph
    for v in graph.input:
        v.CopyFrom(inputs[v.name])
    for v in graph.output:
        v.CopyFrom(outputs[v.name])
    del graph.value_info[:]  # shapes inferred at the pinned size must not constrain other sizes
    return optimizer.model, {k: int(v) for k, v in fused.items() if v}


def fuse_transformer(
    onnx_path: str | Path, out_path: str | Path, model_type: str, symbols: Mapping[str, int], data_name: str | None, park_above: int = PARK_ABOVE
) -> dict[str, int]:
    """Fuse ``onnx_path`` with the optimizer for ``model_type``; writes ``out_path`` (+ ``data_name`` weights).

    Large weights stay on disk while the optimizer runs (:func:`park_large_weights`) and are
    copied into ``data_name`` afterwards, one tensor at a time. Returns the fused-op counts the
    optimizer reports. Inputs/outputs keep their symbolic dims.
    """
    import onnx

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    src = onnx.load(str(onnx_path), load_external_data=False)
    parked = park_large_weights(src, onnx_path.parent, park_above)
    try:
        model, fused = _optimize(src, model_type, symbols)
    except Exception as e:  # noqa: BLE001 - the optimizer's passes raise whatever reading a parked tensor raises
        if not parked or PARKED not in str(e):
            raise
        log.warning("%s: a fusion pass read a weight left on disk (%s); fusing again with every weight loaded", onnx_path, e)
        model, fused = _optimize(onnx.load(str(onnx_path)), model_type, symbols)
        parked = {}
    unpark_weights(model, parked)
    subpixel_upsampling(model, onnx_path.parent)  # after the optimizer: its passes need not know the phase convolutions
    winograd_convolutions(model, onnx_path.parent)  # after the sub-pixel rewrite, which leaves 2x2 kernels alone
    if data_name is not None:
        write_with_external_data(model, onnx_path.parent, out_path, data_name)
    else:
        onnx.load_external_data_for_model(model, str(onnx_path.parent))
        onnx.save_model(model, str(out_path))
    return fused
