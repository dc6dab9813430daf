"""Mapped weights are read into the page cache when their session opens, not page by page in the first run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from page_residency import cached_fraction, evict
from trt_bgswap.runtime.ort_backend import OrtEngine
from trt_bgswap.runtime.page_cache import read_ahead, weights_beside
from trt_bgswap.specs import ModelSpec, TensorSpec


def test_weights_beside_names_the_build_and_onnx_layouts(tmp_path: Path) -> None:
    names = [
        "model.fused.onnx", "model.fused.onnx.bf56db313509.data", "model.fused.onnx.json", "model.fused.onnx.details.json",
        "model.fused.onnx.part0of2.onnx", "model.fused.onnx.parts.json", "model.onnx", "model.onnx.data", "model.onnx_data", "other.onnx.data",
    ]  # fmt: skip
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert weights_beside(tmp_path / "model.fused.onnx") == [tmp_path / "model.fused.onnx.bf56db313509.data"]
    assert weights_beside(tmp_path / "model.onnx") == [tmp_path / "model.onnx.data", tmp_path / "model.onnx_data"]
    assert weights_beside(tmp_path / "model.fused.onnx.part0of2.onnx") == []  # parts share the whole graph's file


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore(2) and posix_fadvise: Linux")
def test_a_mapped_graph_reads_its_weights_when_it_opens(tmp_path: Path) -> None:
    """prepack=False: ONNX Runtime maps the weights file and reads nothing at load; the engine reads it ahead.

    Without the read-ahead the file stays out of the cache until the first run faults it in
    (checked by hand: 0 % cached after ``load()``)."""
    n = 2048  # 16 MiB of weights
    rng = np.random.default_rng(7)
    w = rng.standard_normal((n, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path), save_as_external_data=True, location="model.onnx.data")
    data = tmp_path / "model.onnx.data"
    evict(data)
    if cached_fraction(data) > 0.1:
        pytest.skip(f"{tmp_path}'s file system keeps the file cached (tmpfs?): nothing to read ahead")

    spec = ModelSpec("g", (TensorSpec("x", "float32", (1, n)),), (TensorSpec("y", "float32", (1, n)),))
    engine = OrtEngine(spec, path, provider="cpu", intra_op_threads=1, prepack=False)
    engine.load()
    assert cached_fraction(data) > 0.9
    x = rng.standard_normal((1, n)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    u = np.finfo(np.float32).eps / 2
    bound = (n * u / (1 - n * u)) * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64))  # Higham's gamma(n): any order, any FMA
    assert np.all(np.abs(engine(x=x)["y"] - exact) <= bound)


def test_read_ahead_skips_what_it_cannot_open(tmp_path: Path) -> None:
    present = tmp_path / "a.data"
    present.write_bytes(b"\0" * 5000)
    assert read_ahead([tmp_path / "missing.data", present]) == (5000 if hasattr(os, "posix_fadvise") else 0)
