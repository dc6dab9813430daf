"""An exported graph's memory facts, measured from the graph itself (the cost model's input).

What a generation costs is decided by the tensors ONNX Runtime holds at once. This module
finds every intermediate tensor's byte size at a few small sizes, fits it as
``c0 + c1*B + c2*B*area + c3*B*area**2`` (exact for tensors whose dims are the batch, the
latent rows and columns over a power of two, tokens = their product, and fixed counts; the
``area**2`` tensors are attention scores), then replays the executor's freeing order (a
tensor dies after its last consumer; ONNX Runtime runs the nodes in the graph's topological
order) to get the live set at every node, and keeps the live sets that can be the peak
(:func:`trt_bgswap.memory.dominant`). A second replay leaves out the attention scores and
probabilities, which ONNX Runtime's tiled ``MultiHeadAttention`` never holds
(:mod:`trt_bgswap.engines.attention`), and holds the attention output instead.

Sizes come from ONNX shape inference where it resolves every tensor (convolutional nets at a
fixed input size, such as RMBG at 1024x1024, whose activations would not fit in memory all at
once), else from running the graph with every tensor as an output at small sizes (the UNet
and VAE, whose reshapes take sizes from ``Shape`` ops); no graph is run above a few hundred
latent pixels. Attention layers are read the same way: heads, head size, query tokens as a
fraction of the area, and keys (as many as queries, or a fixed count for cross-attention).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trt_bgswap.attention_pattern import find_attention
from trt_bgswap.errors import ModelError
from trt_bgswap.memory import AREA_FIXED, AREA_LATENT, AREA_PHOTO, AttentionLayer, GraphMemory, LiveSet, area_kind, dominant
from trt_bgswap.specs import ModelSpec, pipeline_dims

log = logging.getLogger(__name__)

# Small sizes to measure at, in units of the graph's size step: (batch, rows, columns). Three areas
# (2, 6, 12 units) and two batches determine the four coefficients with one equation to spare.
CONFIGS = ((1, 1, 2), (1, 2, 3), (1, 3, 4), (2, 1, 2), (2, 2, 3))
PHOTO_STEP = 8  # photo graphs: any size works; small multiples keep the measurement cheap
FIT_TOLERANCE = 0.5  # bytes: sizes are integers, so an exact polynomial fits to rounding


def _feeds(spec: ModelSpec, dims: Mapping[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for t in spec.inputs:
        shape = t.resolve(dims)
        if t.np_dtype.kind in "iub":
            feeds[t.name] = rng.integers(0, 2 if t.np_dtype.kind == "b" else 100, shape).astype(t.np_dtype)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.np_dtype)
    return feeds


Shapes = dict[str, tuple[tuple[int, ...], int]]  # tensor name -> (shape, itemsize)


def _nbytes(shape: tuple[tuple[int, ...], int]) -> int:
    return int(np.prod(shape[0], dtype=np.int64)) * shape[1]


def _inferred_shapes(model: Any, spec: ModelSpec, dims: Mapping[str, int]) -> Shapes | None:
    """Every tensor's shape from ONNX shape inference at ``dims``, or None if some shape stays unknown."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for v in m.graph.input:
        declared = spec.tensor(v.name).resolve(dims) if v.name in spec.input_names else None
        for i, d in enumerate(v.type.tensor_type.shape.dim):
            if d.dim_param and declared is not None:
                d.ClearField("dim_param")
                d.dim_value = declared[i]
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except onnx.shape_inference.InferenceError:
        return None
    shapes: Shapes = {}
    for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input):
        t = v.type.tensor_type
        if not t.HasField("shape") or not all(d.HasField("dim_value") for d in t.shape.dim):
            continue
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
        shapes[v.name] = (tuple(d.dim_value for d in t.shape.dim), itemsize)
    wanted = {o for n in model.graph.node if n.op_type != "Constant" for o in n.output if o}
    return shapes if wanted <= set(shapes) else None


class _Runner:
    """One ONNX Runtime session over the graph with every tensor as an output (made on first use)."""

    def __init__(self, model_path: Path, model: Any, spec: ModelSpec) -> None:
        self.model_path, self.model, self.spec = model_path, model, spec
        self.session: Any = None

    def _open(self) -> Any:
        import onnx
        import onnxruntime as ort

        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        have = {o.name for o in m.graph.output}
        for n in m.graph.node:
            for o in n.output:
                if o and o not in have and n.op_type != "Constant":
                    m.graph.output.append(onnx.ValueInfoProto(name=o))
                    have.add(o)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own tensors
        so.log_severity_level = 4  # a size the graph rejects is expected (the UNet at odd latent sizes) and retried
        # saved beside the original so relative external-data locations resolve; removed once opened
        with tempfile.NamedTemporaryFile(dir=self.model_path.parent, prefix=".memory-facts.", suffix=".onnx", delete=False) as f:
            tmp = Path(f.name)
        try:
            onnx.save_model(m, str(tmp))
            return ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def shapes(self, dims: Mapping[str, int]) -> Shapes:
        if self.session is None:
            self.session = self._open()
        feeds = _feeds(self.spec, dims)
        names = [o.name for o in self.session.get_outputs()]
        shapes = {k: (tuple(v.shape), v.dtype.itemsize) for k, v in zip(names, self.session.run(names, feeds))}
        shapes.update({k: (tuple(v.shape), v.dtype.itemsize) for k, v in feeds.items()})
        return shapes


def _configs(spec: ModelSpec, kind: str, size_step: int, vae_scale_factor: int, extra: Mapping[str, int]) -> list[tuple[int, int, dict[str, int]]]:
    """(batch, area, dims) to measure at."""
    batched = "B" in spec.symbols()
    out = []
    for batch, rows, cols in CONFIGS:
        if batch > 1 and not batched:
            continue
        if kind == AREA_LATENT:
            h, w = rows * size_step, cols * size_step
            dims = pipeline_dims(batch, h * vae_scale_factor, w * vae_scale_factor, vae_scale_factor)
            area = h * w
        elif kind == AREA_PHOTO:
            dims = {"B": batch, "PH": rows * PHOTO_STEP, "PW": cols * PHOTO_STEP}
            area = rows * cols * PHOTO_STEP**2
        else:
            dims, area = {"B": batch}, 1
        if all(c[2] != {**dims, **extra} for c in out):
            out.append((batch, area, {**dims, **extra}))
    return out


def _fit(points: Sequence[tuple[int, int]], sizes: Sequence[int], kind: str) -> LiveSet:
    """Coefficients of c0 + c1*B + c2*B*area + c3*B*area**2 through the measured sizes."""
    columns = [lambda b, a: 1.0, lambda b, a: float(b)]
    if kind != AREA_FIXED:
        columns += [lambda b, a: float(b * a), lambda b, a: float(b) * a * a]
    x = np.array([[c(b, a) for c in columns] for b, a in points])
    y = np.array(sizes, dtype=np.float64)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    if float(np.max(np.abs(x @ coef - y))) > FIT_TOLERANCE:
        raise ValueError("not polynomial in batch and area")
    full = list(coef) + [0.0] * (4 - len(coef))
    return tuple(round(c, 6) for c in full)  # type: ignore[return-value]


def graph_memory(
    onnx_path: str | Path,
    spec: ModelSpec,
    size_step: int = 1,
    vae_scale_factor: int = 1,
    extra_dims: Mapping[str, int] | None = None,
) -> GraphMemory:
    """Measure ``onnx_path``'s memory facts.

    ``size_step``: latent sizes the graph accepts are multiples of it (the UNet's downsampling);
    ``vae_scale_factor`` turns latent sizes into pixel sizes for graphs that take pixels;
    ``extra_dims``: values of symbols that do not follow the size (RMBG's ``S``).
    """
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    kind = area_kind(spec.symbols())
    configs = _configs(spec, kind, size_step, vae_scale_factor, extra_dims or {})
    runner = _Runner(onnx_path, model, spec)
    measured: list[Shapes] = []
    for _, _, dims in configs:
        shapes = _inferred_shapes(model, spec, dims) if runner.session is None else None
        if shapes is None and kind != AREA_LATENT and any(len(t.shape) > 2 for t in spec.inputs):
            # a fixed-size image net (RMBG at 1024x1024) cannot be run with every activation kept
            raise ModelError(f"{onnx_path}: ONNX shape inference leaves some of its shapes unknown; its memory cannot be measured safely")
        measured.append(shapes if shapes is not None else runner.shapes(dims))
    del runner
    points = [(b, a) for b, a, _ in configs]
    names = set.intersection(*(set(m) for m in measured))
    coef: dict[str, LiveSet] = {}
    for name in names:
        values = [_nbytes(m[name]) for m in measured]
        try:
            coef[name] = _fit(points, values, kind)
        except ValueError:  # not polynomial (rare, small): bound it by its largest size per unit of batch*area
            b, a = max(points, key=lambda p: p[0] * p[1])
            coef[name] = (float(max(values)), 0.0, float(max(values)) / (b * a) if kind != AREA_FIXED else 0.0, 0.0)
            log.debug("%s: tensor %s is not polynomial in batch and area; bounded linearly", spec.name, name)

    triples, _ = find_attention(model.graph.node, [o.name for o in model.graph.output])
    attention = [_layer(t, measured, configs) for t in triples]
    quadratic = {n for t in triples for n in (t.scores.output[0], t.softmax.output[0])}  # what `build` tiles: all of them
    materialised = _live_sets(model, coef, set(), {})
    hold = {t.scores.output[0]: t.mix.output[0] for t in triples}  # the tiled op's output exists while it runs
    bounded = _live_sets(model, coef, quadratic, hold)
    return GraphMemory(kind, tuple(attention), dominant(materialised), dominant(bounded))


def _layer(t: Any, measured: Sequence[Shapes], configs: Sequence[tuple[int, int, Mapping[str, int]]]) -> AttentionLayer:
    """Heads, head size and token counts of one attention, from its tensors' shapes at two areas."""
    (_, a0, _), (_, a1, _) = configs[0], configs[1]
    (q0, _), (q1, _) = measured[0][t.q], measured[1][t.q]
    (s0, itemsize), (s1, _) = measured[0][t.scores.output[0]], measured[1][t.scores.output[0]]
    if len(q0) != 4 or len(s0) != 4:
        raise ModelError(f"attention {t.softmax.name}: not (batch, heads, tokens, dim) tensors {q0}, {s0}; cannot model its memory")
    # (batch, heads, tokens, head_dim) queries and (batch, heads, tokens, keys) scores; tokens = area / divisor
    if a0 * q1[2] != a1 * q0[2] or a0 % q0[2]:
        raise ModelError(f"attention {t.softmax.name}: its {q0[2]} / {q1[2]} tokens do not follow the area {a0} / {a1}")
    self_attention = s0[3] == q0[2] and s1[3] == q1[2]
    if not self_attention and s0[3] != s1[3]:
        raise ModelError(f"attention {t.softmax.name}: its keys ({s0[3]}, {s1[3]}) neither follow the queries nor stay fixed")
    return AttentionLayer(heads=int(q0[1]), head_dim=int(q0[3]), q_divisor=a0 // int(q0[2]), kv_tokens=None if self_attention else int(s0[3]), itemsize=itemsize)


def _live_sets(model: Any, coef: Mapping[str, LiveSet], drop: set[str], hold: Mapping[str, str]) -> list[LiveSet]:
    """The live set while each node runs: its inputs, its outputs and everything still needed later.

    ``drop``: tensors that take no memory (the scores a tiled attention never holds); ``hold``: a
    node's first output -> another tensor alive while that node runs (the tiled op's own output).
    """
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    weights = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    outputs = {o.name for o in model.graph.output}
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            if x:
                last[x] = i
    zero: LiveSet = (0.0, 0.0, 0.0, 0.0)
    size = lambda name: zero if name in drop or name in weights else coef.get(name, zero)  # noqa: E731
    live: dict[str, LiveSet] = {v.name: size(v.name) for v in model.graph.input if v.name not in weights}
    sets: list[LiveSet] = []
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                live[o] = size(o)
        extra = coef.get(hold[n.output[0]], zero) if n.output and n.output[0] in hold else zero
        total = [sum(v[k] for v in live.values()) + extra[k] for k in range(4)]
        sets.append(tuple(total))  # type: ignore[arg-type]
        for x in [x for x in live if x not in outputs and last.get(x, -1) <= i]:
            del live[x]
    return sets


def export_memory_facts(folder: str | Path, manifest: Any) -> dict[str, GraphMemory]:
    """Facts of every graph in an export folder's manifest (a :class:`~trt_bgswap.manifest.Manifest`).

    Generation graphs are measured at latent sizes in steps of one latent pixel (the VAE takes
    any), or of the UNet's downsampling factor when the graph needs it (the UNet's skip
    connections must line up).
    """
    folder = Path(folder)
    cfg = manifest.inpaint
    vae = cfg.vae_scale_factor if cfg is not None else 1
    steps = sorted({1, cfg.size_multiple // vae} if cfg is not None else {1})
    extra = {"S": manifest.rmbg.input_size[0]} if manifest.rmbg is not None else {}
    facts: dict[str, GraphMemory] = {}
    for name, entry in manifest.models.items():
        path = folder / entry.file
        for step in steps:
            try:
                facts[name] = graph_memory(path, entry.spec, step, vae, {k: v for k, v in extra.items() if k in entry.spec.symbols()})
                break
            except ModelError as e:
                log.warning("%s: no memory facts, the size check leaves it out (%s)", name, e)
                break
            except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own untyped errors for shapes a graph rejects
                if step == steps[-1]:
                    log.warning("%s: no memory facts, the size check leaves it out (%s)", name, str(e).splitlines()[0])
                else:
                    log.debug("%s: not measurable at latent steps of %d (%s); trying larger steps", name, step, str(e).splitlines()[0])
    return facts
