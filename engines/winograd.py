"""3x3 convolutions as Winograd F(2x2, 3x3) in plain ONNX ops, for CPU builds (Lavin & Gray, "Fast Algorithms
for Convolutional Neural Networks", CVPR 2016, section 4.1).

Each 2x2 output tile of a 3x3, stride-1 convolution is ``A^T [(G g G^T) * (B^T d B)] A`` over the 4x4
input tile ``d`` around it: 16 multiplies per tile and channel pair instead of 36 (2.25x fewer). At run
time the graph

    MatMul(16x9 kernel transform, the 9 taps of every kernel)   G g G^T, one pass over the layer's weights
    Pad -> SpaceToDepth(2) -> four shifted Slices -> Concat     the 16 values of every input tile
    MatMul(16x16 input transform)                               B^T d B, one pass over the tiles
    MatMul(16 transformed kernels, Cout x Cin each)             the 16 GEMMs, at the matmul peak
    MatMul(4x16 output transform) -> DepthToSpace(2) -> Slice   A^T m A, tiles back into the image

runs it. ONNX Runtime's MLAS has no Winograd path for fp32 convolutions (it convolves directly, NCHWc
or im2col), so the rewrite is done on the graph, like engines/upsample.py.

**Off by default; a builder opts in** with ``TRT_BGSWAP_WINOGRAD_MIN_CHANNELS=320`` (the least channels a
layer needs; ``0`` or unset: off). Measured on the full-size SD1.5 graphs as built (benchmarks/README.md,
"Winograd convolutions"): VAE decoder 0.89x, encoder 0.90x, UNet step 0.995x; a 512x512 request 40.5 ->
38.7 s (0.96x) for +0.25 GB of peak memory (the tiles of the VAE's 128x128 layers, at the decode stage,
which is the process's peak): about 0.94x -> 0.98x of diffusers' peak. Small boxes are short of memory
first (issue 15), so the default keeps the headroom. One layer alone gains more (0.73-0.88x) than the
layers inside the built graphs, where ONNX Runtime's NCHWc convolutions chain without reordering.

It trades memory for arithmetic: the gathered tiles and the 16 products are each 4x the layer's input
or output, so only layers wide enough to pay for it are rewritten (the threshold), and not the widest
(:data:`MAX_KERNEL_PAIRS`), whose kernels cost more to transform than the rewrite saves.

The arithmetic changes: the input and output transforms add and subtract up to 16 terms and the
kernel transform 9, so the error bound grows from gamma(9 Cin) to gamma(Cin + 42) of the
transformed magnitudes (tests/test_winograd.py checks each output against it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from trt_bgswap.errors import UsageError
from trt_bgswap.onnx_graph import keep_used_initializers, splice_nodes

log = logging.getLogger(__name__)

WINOGRAD_VERSION = "winograd-f2x3-v2"  # v2: kernels transformed at run time, not stored
MIN_CHANNELS_ENV = "TRT_BGSWAP_WINOGRAD_MIN_CHANNELS"  # unset or 0: off (the default); the tests use 1: the tiny models are narrow

# Lavin & Gray's F(2x2, 3x3) matrices.
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)

# The graph gathers tile value (y, x) = (2 si + a, 2 sj + b) at position 8 si + 4 sj + 2 a + b
# (Concat of the four shifted SpaceToDepth slices s = 2 si + sj, each in SpaceToDepth's (a, b, c) order).
_TILE_ORDER = [(2 * si + a, 2 * sj + b) for si in (0, 1) for sj in (0, 1) for a in (0, 1) for b in (0, 1)]
# The threshold to opt in with. One layer alone, 2 threads, direct -> Winograd (benchmarks/winograd_layers.py):
# 320 ch at 64x64 0.87x, 640 at 32x32 0.88x, 512 at 128x128 0.73x; but 256 at 256x256 1.02x and 128 at
# 512x512 1.49x, where the passes over 4x-expanded tiles cost what the GEMMs save.
SUGGESTED_MIN_CHANNELS = 320
# Most kernel pairs (Cin x Cout) a layer may have: its kernels are transformed on every call, one pass
# over its weights, and the wider layers (the SD UNets' 1280-channel ones, 59-118 MB each, run on the
# 16x16 and 8x8 latents) would spend on that about what Winograd saves them. 1920 x 640 keeps the SD1.5
# UNet's layers on the 64x64 and 32x32 latents and every VAE layer from 320 channels.
MAX_KERNEL_PAIRS = 1920 * 640


def min_channels() -> int:
    """The least channels a rewritten layer has, from ``TRT_BGSWAP_WINOGRAD_MIN_CHANNELS``; 0: the rewrite is off."""
    value = os.environ.get(MIN_CHANNELS_ENV, "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise UsageError(f"{MIN_CHANNELS_ENV}={value!r}: give a channel count ({SUGGESTED_MIN_CHANNELS} for the SD models) or 0 for off")
    return int(value)


def cache_tag() -> str:
    """What the rewrite does to a build, for its cache key: off, or the version and the thresholds."""
    least = min_channels()
    return f"{WINOGRAD_VERSION}/min{least}/max{MAX_KERNEL_PAIRS}" if least else "off"


def input_transform() -> np.ndarray:
    """(16, 16): row 4u+v is (B^T d B)[u, v] as a combination of the gathered tile values."""
    t = np.zeros((16, 16))
    for e, (y, x) in enumerate(_TILE_ORDER):
        t[:, e] = np.outer(_BT[:, y], _BT[:, x]).reshape(16)
    return t


def output_transform() -> np.ndarray:
    """(4, 16): row 2a+b is output pixel (a, b) of a tile, (A^T m A)[a, b], from the 16 products 4u+v."""
    return np.einsum("au,bv->abuv", _AT, _AT).reshape(4, 16)


def kernel_transform() -> np.ndarray:
    """(16, 9): row 4u+v is (G g G^T)[u, v] as a combination of the kernel's taps 3i+j."""
    return np.kron(_G, _G)


def kernel_taps(weight: np.ndarray) -> np.ndarray:
    """(9, Cout Cin): the 3x3 weight laid out tap by tap, the same bytes in another order."""
    return np.ascontiguousarray(weight.transpose(2, 3, 0, 1).reshape(9, -1))


def _onnx_type(dtype: np.dtype) -> int:
    from onnx import helper

    return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def eligible(node: Any, weight_shape: tuple[int, ...] | None, least: int, most_pairs: int = MAX_KERNEL_PAIRS) -> bool:
    """A plain 3x3 stride-1 pad-1 ``Conv`` with at least ``least`` channels in and out and at most ``most_pairs`` kernels."""
    if node.op_type != "Conv" or weight_shape is None or len(weight_shape) != 4:
        return False
    attrs = _attrs(node)
    plain = (
        attrs.get("kernel_shape", list(weight_shape[2:])) == [3, 3]
        and list(weight_shape[2:]) == [3, 3]
        and attrs.get("pads") == [1, 1, 1, 1]
        and attrs.get("strides", [1, 1]) == [1, 1]
        and attrs.get("dilations", [1, 1]) == [1, 1]
        and attrs.get("group", 1) == 1
        and attrs.get("auto_pad", b"NOTSET") == b"NOTSET"
    )
    return plain and min(weight_shape[0], weight_shape[1]) >= least and weight_shape[0] * weight_shape[1] <= most_pairs


class _Nodes:
    """Appends nodes and constants with names under one stem."""

    def __init__(self, stem: str) -> None:
        self.stem = stem
        self.nodes: list[Any] = []
        self.constants: list[Any] = []

    def const(self, name: str, value: np.ndarray) -> str:
        """A float tensor as an initializer (the build's writer may move it to the weights file)."""
        from onnx import numpy_helper

        full = f"{self.stem}.{name}"
        self.constants.append(numpy_helper.from_array(value, full))
        return full

    def ints(self, name: str, *values: int) -> str:
        """Shapes, pads and slice bounds as ``Constant`` nodes: they stay in the graph, where ONNX Runtime's
        shape inference reads them (it cannot read an int64 initializer moved to the weights file)."""
        from onnx import numpy_helper

        return self.op("Constant", [], name, value=numpy_helper.from_array(np.array(values, np.int64)))

    def op(self, op: str, inputs: list[str], name: str, output: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = output or f"{self.stem}.{name}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{self.stem}.{name}", **attrs))
        return out


def _winograd_nodes(x: str, y: str, stem: str, weight: np.ndarray, bias: np.ndarray | None) -> _Nodes:
    """Nodes computing ``y`` = 3x3 conv (pad 1) of ``x`` (N, Cin, H, W) with ``weight`` (Cout, Cin, 3, 3)."""
    g = _Nodes(stem)
    cout, cin = weight.shape[:2]
    dtype = weight.dtype
    shape = g.op("Shape", [x], "shape")
    hw = g.op("Slice", [shape, g.ints("hw_from", 2), g.ints("hw_to", 4)], "hw")
    n = g.op("Slice", [shape, g.ints("n_from", 0), g.ints("n_to", 1)], "n")
    # tiles cover ceil(H/2) x ceil(W/2); pad 1 before, 1 (+1 for an odd side) after
    odd = g.op("Mod", [hw, g.ints("two", 2, 2)], "odd")
    pad_end = g.op("Add", [odd, g.ints("one", 1, 1)], "pad_end")
    pads = g.op("Concat", [g.ints("pad_head", 0, 0, 1, 1, 0, 0), pad_end], "pads", axis=0)
    padded = g.op("Pad", [x, pads], "padded", mode="constant")
    blocks = g.op("SpaceToDepth", [padded], "blocks", blocksize=2)  # (N, 4 Cin, th + 1, tw + 1)
    tiles_hw = g.op("Sub", [g.op("Slice", [g.op("Shape", [blocks], "blocks_shape"), g.ints("b_from", 2), g.ints("b_to", 4)], "blocks_hw"), g.ints("one_b", 1, 1)], "tiles_hw")
    shifted = []
    zero = g.ints("zero2", 0, 0)
    one = g.ints("one2", 1, 1)
    axes = g.ints("axes", 2, 3)
    for si in (0, 1):
        for sj in (0, 1):
            start = zero if (si, sj) == (0, 0) else one if (si, sj) == (1, 1) else g.ints(f"start{si}{sj}", si, sj)
            end = g.op("Add", [tiles_hw, start], f"end{si}{sj}")
            shifted.append(g.op("Slice", [blocks, start, end, axes], f"shift{si}{sj}"))
    gathered = g.op("Concat", shifted, "gathered", axis=1)  # (N, 16 Cin, th, tw), channel (8 si + 4 sj + 2 a + b) Cin + c
    flat = g.op("Reshape", [gathered, g.ints("flat16", 0, 16, -1)], "flat")
    v = g.op("MatMul", [g.const("BT", input_transform().astype(dtype)), flat], "V")  # (N, 16, Cin th tw)
    v4 = g.op("Reshape", [v, g.ints("v_shape", 0, 16, cin, -1)], "V4")
    # The kernels are transformed at run time, one layer at a time: stored, G g G^T would take 16/9 of the
    # weights (+1.7 GB of VmHWM with every SD1.5 UNet layer rewritten, measured), while transforming
    # them is one pass over the layer's weights, small beside its GEMMs (benchmarks/README.md). A zero
    # computed from the input's shape keeps ONNX Runtime's constant folding from storing the product.
    batch = g.op("Cast", [n], "batch_f", to=_onnx_type(dtype))
    k = g.op("Add", [g.const("K", kernel_transform().astype(dtype)), g.op("Sub", [batch, batch], "zero")], "K_run")
    u = g.op("MatMul", [k, g.const("taps", kernel_taps(weight))], "U")  # (16, Cout Cin)
    u3 = g.op("Reshape", [u, g.ints("u_shape", 16, cout, cin)], "U3")
    m = g.op("MatMul", [u3, v4], "M")  # (N, 16, Cout, th tw)
    m3 = g.op("Reshape", [m, g.ints("m_shape", 0, 16, -1)], "M3")
    tiles = g.op("MatMul", [g.const("AT", output_transform().astype(dtype)), m3], "Y4")  # (N, 4, Cout th tw)
    y_shape = g.op("Concat", [n, g.ints("c4", 4 * cout), tiles_hw], "y_shape", axis=0)
    y_tiles = g.op("Reshape", [tiles, y_shape], "Y_tiles")  # channel (2 a + b) Cout + c: DepthToSpace's DCR order
    image = g.op("DepthToSpace", [y_tiles], "image", blocksize=2, mode="DCR")  # (N, Cout, 2 th, 2 tw)
    out = g.op("Slice", [image, zero, hw, axes], "crop", output=None if bias is not None else y)
    if bias is not None:
        g.op("Add", [out, g.const("bias", bias.reshape(1, cout, 1, 1))], "add_bias", output=y)
    return g


def winograd_convolutions(model: Any, base_dir: str | Path, least_channels: int | None = None, most_pairs: int = MAX_KERNEL_PAIRS) -> int:
    """Rewrite (in place) every eligible 3x3 ``Conv`` of ``model`` as Winograd F(2x2, 3x3); returns how many.

    The weight may live in an external file under ``base_dir``; its tap-major copy (the same size) is
    put in the proto (the caller's writer moves large tensors out). ``least_channels``:
    :func:`min_channels` when None; 0 rewrites nothing (the default build).
    """
    from onnx import numpy_helper

    least = min_channels() if least_channels is None else least_channels
    if least <= 0:
        return 0
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    replace: dict[int, list[Any]] = {}
    new_tensors: list[Any] = []
    for i, node in enumerate(graph.node):
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        w_init = initializers[node.input[1]]
        if not eligible(node, tuple(w_init.dims), least, most_pairs):
            continue
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias_name is not None and bias_name not in initializers:
            continue
        weight = numpy_helper.to_array(w_init, str(base_dir))
        bias = numpy_helper.to_array(initializers[bias_name], str(base_dir)) if bias_name else None
        g = _winograd_nodes(node.input[0], node.output[0], node.name or node.output[0], weight, bias)
        replace[i] = g.nodes
        new_tensors.extend(g.constants)
    if not replace:
        return 0
    splice_nodes(graph, replace)
    keep_used_initializers(graph, new_tensors)
    log.info("%d 3x3 convolution(s) now run as Winograd F(2x2, 3x3) (2.25x fewer multiplies)", len(replace))
    return len(replace)
