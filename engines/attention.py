"""Memory-bounded attention for ONNX Runtime on the CPU: ``softmax(Q K^T) V`` -> ``com.microsoft.MultiHeadAttention``.

PyTorch's TorchScript ONNX exporter writes ``scaled_dot_product_attention`` as
``MatMul(Q * sqrt(s), K^T * sqrt(s)) -> Softmax(axis=-1) -> MatMul(., V)`` on
(batch, heads, tokens, head_dim) tensors. Run as written, the scores and the
probabilities are both materialised: at 1024x1024 the SD1.5 UNet's first self-attention
(8 heads over 16384 tokens) holds 2 x 8 GiB. ONNX Runtime's CPU ``MultiHeadAttention``
contrib op computes the same thing tile by tile with an online softmax (MLAS's
FlashAttention kernel; Dao et al. 2022, "FlashAttention", arXiv:2205.14135), so its
scratch memory is a few tiles per thread, independent of the token count, and it is
faster (measured in ``benchmarks/README.md``).

The rewrite keeps the exporter's scaling: the two scaled MatMul operands become the
op's query and key and its ``scale`` is 1, so no ``1/sqrt(head_dim)`` is recomputed or
assumed. ONNX Runtime takes this path only for float32 inputs, without masks or past
state, on hosts that report an L2 cache size (``onnxruntime/contrib_ops/cpu/bert/
multihead_attention.cc``: ``l2_cache_size_ > 0``; it reads ``sysconf(_SC_LEVEL2_CACHE_SIZE)``)
and unless ``ORT_DISABLE_FLASH_ATTENTION`` is set; :func:`trt_bgswap.memory.flash_attention_available`
checks the same facts at run time. float16 attention is left as it is (the CPU kernel is
float32 only). The graph stays an ONNX Runtime graph: TensorRT cannot parse contrib ops,
so TensorRT plans are built from the exported graph (TensorRT fuses attention itself).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_bgswap.attention_pattern import AttentionNodes, find_attention
from trt_bgswap.onnx_graph import splice_nodes

log = logging.getLogger(__name__)

TILED_ATTENTION = "mha-v1"  # the rewrite's version: part of the CPU build's cache key
BOUNDED = "bounded"  # every attention tiled (no scores held)
MATERIALISED = "materialised"  # some attention holds its scores, as exported
MS_DOMAIN = "com.microsoft"
MHA_OP = "MultiHeadAttention"
FLOAT = 1  # onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class RewrittenAttention:
    """One attention the rewrite replaced: its softmax's name and the head count read from the graph."""

    softmax: str
    heads: int


@dataclass
class Tiling:
    """What the rewrite did to a graph's attention."""

    tiled: list[RewrittenAttention] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # attention that could not be tiled, with the reason

    @property
    def kind(self) -> str | None:
        """BOUNDED when every attention is tiled; None when the graph has none."""
        if self.left:
            return MATERIALISED
        return BOUNDED if self.tiled else None


def _static_dims(value_info: Any) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


WEIGHTLESS_ABOVE = 1024  # elements: larger initializers keep only their type and shape for inference


def _without_weight_data(model: Any) -> Any:
    """A copy of ``model`` whose large initializers carry no data, for shape inference.

    Inference serializes the model, and protobuf refuses a message over 2 GiB: the full-size
    SD1.5 UNet with its weights loaded (3.4 GB) failed here. Inference reads only the type and
    shape of a weight; data propagation reads the values of small shape constants, which stay.
    """
    from onnx import TensorProto

    light = type(model)()
    _copy_without_initializers(model, light)
    kept = []
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if n <= WEIGHTLESS_ABOVE:
            kept.append(t)
            continue
        stub = TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims), data_location=TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value="not-loaded-for-shape-inference")
        kept.append(stub)
    light.graph.initializer.extend(kept)
    return light


def _copy_without_initializers(model: Any, into: Any) -> None:
    """``into`` = ``model`` minus its initializers (copying the whole message first would hold the weights twice)."""
    into.ir_version = model.ir_version
    into.opset_import.extend(model.opset_import)
    into.functions.extend(model.functions)
    into.graph.name = model.graph.name
    for part in ("node", "input", "output", "value_info"):
        getattr(into.graph, part).extend(getattr(model.graph, part))


def bound_attention(model: Any) -> Tiling:
    """Replace (in place) every float32 (batch, heads, tokens, dim) attention of ``model`` by ``MultiHeadAttention``.

    Cross-attention on the 77 text tokens is tiled too although its scores grow only linearly:
    the kernel is a little slower there than the two MatMuls (measured on ONNX Runtime 1.32,
    SD1.5 shapes: 13 -> 21 ms at 4096 queries), faster on self-attention (868 -> 567 ms), and
    telling the two apart needs the key length, which ONNX shape inference does not resolve
    through the exporter's reshapes. The whole UNet is faster tiled (benchmarks/README.md).
    """
    import onnx
    from onnx import helper

    graph = model.graph
    triples, _ = find_attention(graph.node, [o.name for o in graph.output])
    result = Tiling()
    if not triples:
        return result
    inferred = onnx.shape_inference.infer_shapes(_without_weight_data(model), data_prop=True)
    shapes = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    replace: dict[int, list[Any]] = {}  # index of the final MatMul -> the nodes standing in for the three
    remove: set[int] = set()
    index = {id(n): i for i, n in enumerate(graph.node)}
    for t in triples:
        name = t.softmax.name
        info = [shapes.get(x) for x in (t.q, t.k_t, t.v)]
        dims = [_static_dims(i) if i is not None else [] for i in info]
        if any(i is None for i in info):
            result.left.append(f"{name}: shapes unknown")
        elif any(i.type.tensor_type.elem_type != FLOAT for i in info):
            result.left.append(f"{name}: not float32 (ONNX Runtime's CPU kernel is float32 only)")
        elif not all(len(d) == 4 for d in dims) or dims[0][1] is None or not dims[0][1] == dims[1][1] == dims[2][1]:
            result.left.append(f"{name}: not (batch, heads, tokens, dim) attention with a static head count")
        else:
            heads = int(dims[0][1])  # type: ignore[arg-type]
            replace[index[id(t.mix)]] = _mha_nodes(helper, onnx.TensorProto.INT64, t, heads)
            remove.update({index[id(t.scores)], index[id(t.softmax)]})
            result.tiled.append(RewrittenAttention(name, heads))
    if result.tiled:
        splice_nodes(graph, replace, remove)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    for reason in result.left:
        log.info("attention left materialised: %s", reason)
    return result


def _mha_nodes(helper: Any, int64: int, t: AttentionNodes, heads: int) -> list[Any]:
    """The nodes computing ``t`` with MultiHeadAttention; the last one writes the old output's name."""
    name = t.softmax.name
    tag = name.rsplit("/", 1)[0] + "/bounded" if "/" in name else name + "_bounded"

    def const(suffix: str, values: list[int]) -> Any:
        return helper.make_node("Constant", [], [f"{tag}/{suffix}"], value=helper.make_tensor(f"{tag}/{suffix}", int64, [len(values)], values))

    return [
        const("bsd", [0, 0, -1]),
        const("bsnh", [0, 0, heads, -1]),
        # (B, N, S, H) -> (B, S, N*H), the layout MultiHeadAttention takes; ONNX Runtime's transpose
        # optimizer cancels these against the exporter's own head split where it can.
        helper.make_node("Transpose", [t.q], [f"{tag}/q_bsnh"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{tag}/q_bsnh", f"{tag}/bsd"], [f"{tag}/q"]),
        helper.make_node("Transpose", [t.k_t], [f"{tag}/k_bsnh"], perm=[0, 3, 1, 2]),  # K^T is (B, N, H, S)
        helper.make_node("Reshape", [f"{tag}/k_bsnh", f"{tag}/bsd"], [f"{tag}/k"]),
        helper.make_node("Transpose", [t.v], [f"{tag}/v_bsnh"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{tag}/v_bsnh", f"{tag}/bsd"], [f"{tag}/v"]),
        # scale 1: the exporter already multiplied both operands by sqrt(scale)
        helper.make_node(MHA_OP, [f"{tag}/q", f"{tag}/k", f"{tag}/v"], [f"{tag}/out"], domain=MS_DOMAIN, num_heads=heads, scale=1.0, name=f"{tag}/{MHA_OP}"),
        helper.make_node("Reshape", [f"{tag}/out", f"{tag}/bsnh"], [f"{tag}/out_bsnh"]),
        helper.make_node("Transpose", [f"{tag}/out_bsnh"], [t.mix.output[0]], perm=[0, 2, 1, 3]),
    ]


def attention_kind(onnx_path: str | Path) -> str | None:
    """What the tiled graph made from ``onnx_path`` holds: BOUNDED, MATERIALISED, or None (no attention)."""
    import onnx

    return bound_attention(onnx.load(str(onnx_path), load_external_data=False)).kind


def write_bounded(onnx_path: str | Path, out_path: str | Path) -> Tiling:
    """Write ``onnx_path`` with its attention tiled to ``out_path`` (beside it: external data is shared).

    Writes nothing when there is nothing to tile (``result.tiled`` is empty).
    """
    import onnx

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if out_path.parent.resolve() != onnx_path.parent.resolve():
        raise ValueError(f"{out_path} must be beside {onnx_path}: the graph refers to its weights by relative path")
    model = onnx.load(str(onnx_path), load_external_data=False)
    result = bound_attention(model)
    if result.tiled:
        onnx.save_model(model, str(out_path))
    return result
