"""Cut a built graph into consecutive parts of about equal weights (the ``--low-memory`` UNet); see :mod:`trt_bgswap.graph_parts`.

Works on the graph proto only (``load_external_data=False``): the parts' initializers keep the
whole graph's external-data references, so a 3.4 GB UNet is cut in a second and no weight is
copied. ONNX Runtime's pre-optimized graphs carry no ``value_info`` and use contrib ops that
ONNX's shape inference does not know, so the dtype of each tensor crossing a cut is propagated
here with ONNX's type rules (:func:`tensor_dtypes`); a cut where one is unknown is not taken.
"""

from __future__ import annotations

import glob
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import atomic_path
from trt_bgswap.graph_parts import PARTS_VERSION, GraphPart, manifest_json, parts_manifest_path, read_parts
from trt_bgswap.onnx_graph import elem_type
from trt_bgswap.specs import ONNX_TYPES

log = logging.getLogger(__name__)

_ONNX_TO_DTYPE = {elem_type(d): d for d in ONNX_TYPES}  # the element types a part's I/O may have (specs' dtypes)

# Graphs with more weights than this are cut for --low-memory: the full SD1.5 UNet (3.44 GB) into
# 3 parts of ~1.15 GB; the VAE (0.33 GB), text encoder and RMBG stay whole.
PART_BYTES = 5 * 2**30 // 4
# How far past a part's target (in nodes) a cut may move to find one whose crossing tensors all have known dtypes.
CUT_SEARCH = 400
# A part's weight ranges closer than this are read as one range (alignment padding; the full SD1.5 UNet's
# parts come out as 32-47 ranges each, their sum within 0.1 % of the part's weight bytes).
MERGE_GAP = 64 << 10

_INT64_OPS = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin"}
_BOOL_OPS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}


def _tensor_bytes(t: Any) -> int:
    from onnx import helper

    dims = math.prod(t.dims)
    return dims * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def tensor_dtypes(graph: Any) -> dict[str, int]:
    """ONNX element types of every tensor whose type ONNX's rules determine, in node order.

    An op's outputs take its first typed input's type unless the op fixes them (Shape -> int64,
    Cast -> ``to``, comparisons -> bool, Constant -> its value's, ConstantOfShape -> its value's or
    float, Where -> its second input's, TopK's indices -> int64); that holds for every standard op
    in these graphs and for ONNX Runtime's float contrib ops (com.microsoft, com.microsoft.nchwc).
    """
    types: dict[str, int] = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        typed = [types[i] for i in node.input if i and i in types]
        if node.op_type in _INT64_OPS:
            out = [7] * len(node.output)
        elif node.op_type == "Cast":
            out = [attrs["to"].i]
        elif node.op_type in _BOOL_OPS:
            out = [9]
        elif node.op_type == "Constant":
            out = [attrs["value"].t.data_type] if "value" in attrs else []
        elif node.op_type == "ConstantOfShape":
            out = [attrs["value"].t.data_type if "value" in attrs else 1]
        elif node.op_type == "Where":
            out = [types[node.input[1]]] if node.input[1] in types else []
        elif node.op_type == "TopK":
            out = [typed[0], 7] if typed else []
        else:
            out = [typed[0]] * len(node.output) if typed else []
        for name, t in zip(node.output, out):
            if name:
                types[name] = t
    return types


def _plan_cuts(graph: Any, parts: int, types: dict[str, int]) -> list[int] | None:
    """Node indices where parts begin (after 0), each near an equal share of the weights, every crossing tensor typed."""
    nodes = list(graph.node)
    init_bytes = {t.name: _tensor_bytes(t) for t in graph.initializer}
    seen: set[str] = set()
    weight_at: list[int] = []
    for node in nodes:
        w = 0
        for i in node.input:
            if i in init_bytes and i not in seen:
                seen.add(i)
                w += init_bytes[i]
        weight_at.append(w)
    total = sum(weight_at)
    last_use: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for i in node.input:
            last_use[i] = k
    outputs = {o.name for o in graph.output}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}

    def crossing(cut: int) -> list[str]:
        return sorted(t for t, k in producer.items() if k < cut and (last_use.get(t, -1) >= cut or t in outputs))

    cuts: list[int] = []
    acc, k = 0, 0
    for share in range(1, parts):
        target = total * share / parts
        while k < len(nodes) and acc + weight_at[k] <= target:
            acc += weight_at[k]
            k += 1
        for cut in range(k, min(k + CUT_SEARCH, len(nodes))):
            if cut > (cuts[-1] if cuts else 0) and all(t in types and types[t] in _ONNX_TO_DTYPE for t in crossing(cut)):
                cuts.append(cut)
                break
        else:
            return None
    return cuts


def weight_ranges(initializers: Sequence[Any], merge_gap: int = MERGE_GAP) -> tuple[tuple[str, int, int], ...]:
    """The external-data byte ranges ``initializers`` reference, per file, sorted, merged where less than ``merge_gap`` apart."""
    from onnx import TensorProto

    spans: dict[str, list[tuple[int, int]]] = {}
    for t in initializers:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        ext = {e.key: e.value for e in t.external_data}
        spans.setdefault(ext["location"], []).append((int(ext.get("offset", 0)), int(ext["length"])))
    merged: list[tuple[str, int, int]] = []
    for location in sorted(spans):
        start = end = -1
        for offset, length in sorted(spans[location]):
            if start >= 0 and offset - end < merge_gap:
                end = max(end, offset + length)
                continue
            if start >= 0:
                merged.append((location, start, end - start))
            start, end = offset, offset + length
        if start >= 0:
            merged.append((location, start, end - start))
    return tuple(merged)


def split_graph(graph_path: Path, parts: int, model: Any = None) -> list[GraphPart] | None:
    """Write ``parts`` part graphs and their manifest beside ``graph_path``; None when the graph cannot be cut (it then runs whole).

    ``model``: the graph proto already loaded without its external data.
    """
    import onnx
    from onnx import helper

    graph_path = Path(graph_path)
    if model is None:
        model = onnx.load(str(graph_path), load_external_data=False)
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        log.info("%s: has control flow; not cut into parts", graph_path)
        return None
    types = tensor_dtypes(g)
    cuts = _plan_cuts(g, parts, types)
    if cuts is None:
        log.warning("%s: no cut with typed crossing tensors; --low-memory runs it whole", graph_path)
        return None
    nodes = list(g.node)
    bounds = [0, *cuts, len(nodes)]
    graph_inputs = {i.name for i in g.input}
    graph_outputs = [o.name for o in g.output]
    inits = {t.name: t for t in g.initializer}
    later_use: list[set[str]] = []
    for p in range(len(bounds) - 1):
        later_use.append({i for n in nodes[bounds[p + 1] :] for i in n.input} | set(graph_outputs))
    written: list[GraphPart] = []
    available = set(graph_inputs)
    for p in range(len(bounds) - 1):
        part_nodes = nodes[bounds[p] : bounds[p + 1]]
        produced = {o for n in part_nodes for o in n.output if o}
        used = [i for n in part_nodes for i in n.input if i]
        ins = sorted({i for i in used if i not in produced and i not in inits})
        missing = [i for i in ins if i not in available]
        if missing:
            raise RuntimeError(f"{graph_path}: part {p} reads {missing[:3]} that no earlier part produces")
        outs = sorted(o for o in produced if o in later_use[p])
        part_inits = [inits[i] for i in dict.fromkeys(used) if i in inits]

        def info(name: str) -> Any:
            return helper.make_tensor_value_info(name, types[name], None)

        part_graph = helper.make_graph(part_nodes, f"{g.name}_part{p}", [info(i) for i in ins], [info(o) for o in outs], part_inits)
        part_model = helper.make_model(part_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        name = f"{graph_path.name}.part{p}of{len(bounds) - 1}.onnx"
        with atomic_path(graph_path.parent / name) as tmp:
            onnx.save_model(part_model, str(tmp))  # initializers keep their external-data references
        written.append(
            GraphPart(
                name,
                tuple((i, _ONNX_TO_DTYPE[types[i]]) for i in ins),
                tuple((o, _ONNX_TO_DTYPE[types[o]]) for o in outs),
                sum(_tensor_bytes(t) for t in part_inits),
                weight_ranges(part_inits),
            )
        )
        available |= produced
    with atomic_path(parts_manifest_path(graph_path)) as tmp:
        tmp.write_text(manifest_json(graph_path, written))
    current = {p.file for p in written}
    for stale in graph_path.parent.glob(f"{glob.escape(graph_path.name)}.part*of*.onnx"):  # an earlier build's cut
        if stale.name not in current:
            stale.unlink(missing_ok=True)
    log.info(
        "%s: %d parts for --low-memory (%s of weights)", graph_path.name, len(written), ", ".join(f"{p.weight_bytes / 2**30:.2f} GiB" for p in written)
    )
    return written


def parts_for(weights_bytes: int, part_bytes: int = PART_BYTES) -> int:
    return max(1, math.ceil(weights_bytes / part_bytes))


def ensure_parts(graph_paths: Sequence[Path], part_bytes: int = PART_BYTES) -> None:
    """Cut every CPU graph whose weights exceed ``part_bytes`` (once: a set of the current version is kept)."""
    import onnx

    for path in graph_paths:
        path = Path(path)
        model = onnx.load(str(path), load_external_data=False)
        n = parts_for(sum(_tensor_bytes(t) for t in model.graph.initializer), part_bytes)
        if n > 1 and read_parts(path, versions=(PARTS_VERSION,)) is None:
            split_graph(path, n, model)
