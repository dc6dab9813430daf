"""Tolerances that follow from the arithmetic (dtype, magnitude, number and kind of operations), not from one CPU.

Every numeric comparison in the suite sets two floating-point computations of the same
mathematical function side by side: two implementations (numpy vs torch, ONNX Runtime vs
PyTorch, an optimized graph vs the original) or two precisions. What separates them is
rounding, and rounding follows from three things: the unit roundoff ``u`` of the dtype
(2**-24 for float32, 2**-11 for float16), the magnitude of the values, and how many
operations of which kind produced them. Which kernels a machine picks (AVX2 or AVX-512,
one BLAS thread or eight, FMA or not) changes *where* the roundings fall, never how large
they can be. The helpers here turn that into bounds; a test states beside each use why
the bound applies.

The models, from the most to the least exact:

1. **One correctly rounded operation** (IEEE 754: + - * / sqrt, conversions):
   ``|fl(x op y) - x op y| <= u |x op y|`` (Higham 2002, eq. 2.4). The same sequence of such
   operations on the same inputs gives the same bits on every IEEE machine, so a test of
   identical operations asserts equality, and a test that only re-orders a few of them
   allows a few roundings: :func:`rounding_bound` (``gamma_k |value|``, Higham 2002,
   Lemma 3.1: ``gamma_k = k u / (1 - k u)``).
2. **Sums and dot products** of ``n`` terms in any order, with or without FMA:
   ``|fl(x.y) - x.y| <= gamma_n sum |x_i y_i|`` (Higham 2002, eq. 3.5), :func:`gamma`; and the
   resampling taps of a bilinear resize, whose source coordinates a kernel may compute with
   or without FMA: :func:`bilinear_bound`.
3. **Deep networks.** Composing (2) layer by layer gives worst-case bounds that grow like
   ``depth * n * u`` and are useless; rounding errors behave like independent zero-mean
   random variables instead, so a length-``n`` dot product errs by ~``sqrt(n) u`` (Higham &
   Mary 2019). How those local errors travel through a real network (gains, cancellations,
   normalisations, a sigmoid's flat tails, a min-max rescaling) depends on the network and
   its inputs, not on a formula, so it is measured with *Monte Carlo arithmetic* (Parker
   1997; Denis et al. 2016, Verificarlo): :func:`with_rounding_noise` rewrites an ONNX graph
   so that every floating-point node output ``y`` becomes ``y (1 + s r)``, ``r`` uniform with
   zero mean and unit variance (bounded, like a rounding error), and
   ``s = sqrt(n u_acc**2 + u_out**2 + w u16**2)`` the local rounding noise of that node
   (``n`` = its dot-product or reduction length, read from the tensor shapes at run time;
   ``u_acc`` the accumulation roundoff: float32, since ONNX Runtime's CPU provider on x86-64
   runs float16 nodes in float32 behind casts it inserts (MLAS has float16 kernels only on
   ARM64: ``MLAS_F16VEC_INTRINSICS_SUPPORTED`` in ``mlas.h``); ``u_out`` the storage
   roundoff when the node stores float16; ``w`` the number of float16 weights it reads, each
   rounded once from its float32 source). The deviation of the noisy run from the clean
   one is the rounding noise of this very computation on these very inputs;
   :func:`network_tolerance` multiplies it by :data:`SAFETY`. The bound never looks at the
   result it judges, and it is the same on every CPU up to the second-order effect of the
   machine's own rounding of the noisy run.

Why :data:`SAFETY` = 4 (the factor between the noise measured as above and the tolerance):
a real rounding error of a correctly rounded result is uniform-like with standard
deviation ``u/sqrt(3)`` or less per operation, while the injected noise has variance ``u**2``
per term, so one noisy run already overstates one implementation's error; two
implementations differ by up to ``sqrt(2)`` times one; and the largest element of one noisy
run fluctuates between draws (a factor of up to 4 between seeds on the tiny fp16 UNet), which
:data:`NOISE_SAMPLES` draws, maximum taken, and the remaining factor cover. Measured on
this project's graphs and pipelines (PyTorch and diffusers vs ONNX Runtime, fp32 and fp16,
AVX2 and portable kernels, one and two threads: ``NUMERICS_MARGINS`` below), the real error
stays below 1/6 of the tolerance (worst: the whole loop vs diffusers on PyTorch's portable
kernels, 0.16).

What the deep-network model does not cover, and so what tests must not rely on it for:
errors that are not rounding (a different resampling grid, a different algorithm, an
approximation such as int8 quantisation or a box-filter Gaussian): those get their own
bounds where they are tested.

References:
- N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., SIAM, 2002
  (section 2.2 and Lemma 3.1: the rounding model and ``gamma_n``; section 3.1: inner products).
- N. J. Higham and T. Mary, "A New Approach to Probabilistic Rounding Error Analysis",
  SIAM J. Sci. Comput. 41(5), A2815-A2835, 2019 (``lambda sqrt(n) u`` bounds).
- D. S. Parker, "Monte Carlo Arithmetic: exploiting randomness in floating-point
  arithmetic", UCLA CSD-970002, 1997.
- C. Denis, P. de Oliveira Castro, E. Petit, "Verificarlo: checking floating point accuracy
  through Monte Carlo Arithmetic", IEEE ARITH 2016.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import DTypeLike
from onnx import TensorProto, helper, numpy_helper

# Unit roundoff u = 2**-(p) for a p+1-bit significand, round to nearest (Higham 2002, Table 2.1).
UNIT_ROUNDOFF = {np.dtype(np.float64): 2.0**-53, np.dtype(np.float32): 2.0**-24, np.dtype(np.float16): 2.0**-11}
U32 = UNIT_ROUNDOFF[np.dtype(np.float32)]
U16 = UNIT_ROUNDOFF[np.dtype(np.float16)]

# One step of an 8-bit channel: images and masks are stored in uint8, so a value that is
# quantised by the product (a decoded JPEG, a 16-bit PNG brought to 8 bits, a colour
# conversion done in integers) can be right and still be one step away from a float reference.
EIGHT_BIT_STEP = 1.0 / 255.0

# Vectorised float32 exp/log/tanh/erf/sin (numpy's SIMD and SVML paths, ONNX Runtime's MLAS,
# PyTorch's SLEEF) are not correctly rounded: each is within a few ulp. numpy's own accuracy
# tests hold its float32 SIMD routines to 4 ulp (numpy/_core/tests/test_umath_accuracy.py);
# SLEEF's u10 variants are within 1 ulp. 4 ulp covers all of them.
TRANSCENDENTAL_ULPS = 4

SQRT3 = math.sqrt(3.0)  # uniform on [-sqrt 3, sqrt 3]: zero mean, unit variance, bounded like a rounding error
SAFETY = 4.0  # tolerance / largest deviation of the noisy runs; see the module docstring
NOISE_SAMPLES = 2  # noisy runs per tolerance (independent draws; the largest deviation is used)


def assert_within(err: float, tol: float | Callable[[], float], what: str) -> None:
    """``err <= tol``, both in the failure message.

    ``tol`` may be a function computing the bound: it is called only when ``err > 0``, since
    no bound is needed for an exact match (both sides ran the very same operations), and
    noise-based bounds cost extra runs.

    With ``NUMERICS_MARGINS=<file>`` in the environment every bound is computed, and each
    check appends a JSON line (test id, ``what``, err, tol) to that file;
    ``python tests/tolerance.py <file>`` then prints the worst err/tol per test: the margins
    of the suite on this machine.
    """
    report = os.environ.get("NUMERICS_MARGINS")
    if callable(tol):
        tol = tol() if err > 0 or report else math.nan
    if report:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        with open(report, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": test, "what": what, "err": float(err), "tol": float(tol)}) + "\n")
    assert err == 0 or err <= tol, f"{what}: max abs err {err:.3g} > tolerance {tol:.3g}"


def unit_roundoff(dtype: DTypeLike) -> float:
    return UNIT_ROUNDOFF[np.dtype(dtype)]


def gamma(n: int, dtype: DTypeLike = np.float32) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error bound of ``n`` roundings in sequence."""
    u = unit_roundoff(dtype)
    if n * u >= 1:
        raise ValueError(f"gamma_{n} is undefined for u={u}: n u >= 1")
    return n * u / (1 - n * u)


def rounding_bound(magnitude: float | np.ndarray, roundings: int, dtype: DTypeLike = np.float32) -> float | np.ndarray:
    """Bound on ``roundings`` correctly rounded operations whose intermediate values are at most ``magnitude``."""
    return gamma(roundings, dtype) * np.abs(magnitude)


def bilinear_bound(x: np.ndarray, in_size: tuple[int, int], dtype: DTypeLike = np.float32) -> float:
    """Two float32 implementations of the same bilinear resize (PyTorch's ``align_corners=False`` grid) differ by at most this.

    Per axis the source coordinate ``src = scale (dst + 0.5) - 0.5`` takes a multiply and a
    subtract; a kernel that fuses them (FMA: PyTorch's AVX2/AVX-512 builds) rounds once where
    another rounds twice, so ``src``, and the weight ``w1 = src - floor(src)`` with it, may differ
    by ``2 u src <= 2 u in_size`` (plus ``u`` for ``w0 = 1 - w1``). A weight error ``dw`` moves
    the result by ``dw |x1 - x0|``, at most ``dw`` times the largest neighbour difference. Each
    of the two lerps ``w0 a + w1 b`` then rounds at most three times (``gamma_3`` of the
    values' magnitude); the first pass's error passes through the second with gain 1
    (convex weights).
    """
    u = unit_roundoff(dtype)
    x = np.asarray(x, dtype=np.float64)
    step = max(float(np.abs(np.diff(x, axis=axis)).max()) if x.shape[axis] > 1 else 0.0 for axis in (-1, -2))
    coordinates = sum((2 * n + 1) * u for n in in_size) * step
    return coordinates + 2 * gamma(3, dtype) * float(np.abs(x).max())


# ---------------------------------------------------------------- deep networks: Monte Carlo arithmetic

# Ops whose float outputs are exact: data movement, selection, comparisons, sign changes,
# maxima (``Relu``, ``MaxPool``, ``Clip``) and constants.
EXACT_OPS = frozenset(
    "Abs Ceil Clip Concat Constant ConstantOfShape DepthToSpace Dropout Equal Expand Flatten Floor Gather GatherElements "
    "GatherND Greater GreaterOrEqual Identity Less LessOrEqual Max MaxPool Min Neg Not Pad Range ReduceMax ReduceMin Relu "
    "Reshape Round Shape Sign Size Slice SpaceToDepth Split Squeeze Tile Transpose Trilu Unsqueeze Where".split()
)
# One correctly rounded operation per output element.
ELEMENTWISE_OPS = frozenset("Add Sub Mul Div Sqrt Reciprocal".split())
# Not correctly rounded; a few ulp each (TRANSCENDENTAL_ULPS).
TRANSCENDENTAL_OPS = frozenset("Exp Log Tanh Sigmoid Erf Sin Cos Softplus Pow Gelu HardSigmoid HardSwish".split())


class _GraphBuilder:
    """Appends the nodes of the noise expressions with fresh names."""

    def __init__(self, opset: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.opset = opset
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"rounding_noise/{hint}_{self.count}"

    def node(self, op: str, inputs: Sequence[str], **attrs: object) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value: np.ndarray) -> str:
        out = self.name("const")
        self.nodes.append(helper.make_node("Constant", [], [out], name=out, value=numpy_helper.from_array(value, out)))
        return out

    def dim(self, tensor: str, axis: int) -> str:
        """``tensor.shape[axis]`` as an int64 scalar."""
        return self.node("Gather", [self.node("Shape", [tensor]), self.const(np.array(axis, np.int64))], axis=0)

    def size(self, tensor: str) -> str:
        return self.node("Size", [tensor])

    def div(self, a: str, b: str) -> str:
        return self.node("Div", [a, b])

    def mul(self, a: str, b: str) -> str:
        return self.node("Mul", [a, b])


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _terms(node: onnx.NodeProto, g: _GraphBuilder, initializers: Mapping[str, onnx.TensorProto]) -> tuple[str | None, int, int]:
    """(extent tensor or None, a, b): each output element sums ``a * extent + b`` rounded terms."""
    op = node.op_type
    x = node.input[0] if node.input else ""
    if op in ELEMENTWISE_OPS:
        return None, 0, 1
    if op in TRANSCENDENTAL_OPS:
        return None, 0, TRANSCENDENTAL_ULPS**2  # k ulp of error carries the variance of k**2 roundings
    if op == "MatMul":
        if node.input[1] in initializers:
            return None, 0, int(initializers[node.input[1]].dims[-2])
        return g.dim(x, -1), 1, 0
    if op == "Gemm":
        bias = 1 if len(node.input) > 2 and node.input[2] else 0
        return g.dim(x, 0 if _attr(node, "transA", 0) else 1), 1, bias
    if op in ("Conv", "ConvTranspose"):
        w = node.input[1]
        bias = 1 if len(node.input) > 2 and node.input[2] else 0
        if w in initializers:
            dims = list(initializers[w].dims)
            # Conv weights are (C_out, C_in/g, k...): each output sums C_in/g * prod(k) products.
            # ConvTranspose weights are (C_in, C_out/g, k...): an output gathers at most C_in/g * prod(k).
            return None, 0, int(np.prod(dims[1:]) if op == "Conv" else dims[0] * np.prod(dims[2:]) // int(_attr(node, "group", 1))) + bias
        return g.div(g.size(w), g.dim(w, 0 if op == "Conv" else 1)), 1, bias
    if op in ("Softmax", "LogSoftmax"):
        axis = int(_attr(node, "axis", -1 if g.opset >= 13 else 1))
        if g.opset >= 13:
            extent = g.dim(x, axis)
        else:  # opset < 13 flattens from ``axis`` on
            extent = g.div(g.size(x), g.node("ReduceProd", [g.node("Slice", [g.node("Shape", [x]), g.const(np.array([0], np.int64)), g.const(np.array([axis], np.int64))])], keepdims=0))
        return extent, 1, TRANSCENDENTAL_ULPS**2 + 1  # the sum, exp, one division
    if op == "LayerNormalization":  # mean and variance sums, then subtract, divide by sqrt, scale, shift
        return g.size(node.input[1]), 2, 5
    if op == "InstanceNormalization":
        return g.div(g.size(x), g.mul(g.dim(x, 0), g.dim(x, 1))), 2, 5
    if op == "GroupNormalization":
        return g.div(g.size(x), g.mul(g.dim(x, 0), g.const(np.array(int(_attr(node, "num_groups", 1)), np.int64)))), 2, 5
    if op == "BatchNormalization":  # inference: (x - mean) / sqrt(var + eps) * scale + bias
        return None, 0, 5
    if op.startswith("Reduce"):  # ReduceSum/Mean/L2/SumSquare/LogSumExp...; ReduceMax/Min are exact (above)
        return g.div(g.size(x), g.size(node.output[0])), 1, 1 + (TRANSCENDENTAL_ULPS**2 if op in ("ReduceLogSumExp", "ReduceL2") else 0)
    if op == "AveragePool":
        return None, 0, int(np.prod(_attr(node, "kernel_shape", [1]))) + 1
    if op == "Resize":
        mode = _attr(node, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode == "nearest":
            return None, 0, 0
        # 2**d (linear) or 4**d (cubic) weighted taps over d resized axes; graphs here resize 2 axes.
        return None, 0, (4 if mode == "linear" else 16) * 2
    raise ValueError(f"no rounding rule for ONNX op {op!r}: add it to tests/tolerance.py (exact, elementwise, or a reduction)")


def with_rounding_noise(model: onnx.ModelProto, seed: int, float16: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` in which every floating-point node output carries its own rounding noise.

    Each float16/float32 output ``y`` of a node that rounds becomes ``y (1 + s r)``, ``r`` drawn
    by ``RandomUniformLike`` on [-sqrt 3, sqrt 3] (a new draw every run), and
    ``s = sqrt(n U32**2 + u_out**2 + w U16**2)``: ``n`` the node's number of rounded terms
    (shape-dependent ones are computed from the tensors at run time, so one noisy graph serves
    every input size), ``u_out`` the storage roundoff of a float16 output (0 for float32,
    whose accumulation and storage coincide), ``w`` the float16 weights it reads.
    Inputs, outputs and their names are unchanged: the noisy graph drops in wherever the
    original runs (an ``OrtEngine``, a ``Pipeline``).

    ``float16=True`` models a float32 graph run by an engine that may run any layer in float16
    (TensorRT's FP16 mode picks per layer and does not promise float32 accumulation): every
    node then stores float16, accumulates in float16 (``n u16**2``), and reads its weights
    and the graph's inputs rounded to float16.
    """
    model = onnx.shape_inference.infer_shapes(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    initializers = {t.name: t for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input if types.get(i.name) in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    g = _GraphBuilder(opset)
    rename: dict[str, str] = {}
    out_nodes: list[onnx.NodeProto] = []
    draws = 0
    for node in model.graph.node:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        float_outputs = [o for o in node.output if o and types.get(o) in (TensorProto.FLOAT, TensorProto.FLOAT16)]
        terms = None
        if node.op_type == "Cast":  # to float16 from anything wider rounds once (u_out below); other casts here are exact
            if float_outputs and types[float_outputs[0]] == TensorProto.FLOAT16 and types.get(node.input[0]) != TensorProto.FLOAT16:
                terms = (None, 0, 0)
        elif float_outputs and node.op_type not in EXACT_OPS:
            terms = _terms(node, g, initializers)
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        out_nodes.append(node)
        if terms is None:
            continue
        extent_nodes, g.nodes = g.nodes, []
        out_nodes.extend(extent_nodes)
        extent, a, b = terms
        # float16 weights were rounded once from the float32 source: one more storage rounding each
        if float16:
            weights = sum(1 for i in node.input if i in initializers or i in graph_inputs)
        else:
            weights = sum(1 for i in node.input if i in initializers and initializers[i].data_type == TensorProto.FLOAT16)
        u_acc = U16 if float16 else U32
        for y in float_outputs:
            half = float16 or types[y] == TensorProto.FLOAT16
            fixed = b * u_acc**2 + (U16**2 if half else 0.0) + weights * U16**2
            if extent is None:
                variance = g.const(np.array(fixed, np.float32))
            else:
                n = g.node("Cast", [extent], to=TensorProto.FLOAT)
                variance = g.node("Add", [g.mul(n, g.const(np.array(a * u_acc**2, np.float32))), g.const(np.array(fixed, np.float32))])
            scale = g.node("Sqrt", [variance])
            y32 = g.node("Cast", [y], to=TensorProto.FLOAT) if types[y] == TensorProto.FLOAT16 else y
            draws += 1
            r = g.node("RandomUniformLike", [y32], dtype=TensorProto.FLOAT, low=-SQRT3, high=SQRT3, seed=float(seed * 1_000_003 + draws))
            noisy = g.node("Add", [y32, g.mul(y32, g.mul(r, scale))])
            rename[y] = g.node("Cast", [noisy], to=TensorProto.FLOAT16) if types[y] == TensorProto.FLOAT16 else noisy
        out_nodes.extend(g.nodes)
        g.nodes = []
    for out in model.graph.output:  # graph outputs keep their names: route the noisy tensors to them
        if out.name in rename:
            noisy = rename[out.name]
            for node in out_nodes:
                for i, name in enumerate(node.output):
                    if name == out.name:
                        node.output[i] = out.name + "/clean"
                for i, name in enumerate(node.input):
                    if name == out.name:
                        node.input[i] = out.name + "/clean"
            out_nodes.append(helper.make_node("Identity", [noisy], [out.name], name=out.name + "/noisy"))
    del model.graph.node[:]
    model.graph.node.extend(out_nodes)
    del model.graph.value_info[:]
    return model


@functools.lru_cache(maxsize=16)
def _noisy_bytes(path: str, stamp: tuple[int, int], float16: bool) -> bytes:
    return with_rounding_noise(onnx.load(path), seed=0, float16=float16).SerializeToString()


def noisy_model(path: Path, float16: bool = False) -> bytes:
    """The serialized :func:`with_rounding_noise` of the graph at ``path`` (external weights inlined), cached per file version."""
    st = Path(path).stat()
    return _noisy_bytes(str(path), (st.st_mtime_ns, st.st_size), float16)


def write_noisy_graph(path: Path, dest: Path, float16: bool = False) -> Path:
    """Save the noisy graph of ``path`` at ``dest``, for computations that open graphs by path (engines, pipelines).

    Every run of a session on it is a new draw, and a fresh session repeats the same draws,
    so a tolerance built from it is reproducible for a given ONNX Runtime build.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(noisy_model(path, float16))
    return dest


def noisy_engine(spec: object, path: Path, dest: Path, float16: bool = False):  # noqa: ANN201 - an OrtEngine
    """An ONNX Runtime CPU engine on the noisy graph of ``path`` (written to ``dest``), for computations built from engines.

    Graph optimizations are off: the noisy graph has ~3x the nodes, and optimizing them costs
    more than it saves on the tiny test models. A fresh engine repeats the same draws.
    """
    from trt_bgswap.runtime.ort_backend import OrtEngine

    return OrtEngine(spec, write_noisy_graph(path, dest, float16), provider="cpu", graph_optimization="disable")


def noisy_pipeline(folder: Path, dest: Path, float16: bool = False):  # noqa: ANN201 - a Pipeline
    """``Pipeline.load(folder)`` on ONNX Runtime CPU with every host-path model replaced by its noisy graph.

    Its output minus the clean pipeline's is the rounding noise of the whole computation:
    every graph's nodes, carried through the LCM loop, the VAE, the masker's min-max rescaling.
    The numpy steps between graphs (a few roundings each) are not perturbed; the graphs'
    noise dwarfs them.
    """
    from trt_bgswap.manifest import Manifest
    from trt_bgswap.runtime.assemble import models_to_open
    from trt_bgswap.runtime.pipeline import Pipeline

    manifest = Manifest.load(folder)
    engines = {
        name: noisy_engine(manifest.models[name].spec, manifest.model_path(folder, name), dest / f"{name}.onnx", float16)
        for name in models_to_open(manifest, device_graphs=False)
    }
    return Pipeline.load(folder, provider="cpu", engines=engines)


def deviation(clean: np.ndarray, noisy: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(noisy, np.float64) - np.asarray(clean, np.float64))))


def network_tolerance(clean: np.ndarray, noisy: Sequence[np.ndarray]) -> float:
    """:data:`SAFETY` times the largest deviation of the noisy runs from the clean run of the same computation."""
    return SAFETY * max(deviation(clean, n) for n in noisy)


def _digest(arrays: Mapping[str, np.ndarray] | None) -> str | None:
    if arrays is None:
        return None
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


_GRAPH_TOLERANCES: dict[tuple, dict[str, float]] = {}


def graph_tolerances(
    path: Path, feeds: Mapping[str, np.ndarray], clean: Mapping[str, np.ndarray] | None = None, float16: bool = False
) -> dict[str, float]:
    """Per output of the ONNX graph at ``path`` on ``feeds``: :func:`network_tolerance` of :data:`NOISE_SAMPLES` noisy runs.

    Runs on ONNX Runtime's CPU provider; ``clean`` is the graph's own output on ``feeds`` when
    the test already has it (it is computed otherwise). ``float16``: see :func:`with_rounding_noise`.
    The noisy runs use a fresh session, which repeats the same draws, so the result is a function of
    the file version, the feeds, ``clean`` and ``float16``: a second call with the same ones (another
    test checking the same graph on the same inputs) returns the first call's numbers without the runs.
    """
    st = Path(path).stat()
    key = (str(path), st.st_mtime_ns, st.st_size, float16, _digest(feeds), _digest(clean))
    if key not in _GRAPH_TOLERANCES:
        _GRAPH_TOLERANCES[key] = _graph_tolerances(path, feeds, clean, float16)
    return dict(_GRAPH_TOLERANCES[key])


def _graph_tolerances(path: Path, feeds: Mapping[str, np.ndarray], clean: Mapping[str, np.ndarray] | None, float16: bool) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    names = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    if clean is None:
        clean = dict(zip(names, ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(names, dict(feeds))))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ~3x more nodes: optimizing them costs more than it saves
    noisy = ort.InferenceSession(noisy_model(path, float16), options, providers=["CPUExecutionProvider"])
    runs = [dict(zip(names, noisy.run(names, dict(feeds)))) for _ in range(NOISE_SAMPLES)]
    return {n: network_tolerance(clean[n], [r[n] for r in runs]) for n in names if n in clean}


def _print_margins(path: str) -> None:
    """Worst err/tol per test from a NUMERICS_MARGINS file, worst first."""
    worst: dict[str, tuple[float, str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            ratio = 0.0 if r["err"] == 0 else (r["err"] / r["tol"] if r["tol"] > 0 else math.inf)
            if r["test"] not in worst or ratio > worst[r["test"]][0]:
                worst[r["test"]] = (ratio, f"{r['what']}: err {r['err']:.3g} / tol {r['tol']:.3g}")
    for test, (ratio, detail) in sorted(worst.items(), key=lambda kv: -kv[1][0]):
        print(f"{ratio:8.4f}  {test}  ({detail})")


if __name__ == "__main__":
    _print_margins(sys.argv[1])
