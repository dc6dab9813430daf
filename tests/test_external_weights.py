"""Export's weight-file writer: graphs whose weights are already in files (the tracer's >2 GiB layout) are copied, not loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from trt_bgswap.errors import ModelError
from trt_bgswap.onnx_graph import write_with_external_data
from trt_bgswap.onnx_graph import weights_nbytes


def _graph(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> MatMul(w1) -> Add(b) -> MatMul(w2), plus an int64 shape kept in a typed field (not raw_data)."""
    w1 = numpy_helper.from_array(rng.standard_normal((5, 7)).astype(np.float32), "w1")
    b = numpy_helper.from_array(rng.standard_normal((7,)).astype(np.float32), "b")
    w2 = numpy_helper.from_array(rng.standard_normal((7, 3)).astype(np.float32), "w2")
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 3])  # int64_data, not raw_data
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["hb"]),
        helper.make_node("MatMul", ["hb", "w2"], ["y0"]),
        helper.make_node("Reshape", ["y0", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [w1, b, w2, shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_tensors_in_their_own_files_are_gathered_into_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "raw"
    src.mkdir()
    onnx.save_model(_graph(rng), str(src / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(src.iterdir())) > 2, "the source should hold one file per tensor, as the tracer writes"
    x = rng.standard_normal((2, 5)).astype(np.float32)
    want = _run(src / "model.onnx", x)

    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    assert not any(t.raw_data for t in model.graph.initializer), "the test must start from weights that were never loaded"
    expected = weights_nbytes(model)
    dst = tmp_path / "final"
    dst.mkdir()
    written = write_with_external_data(model, src, dst / "model.onnx", "model.onnx_data")

    assert sorted(p.name for p in dst.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert written == (dst / "model.onnx_data").stat().st_size == expected - 16  # the int64 shape stays in the proto
    np.testing.assert_array_equal(_run(dst / "model.onnx", x), want)
    reloaded = onnx.load(str(dst / "model.onnx"))
    assert weights_nbytes(reloaded) == expected


def test_tensors_in_the_proto_are_moved_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    model = _graph(rng)
    x = rng.standard_normal((2, 5)).astype(np.float32)
    onnx.save_model(model, str(tmp_path / "inline.onnx"))
    want = _run(tmp_path / "inline.onnx", x)
    expected = weights_nbytes(model) - 16  # all but the int64 shape, kept in its typed field
    dst = tmp_path / "final"
    dst.mkdir()
    assert write_with_external_data(model, tmp_path, dst / "model.onnx", "model.onnx_data") == expected
    assert (dst / "model.onnx_data").stat().st_size == expected
    assert not any(t.raw_data for t in onnx.load(str(dst / "model.onnx"), load_external_data=False).graph.initializer)
    np.testing.assert_array_equal(_run(dst / "model.onnx", x), want)


def _in_one_file(tmp_path: Path, seed: int) -> tuple[onnx.ModelProto, Path, Path]:
    """The graph saved with its weights in raw/w.bin, loaded without them; and an empty destination folder."""
    src, dst = tmp_path / "raw", tmp_path / "final"
    src.mkdir()
    dst.mkdir()
    onnx.save_model(_graph(np.random.default_rng(seed)), str(src / "model.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    return onnx.load(str(src / "model.onnx"), load_external_data=False), src, dst


def test_a_weights_file_outside_the_folder_is_refused(tmp_path: Path) -> None:
    model, src, dst = _in_one_file(tmp_path, 2)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../elsewhere.bin"
    (tmp_path / "elsewhere.bin").write_bytes(b"\0" * 1024)
    with pytest.raises(ModelError, match="outside"):
        write_with_external_data(model, src, dst / "model.onnx", "model.onnx_data")


def test_a_truncated_weights_file_is_named(tmp_path: Path) -> None:
    model, src, dst = _in_one_file(tmp_path, 3)
    data = src / "w.bin"
    data.write_bytes(data.read_bytes()[:-8])
    with pytest.raises(ModelError, match="ends before"):
        write_with_external_data(model, src, dst / "model.onnx", "model.onnx_data")


_OPEN_AND_RUN = r"""
import sys
from pathlib import Path
import numpy as np
from trt_bgswap.runtime.ort_backend import OrtEngine
from trt_bgswap.specs import ModelSpec, TensorSpec

def heap() -> int:  # RssAnon: the process's own copies, not the file-backed pages of a mapping
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no RssAnon")

n = int(sys.argv[3])
spec = ModelSpec("g", (TensorSpec("x", "float32", (1, n)),), (TensorSpec("y", "float32", (1, n)),))
engine = OrtEngine(spec, Path(sys.argv[1]), provider="cpu", intra_op_threads=1, prepack=sys.argv[2] == "1")
before = heap()
engine.load()
engine(x=np.ones((1, n), np.float32))
print(heap() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc (Linux)")
def test_unpacked_weights_stay_in_their_mapping(tmp_path: Path) -> None:
    """prepack=False: a session runs external weights from ONNX Runtime's file mapping, with no copy on the heap.

    One 64 MiB MatMul weight: pre-packed, the heap grows by at least the packed copy (the same
    floats in panels); unpacked, by less than a quarter of it (the mapping is file-backed).
    """
    import subprocess
    import sys

    n = 4096
    w = numpy_helper.from_array(np.random.default_rng(4).standard_normal((n, n)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w],
    )  # fmt: skip
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path), save_as_external_data=True, location="w.bin")
    weight_bytes = n * n * 4
    grown = {}
    for prepack in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", _OPEN_AND_RUN, str(path), prepack, str(n)], capture_output=True, text=True, check=True)
        grown[prepack] = int(out.stdout.split()[-1])
    assert grown["1"] >= weight_bytes, grown  # measured: 72.7 MiB packed, 8.8 MiB unpacked
    assert grown["0"] < weight_bytes // 4, grown
