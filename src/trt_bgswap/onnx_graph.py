"""Generic ONNX graph reading and surgery, in one place for the export and the engine builders.

Everything here works on ``onnx.ModelProto`` objects or files and knows nothing of a particular
model: dims of a value, the opset, every tensor including subgraph constants, the external
weights a file needs, the one check of a graph's I/O against its :class:`~trt_bgswap.specs.ModelSpec`,
writing a spec's dims onto a graph, pruning to some outputs, fp32 I/O around an fp16 graph,
pinning symbolic input dims. ``onnx`` is imported inside the functions: the runtime never calls
them, and importing this module costs nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.specs import ONNX_TYPES, ModelSpec, TensorSpec

log = logging.getLogger(__name__)

COPY_CHUNK = 64 * 2**20  # bytes per read when copying a tensor between weight files

GraphDim = Union[int, str, None]  # static size, symbolic name, unknown
QUANTIZED_OPS = frozenset({"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"})
DEFAULT_DOMAINS = ("", "ai.onnx")


def type_name(elem_type: int) -> str:
    """``onnx.TensorProto`` element type -> its name (``FLOAT``, ``FLOAT16``, ...)."""
    import onnx

    return onnx.TensorProto.DataType.Name(elem_type)


def elem_type(dtype: str) -> int:
    """A spec dtype (``float32``, ...) -> ``onnx.TensorProto`` element type, through the one map in specs.py."""
    import onnx

    return int(onnx.TensorProto.DataType.Value(ONNX_TYPES[dtype]))


def dims_of(value: Any) -> list[GraphDim]:
    """A ValueInfo's dims as ints (static), strings (symbolic) or None (unknown)."""
    out: list[GraphDim] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def set_dims(value: Any, dims: Iterable[GraphDim]) -> None:
    """Write dims on a graph input/output in place (ints static, strings symbolic)."""
    shape = value.type.tensor_type.shape
    shape.ClearField("dim")
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        else:
            dim.dim_param = str(d)


def value_info(t: TensorSpec) -> Any:
    """An ONNX ValueInfo for a spec tensor (symbolic dims stay symbolic)."""
    from onnx import helper

    return helper.make_tensor_value_info(t.name, elem_type(t.dtype), list(t.shape))


def opset_of(model: Any) -> int:
    """The default-domain opset a model imports."""
    for o in model.opset_import:
        if o.domain in DEFAULT_DOMAINS:
            return int(o.version)
    raise ModelError(f"graph {model.graph.name!r} has no default-domain opset")


def iter_graphs(graph: Any) -> Iterator[Any]:
    """The graph and all its subgraphs (If/Loop/Scan bodies)."""
    import onnx

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def all_tensors(graph: Any) -> list[Any]:
    """Initializers and constant-attribute tensors of a graph and its subgraphs (where external weights can live)."""
    import onnx

    found = []
    for g in iter_graphs(graph):
        found.extend(g.initializer)
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    found.append(attr.t)
                elif attr.type == onnx.AttributeProto.TENSORS:
                    found.extend(attr.tensors)
    return found


def splice_nodes(graph: Any, replace: Mapping[int, Sequence[Any]], remove: Iterable[int] = ()) -> None:
    """Rewrite ``graph.node`` in place: node ``i`` becomes ``replace[i]`` (in its position, keeping the order
    topological), nodes in ``remove`` go; the others stay."""
    dropped = set(remove)
    new_nodes: list[Any] = []
    for i, n in enumerate(graph.node):
        if i not in dropped:
            new_nodes.extend(replace.get(i, [n]))
    del graph.node[:]
    graph.node.extend(new_nodes)


def keep_used_initializers(graph: Any, added: Sequence[Any] = ()) -> None:
    """After a rewrite: drop the initializers no node reads any more, then append the rewrite's ``added`` ones."""
    used = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *added])


def external_data_files(onnx_path: str | Path) -> list[Path]:
    """The files holding an ONNX model's external weights (sorted, each once)."""
    import onnx

    onnx_path = Path(onnx_path)
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends for corrupt files
        raise ModelError(f"{onnx_path}: not a readable ONNX model ({e}); re-run `trt-bgswap export`") from e
    locations: set[str] = set()
    for t in all_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(entry.value for entry in t.external_data if entry.key == "location")
    return [onnx_path.parent / loc for loc in sorted(locations)]


def external_info(tensor: Any) -> dict[str, str]:
    """A tensor's ``external_data`` entries (location, offset, length) as a dict."""
    return {e.key: e.value for e in tensor.external_data}


def write_with_external_data(model: Any, src_dir: Path, graph_path: Path, data_name: str) -> int:
    """Save ``model`` with every initializer's bytes in ``graph_path``'s folder / ``data_name``, one tensor at a time.

    Tensors still in the proto (``raw_data``) are moved out; tensors left in files under ``src_dir``
    (the tracer's one-file-per-tensor layout for graphs over 2 GiB) are copied in chunks without
    being loaded. Why not ``onnx.save_model(save_as_external_data=True)``: that needs every weight
    in memory (``onnx.load`` with its data): beside the module being exported, twice the model's
    size at the export's peak (the SDXL UNet: 2 x 10.3 GB). Tensors kept in typed fields stay in
    the proto, as onnx's own conversion leaves them. Returns the bytes written.
    """
    import onnx

    src_root = src_dir.resolve()
    total = 0
    with open(graph_path.parent / data_name, "wb") as out:
        for t in model.graph.initializer:
            offset = out.tell()
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = external_info(t)
                src = (src_root / info["location"]).resolve()
                if src_root not in src.parents:
                    raise ModelError(f"tensor {t.name!r}'s weights file {info['location']!r} is outside {src_dir}")
                start = int(info.get("offset", 0))
                left = int(info["length"]) if "length" in info else src.stat().st_size - start
                with open(src, "rb") as f:
                    f.seek(start)
                    while left:
                        chunk = f.read(min(left, COPY_CHUNK))
                        if not chunk:
                            raise ModelError(f"{src}: ends before tensor {t.name!r}'s {left} last bytes")
                        out.write(chunk)
                        left -= len(chunk)
            elif t.HasField("raw_data"):
                out.write(t.raw_data)
                t.ClearField("raw_data")
            else:
                continue
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", offset), ("length", out.tell() - offset)):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
            total += out.tell() - offset
    onnx.save_model(model, str(graph_path))
    return total


def weights_nbytes(model: Any) -> int:
    """Bytes of the initializers (what decides whether the proto fits in 2 GiB), loaded or left in external files.

    An external tensor without a ``length`` entry counts its element count times its element size.
    """
    import onnx
    from onnx import numpy_helper

    def external_nbytes(t: Any) -> int:
        length = external_info(t).get("length")
        if length is not None:
            return int(length)
        return math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    return sum(
        external_nbytes(t) if t.data_location == onnx.TensorProto.EXTERNAL else len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes
        for t in model.graph.initializer
    )


def graph_precision(model: Any) -> str:
    """What a graph really computes in: ``int8`` (quantized ops), ``fp16`` (fp16 weights) or ``fp32``."""
    import onnx

    if any(n.op_type in QUANTIZED_OPS for n in model.graph.node):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


# --- the graph against its spec ---


@dataclass(frozen=True)
class SpecMismatch:
    kind: str  # "missing", "dtype", "rank", "dim" (a fixed dim differs) or "frozen" (a symbolic dim is fixed in the graph)
    tensor: TensorSpec
    is_input: bool
    message: str


def spec_mismatches(model: Any, spec: ModelSpec) -> list[SpecMismatch]:
    """Every way a graph's I/O differs from its spec: names, dtypes, ranks, fixed dims, and symbolic dims the graph froze."""
    g = model.graph
    init = {t.name for t in g.initializer}
    graph_io = {vi.name: vi for vi in (*g.input, *g.output) if vi.name not in init}
    found: list[SpecMismatch] = []
    for t in (*spec.inputs, *spec.outputs):
        is_input = t in spec.inputs
        vi = graph_io.get(t.name)
        if vi is None:
            found.append(SpecMismatch("missing", t, is_input, f"{spec.name}: the graph has no tensor {t.name!r} declared in the model's spec"))
            continue
        got_type = type_name(vi.type.tensor_type.elem_type)
        if ONNX_TYPES.get(t.dtype) != got_type:
            found.append(SpecMismatch("dtype", t, is_input, f"{spec.name}.{t.name}: the graph says {got_type}, the spec {t.dtype}"))
        dims = dims_of(vi)
        if len(dims) != len(t.shape):
            found.append(SpecMismatch("rank", t, is_input, f"{spec.name}.{t.name}: the graph has rank {len(dims)}, the spec {t.shape}"))
            continue
        for axis, (want, have) in enumerate(zip(t.shape, dims)):
            if isinstance(want, int) and isinstance(have, int) and have != want:
                found.append(SpecMismatch("dim", t, is_input, f"{spec.name}.{t.name}: dim {axis} is {have} in the graph, {want} in the spec"))
            if isinstance(want, str) and isinstance(have, int) and have > 0:
                found.append(SpecMismatch("frozen", t, is_input, f"{spec.name}.{t.name}: dim {axis} ({want}) is fixed to {have} in the graph; it must stay dynamic"))
    return found


def check_graph_against_spec(path: Path, spec: ModelSpec) -> None:
    """A saved graph's inputs and outputs must be exactly the spec's: names in order, dtypes, ranks, fixed dims, and
    symbolic dims left dynamic."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for kind, declared, actual in (("input", spec.inputs, model.graph.input), ("output", spec.outputs, model.graph.output)):
        got = [v.name for v in actual]
        if got != [t.name for t in declared]:
            raise ModelError(f"{path}: graph {kind}s {got} differ from the {spec.name} spec {[t.name for t in declared]}")
    problems = [m.message for m in spec_mismatches(model, spec)]
    if problems:
        raise ModelError(f"{path}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "") + "; re-run `trt-bgswap export`")


def stamp_spec(model: Any, spec: ModelSpec) -> None:
    """Write the spec's dims onto the graph's I/O (the tracer names output dims after internal nodes).

    Strict shape inference afterwards rejects a graph whose computed shapes contradict them.
    """
    for declared, values in ((spec.inputs, model.graph.input), (spec.outputs, model.graph.output)):
        by_name = {v.name: v for v in values}
        for t in declared:
            if t.name in by_name and len(by_name[t.name].type.tensor_type.shape.dim) == len(t.shape):
                set_dims(by_name[t.name], t.shape)


# --- surgery ---


def _subgraph_names(node: Any) -> set[str]:
    """Every tensor name the subgraphs of a control-flow node read (they may reach outer scope)."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for n in g.node:
                names.update(n.input)
                if any(a.HasField("g") or len(a.graphs) for a in n.attribute):
                    names |= _subgraph_names(n)
    return names


def prune_to_outputs(model: Any, keep: Sequence[str]) -> Any:
    """A copy of ``model`` whose outputs are ``keep`` only, without the nodes and weights nothing else needs."""
    import onnx

    graph = model.graph
    by_name = {o.name: o for o in graph.output}
    missing = [k for k in keep if k not in by_name]
    if missing:
        raise ModelError(f"graph has no outputs {missing} (has {list(by_name)})")
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    needed_nodes: set[int] = set()
    needed: set[str] = set(keep)
    stack = list(keep)
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in needed_nodes:
            continue
        needed_nodes.add(i)
        node = graph.node[i]
        for name in [*node.input, *_subgraph_names(node)]:
            if name and name not in needed:
                needed.add(name)
                stack.append(name)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    g = pruned.graph
    nodes = [n for i, n in enumerate(graph.node) if i in needed_nodes]
    inits = [t for t in graph.initializer if t.name in needed]
    for field in ("node", "initializer", "input", "value_info", "output"):
        g.ClearField(field)
    g.node.extend(nodes)
    g.initializer.extend(inits)
    g.input.extend(v for v in graph.input if v.name in needed)
    g.value_info.extend(v for v in graph.value_info if v.name in needed)
    g.output.extend(by_name[k] for k in keep)
    if len(nodes) < len(graph.node):
        log.info("pruned %d of %d nodes and %d of %d weights only other outputs needed", len(graph.node) - len(nodes), len(graph.node), len(graph.initializer) - len(inits), len(graph.initializer))
    return pruned


def cast_boundary_to_fp32(model: Any, input_name: str, output_name: str) -> None:
    """Give a graph with fp16 I/O fp32 I/O (same names) via Cast nodes, in place."""
    import onnx
    from onnx import helper

    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    g = model.graph
    inp = next(v for v in g.input if v.name == input_name)
    out = next(v for v in g.output if v.name == output_name)
    if inp.type.tensor_type.elem_type == fp16:
        inner = f"{input_name}__fp16"
        for node in g.node:
            node.input[:] = [inner if n == input_name else n for n in node.input]
        g.node.insert(0, helper.make_node("Cast", [input_name], [inner], to=fp16, name=f"{inner}_cast"))
        inp.type.tensor_type.elem_type = fp32
    if out.type.tensor_type.elem_type == fp16:
        inner = f"{output_name}__fp16"
        for node in g.node:
            node.output[:] = [inner if n == output_name else n for n in node.output]
        g.node.append(helper.make_node("Cast", [inner], [output_name], to=fp32, name=f"{output_name}_cast"))
        out.type.tensor_type.elem_type = fp32


def pin_symbols(model: Any, symbols: Mapping[str, int]) -> None:
    """Replace the symbolic dims of a graph's inputs by the given sizes, in place."""
    for value in model.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                if d.dim_param not in symbols:
                    raise UsageError(f"input {value.name} has symbol {d.dim_param!r}; give its size to pin it")
                v = int(symbols[d.dim_param])
                d.ClearField("dim_param")
                d.dim_value = v
