"""Tiny ONNX graphs and specs for the TensorRT tests that run on the emulation (tests/emulation).

``matmul_graph``: x (B, 4) -> MatMul -> Relu -> y; its intermediate tensor gives the plan
activation memory. ``add_graph``: y = x + x, a single node whose output is the network
output, so a plan of it needs no activation memory (``device_memory_size_v2 == 0``).
Weights are quarters of small integers, so float32 results are exact and comparisons use 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trt_bgswap.engines.profiles import ShapeProfile, TensorProfile
from trt_bgswap.specs import ModelSpec, TensorSpec

SPEC = ModelSpec("tiny", (TensorSpec("x", "float32", ("B", 4)),), (TensorSpec("y", "float32", ("B", 4)),))
WEIGHT = (np.arange(16, dtype=np.float32).reshape(4, 4) - 8) / 4


def profile(lo: int = 1, opt: int = 2, hi: int = 2) -> ShapeProfile:
    return ShapeProfile((TensorProfile("x", (lo, 4), (opt, 4), (hi, 4)),))


def _save(nodes: list, inits: list, path: Path) -> Path:
    graph = helper.make_graph(
        nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def matmul_graph(path: Path) -> Path:
    return _save([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], [numpy_helper.from_array(WEIGHT, "w")], path)


def add_graph(path: Path) -> Path:
    return _save([helper.make_node("Add", ["x", "x"], ["y"])], [], path)


def matmul_reference(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ WEIGHT, 0)
