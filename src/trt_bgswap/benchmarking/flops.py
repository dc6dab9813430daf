"""Floating-point operations of a model, counted from its ONNX graph at concrete input shapes.

Shapes come from ONNX Runtime's symbolic shape inference
(``onnxruntime.tools.symbolic_shape_infer``) after the graph inputs are pinned to the
benchmarked sizes; weights are not loaded (external data stays on disk, except tensors
small enough to be shape arithmetic, whose values the inference may need). Counted, as
2 x multiply-accumulates (the usual convention, e.g. the "FLOPs" of the Stable Diffusion
and IS-Net papers' tables are MACs x 2):

- ``Conv``: N x C_out x prod(out spatial) x (C_in / group) x prod(kernel)
- ``ConvTranspose``: N x C_in x prod(in spatial) x (C_out / group) x prod(kernel)
- ``MatMul`` / ``Gemm``: prod(output) x K (the contracted dimension)
- ``MultiHeadAttention`` / ``Attention`` (ONNX Runtime contrib ops, in optimized graphs):
  the two batched products Q K^T and P V, plus ``Attention``'s packed QKV projection.

Elementwise ops, normalisations, softmax and resizes are not counted (they are
memory-bound and a few percent of the arithmetic); ``uncounted`` lists heavy ops whose
shapes could not be inferred, so a total is never silently low.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_bgswap.errors import BackendUnavailable, ModelError

log = logging.getLogger(__name__)

SMALL_TENSOR_ELEMENTS = 65536  # external initializers up to this size (biases, norms, shape constants) are read; shape inference may need their values
COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "MultiHeadAttention", "Attention")


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one graph at one set of input shapes."""

    total: int
    by_op: dict[str, int]
    nodes: dict[str, int]  # counted nodes per op type
    uncounted: dict[str, int] = field(default_factory=dict)  # heavy nodes with unknown shapes

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "gflops": self.total / 1e9, "by_op": self.by_op, "nodes": self.nodes, "uncounted": self.uncounted}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise BackendUnavailable("counting FLOPs needs the onnx package; pip install onnx") from e
    return onnx


def _pin_inputs(model: Any, dims: Mapping[str, Sequence[int]]) -> None:
    inputs = {i.name: i for i in model.graph.input}
    unknown = sorted(set(dims) - set(inputs))
    if unknown:
        raise ModelError(f"inputs {unknown} are not in the graph (it has {sorted(inputs)})")
    for name, shape in dims.items():
        tdims = inputs[name].type.tensor_type.shape.dim
        if len(tdims) != len(shape):
            raise ModelError(f"input {name} has rank {len(tdims)} in the graph but shape {list(shape)} was given")
        for d, v in zip(tdims, shape):
            d.ClearField("dim_param")
            d.dim_value = int(v)


def _load_small_external_tensors(model: Any, base_dir: Path) -> None:
    """Read the small external initializers (shape arithmetic constants) but never the weights."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for t in model.graph.initializer:
        if uses_external_data(t) and math.prod(t.dims) <= SMALL_TENSOR_ELEMENTS:
            load_external_data_for_tensor(t, str(base_dir))


def _shape_table(model: Any) -> dict[str, list[int | None]]:
    table: dict[str, list[int | None]] = {}
    graph = model.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            table[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in graph.initializer:
        table[init.name] = list(init.dims)
    return table


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def node_flops(node: Any, shapes: Mapping[str, list[int | None]]) -> int | None:
    """FLOPs of one node, or None when a needed shape is unknown (0 for ops not counted)."""
    get = lambda i: shapes.get(node.input[i]) if len(node.input) > i and node.input[i] else None  # noqa: E731
    out = shapes.get(node.output[0]) if node.output else None
    op = node.op_type
    attrs = {a.name: a for a in node.attribute}
    if op == "Conv":
        w = get(1)
        if not (_known(w) and _known(out)):
            return None
        return 2 * math.prod(out) * math.prod(w[1:])  # out = N*Cout*spatial; w[1:] = Cin/group * kernel
    if op == "ConvTranspose":
        x, w = get(0), get(1)
        if not (_known(x) and _known(w)):
            return None
        return 2 * math.prod(x) * math.prod(w[1:])  # x = N*Cin*spatial; w = Cin x Cout/group x kernel
    if op in ("MatMul", "Gemm"):
        a = get(0)
        if not (_known(a) and _known(out)):
            return None
        trans_a = op == "Gemm" and "transA" in attrs and attrs["transA"].i == 1
        k = a[0] if trans_a else a[-1]
        return 2 * math.prod(out) * k
    if op == "MultiHeadAttention":
        q, k = get(0), get(1)
        if not (_known(q) and _known(k)) or len(q) != 3 or len(k) != 3:
            return None
        b, s, d = q
        return 2 * 2 * b * s * k[1] * d
    if op == "Attention":
        x, w = get(0), get(1)
        if not (_known(x) and _known(w)):
            return None
        b, s, d_in = x
        d = w[1] // 3
        return 2 * b * s * d_in * w[1] + 2 * 2 * b * s * s * d
    return 0


def count_flops(onnx_path: str | Path, dims: Mapping[str, Sequence[int]]) -> FlopCount:
    """Count the FLOPs of ``onnx_path`` with its inputs pinned to ``dims`` (name -> shape)."""
    onnx = _onnx()
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends
        raise ModelError(f"{path}: not a readable ONNX graph ({e})") from e
    _load_small_external_tensors(model, path.parent)
    _pin_inputs(model, dims)
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = _shape_table(inferred)
    by_op: Counter[str] = Counter()
    nodes: Counter[str] = Counter()
    uncounted: Counter[str] = Counter()
    for node in inferred.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        f = node_flops(node, shapes)
        if f is None:
            uncounted[node.op_type] += 1
            continue
        by_op[node.op_type] += f
        nodes[node.op_type] += 1
    if uncounted:
        log.warning("%s: %s nodes have unknown shapes and are not counted", path, dict(uncounted))
    return FlopCount(total=sum(by_op.values()), by_op=dict(by_op), nodes=dict(nodes), uncounted=dict(uncounted))
