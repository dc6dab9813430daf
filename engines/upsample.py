"""Nearest 2x upsampling followed by a 3x3 convolution, computed on the small image (sub-pixel convolution).

Every decoder here upsamples with ``Resize(nearest, x2)`` and then a 3x3 ``Conv`` (diffusers'
``Upsample2D``, in the VAE decoder and the UNet's up blocks): the convolution runs on the 4x
larger image although each 2x2 block of it repeats one input pixel. Output pixel (2i+a, 2j+b)
sees only a 2x2 window of the small image, with the 3x3 kernel's rows and columns summed onto it:

    a = 0: small rows (i-1, i) under kernel rows (0, 1+2);   a = 1: small rows (i, i+1) under (0+1, 2)

(columns alike with b). So four 2x2 convolutions on the small image, each padded by one pixel
on its window's outer side, and a ``DepthToSpace`` give the same values with 16 instead of 36
multiply-adds per small pixel and channel pair: 2.25x fewer. The large image's zero padding is
the small image's (large row -1 and 2H read small rows -1 and H). The one change to the arithmetic
is that kernel taps are added before they multiply (each summed kernel rounded once to the
weights' type), the same kind of re-association as ONNX Runtime's own fusions; the build checks
the graph against the export (engines/cpu_fast.py's parity, tests/test_upsample.py).

ONNX Runtime and MLAS have no such rewrite (MLAS convolves the upsampled tensor as given), so it
is done here, on the graph, for CPU builds. TensorRT plans are built from the exported graph.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from trt_bgswap.onnx_graph import keep_used_initializers, splice_nodes

log = logging.getLogger(__name__)

SUBPIXEL_UPSAMPLING = "subpixel-v1"  # the rewrite's version: part of the CPU build's cache keys

# Phase a of an output row reads small rows (i-1, i) for a = 0 and (i, i+1) for a = 1; row r of
# each matrix sums the 3x3 kernel rows that land on the window's r-th small row.
_TAPS = (np.array([[1, 0, 0], [0, 1, 1]], np.float64), np.array([[1, 1, 0], [0, 0, 1]], np.float64))


def phase_kernels(weight: np.ndarray) -> list[np.ndarray]:
    """The four 2x2 kernels (phases (0,0), (0,1), (1,0), (1,1)) equivalent to a 3x3 ``weight`` after nearest 2x upsampling."""
    w = weight.astype(np.float64)
    return [np.einsum("ry,ocyx,sx->ocrs", _TAPS[a], w, _TAPS[b]).astype(weight.dtype) for a in (0, 1) for b in (0, 1)]


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant_values(graph: Any) -> dict[str, np.ndarray]:
    """Small constants by name: initializers held in the proto and ``Constant`` nodes' values."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if not t.external_data and np.prod(t.dims) <= 16}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    values[n.output[0]] = numpy_helper.to_array(a.t)
    return values


def _is_nearest_2x(node: Any, constants: dict[str, np.ndarray]) -> bool:
    """``Resize`` that makes row 2i+a and column 2j+b of its output a copy of input pixel (i, j)."""
    if node.op_type != "Resize" or len(node.input) < 3:
        return False
    attrs = _attrs(node)
    if attrs.get("mode", b"nearest") != b"nearest" or attrs.get("coordinate_transformation_mode", b"half_pixel") != b"asymmetric":
        return False
    if attrs.get("nearest_mode", b"round_prefer_floor") != b"floor" or attrs.get("antialias", 0) or attrs.get("axes") is not None:
        return False
    if (len(node.input) > 3 and node.input[3]) or node.input[2] not in constants:
        return False
    scales = constants[node.input[2]]
    return scales.shape == (4,) and np.array_equal(scales, np.array([1, 1, 2, 2], scales.dtype))


def _is_plain_3x3(node: Any) -> bool:
    attrs = _attrs(node)
    return (
        node.op_type == "Conv"
        and attrs.get("kernel_shape") == [3, 3]
        and attrs.get("pads") == [1, 1, 1, 1]
        and attrs.get("strides", [1, 1]) == [1, 1]
        and attrs.get("dilations", [1, 1]) == [1, 1]
        and attrs.get("group", 1) == 1
        and attrs.get("auto_pad", b"NOTSET") == b"NOTSET"
    )


def subpixel_upsampling(model: Any, base_dir: str | Path) -> int:
    """Rewrite (in place) every nearest-2x ``Resize`` -> 3x3 ``Conv`` of ``model`` into phase convolutions on the small image.

    The 3x3 weight may live in an external file under ``base_dir``; the four phase kernels are
    put in the proto (the caller's writer moves large tensors out). A ``Resize`` whose output
    feeds anything besides the one convolution is left alone. Returns how many were rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = _constant_values(graph)
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    graph_outputs = {o.name for o in graph.output}
    replace: dict[int, list[Any]] = {}
    remove: set[int] = set()
    index = {id(n): i for i, n in enumerate(graph.node)}
    new_weights: list[Any] = []
    for resize in graph.node:
        if not _is_nearest_2x(resize, constants) or resize.output[0] in graph_outputs:
            continue
        users = consumers.get(resize.output[0], [])
        if len(users) != 1 or not _is_plain_3x3(users[0]) or users[0].input[0] != resize.output[0] or users[0].input[1] not in initializers:
            continue
        conv = users[0]
        bias = list(conv.input[2:3])
        if bias and bias[0] and bias[0] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[conv.input[1]], str(base_dir))
        stem = conv.name or conv.output[0]
        phases = []
        nodes = []
        for k, kernel in enumerate(phase_kernels(weight)):
            a, b = divmod(k, 2)
            w_name = f"{conv.input[1]}.subpixel{a}{b}"
            new_weights.append(numpy_helper.from_array(kernel, w_name))
            out = f"{conv.output[0]}.subpixel{a}{b}"
            nodes.append(
                helper.make_node(
                    "Conv", [resize.input[0], w_name, *bias], [out], name=f"{stem}.subpixel{a}{b}",
                    kernel_shape=[2, 2], pads=[1 - a, 1 - b, a, b], strides=[1, 1], dilations=[1, 1], group=1,
                )  # fmt: skip
            )
            phases.append(out)
        # DCR order: channel (a * 2 + b) * C_out + c goes to pixel (2i + a, 2j + b) of channel c
        nodes.append(helper.make_node("Concat", phases, [f"{conv.output[0]}.subpixel"], name=f"{stem}.subpixel_concat", axis=1))
        nodes.append(helper.make_node("DepthToSpace", [f"{conv.output[0]}.subpixel"], [conv.output[0]], name=f"{stem}.subpixel_interleave", blocksize=2, mode="DCR"))
        replace[index[id(conv)]] = nodes
        remove.add(index[id(resize)])
    if not replace:
        return 0
    splice_nodes(graph, replace, remove)
    keep_used_initializers(graph, new_weights)
    log.info("%d nearest-2x upsampling convolution(s) now run on the small image (2.25x fewer multiply-adds)", len(replace))
    return len(replace)
