"""TensorRT-parser compatibility checks that run without TensorRT.

Each bad case is a small graph with exactly one defect; the check must name it.
The real exported graphs (tiny weights, real architectures) must come out clean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from engine_graphs import graph_for, mini_specs, save_graph
from onnx import TensorProto, helper, numpy_helper

from trt_bgswap.engines.onnx_check import check_onnx_for_tensorrt
from trt_bgswap.engines.trt_onnx_ops import OPSET_RANGE, SUPPORTED_OPS, UNSUPPORTED_OPS
from trt_bgswap.errors import ModelError
from trt_bgswap.manifest import Manifest
from trt_bgswap.specs import unet_spec


def tiny_model(nodes: list, inputs: list, outputs: list, opset: int = 17, inits: list | None = None, extra_opsets: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *(extra_opsets or [])])
    model.ir_version = 8
    return model


def check(tmp_path: Path, model: onnx.ModelProto, spec=None):  # noqa: ANN001, ANN201
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path))
    return check_onnx_for_tensorrt(path, spec)


def x(name: str = "x", elem: int = TensorProto.FLOAT, shape: list | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape if shape is not None else ["B", 4])


def test_the_op_list_is_consistent() -> None:
    assert not set(SUPPORTED_OPS) & UNSUPPORTED_OPS
    assert {"Conv", "MatMul", "Softmax", "Resize", "GroupNormalization", "LayerNormalization", "Einsum"} <= set(SUPPORTED_OPS)
    assert OPSET_RANGE == (9, 20)


@pytest.mark.parametrize("model", list(mini_specs()))
def test_spec_shaped_graphs_are_clean(tmp_path: Path, model: str) -> None:
    spec = mini_specs()[model]
    report = check(tmp_path, graph_for(spec), spec)
    assert report.ok and not report.issues, report.issues


@pytest.mark.parametrize("op", ["Unique", "NonMaxSuppressionV9", "STFT"])
def test_unsupported_operator(tmp_path: Path, op: str) -> None:
    node = helper.make_node(op, ["x"], ["y"], name="bad")
    model = tiny_model([node], [x()], [x("y")])
    report = check(tmp_path, model)
    assert any(i.check == "operator" and op in i.message and "bad" in i.message for i in report.errors), report.issues
    with pytest.raises(ModelError, match=f"TensorRT cannot parse this graph: .*{op}.*--backend ort"):
        report.raise_for_errors()


def test_custom_domain_operator(tmp_path: Path) -> None:
    node = helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft", name="fused")
    model = tiny_model([node], [x()], [x("y")], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    report = check(tmp_path, model)
    assert any("com.microsoft::FastGelu" in i.message and "plugin" in i.message for i in report.errors), report.issues


@pytest.mark.parametrize("opset, severity", [(8, "error"), (21, "warning"), (OPSET_RANGE[0], None), (OPSET_RANGE[1], None)])
def test_opset_range(tmp_path: Path, opset: int, severity: str | None) -> None:
    model = tiny_model([helper.make_node("Relu", ["x"], ["y"])], [x()], [x("y")], opset=opset)
    found = [i for i in check(tmp_path, model).issues if i.check == "opset"]
    assert [i.severity for i in found] == ([severity] if severity else []), found


def test_string_tensors_are_errors(tmp_path: Path) -> None:
    node = helper.make_node("Identity", ["s"], ["t"])
    model = tiny_model([node], [x("s", TensorProto.STRING, [2])], [x("t", TensorProto.STRING, [2])])
    report = check(tmp_path, model)
    assert any(i.check == "dtype" and "STRING" in i.message for i in report.errors), report.issues


@pytest.mark.parametrize("elem", [TensorProto.UINT16, TensorProto.UINT64, TensorProto.COMPLEX64])
def test_types_tensorrt_lacks_are_errors(tmp_path: Path, elem: int) -> None:
    model = tiny_model([helper.make_node("Identity", ["x"], ["y"])], [x("x", elem)], [x("y", elem)])
    name = TensorProto.DataType.Name(elem)
    assert any(name in i.message for i in check(tmp_path, model).errors)


def test_double_is_a_warning_about_cast_down(tmp_path: Path) -> None:
    model = tiny_model([helper.make_node("Relu", ["x"], ["y"])], [x("x", TensorProto.DOUBLE)], [x("y", TensorProto.DOUBLE)])
    report = check(tmp_path, model)
    assert report.ok
    assert any("DOUBLE" in i.message and "clamping" in i.message for i in report.warnings), report.issues


def test_int64_is_fine_in_tensorrt_10(tmp_path: Path) -> None:
    node = helper.make_node("Add", ["x", "x"], ["y"])
    model = tiny_model([node], [x("x", TensorProto.INT64)], [x("y", TensorProto.INT64)])
    assert not check(tmp_path, model).issues


def test_operator_input_type_outside_the_matrix_is_a_warning(tmp_path: Path) -> None:
    # ONNX allows Resize on int32 data; TensorRT lists FP32/FP16/BF16 only.
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest", name="up")
    model = tiny_model([node], [x("x", TensorProto.INT32, [1, 1, 4, 4])], [x("y", TensorProto.INT32, [1, 1, 8, 8])], inits=[scales])
    report = check(tmp_path, model)
    assert any(i.check == "dtype" and "Resize" in i.message and "INT32" in i.message for i in report.warnings), report.issues


def test_shape_inference_failure_is_an_error(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.zeros((5, 3), dtype=np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])  # (B, 4) @ (5, 3): inner dims disagree
    model = tiny_model([node], [x()], [x("y", shape=["B", 3])], inits=[w])
    report = check(tmp_path, model)
    assert any(i.check == "shape-inference" for i in report.errors), report.issues


def test_missing_external_data_is_an_error(tmp_path: Path) -> None:
    path = save_graph(graph_for(mini_specs()["unet"]), tmp_path / "unet" / "model.onnx", external=True)
    (path.parent / "model.onnx_data").unlink()
    report = check_onnx_for_tensorrt(path)
    assert any(i.check == "external-data" and "model.onnx_data" in i.message for i in report.errors), report.issues


def test_graph_must_match_the_spec(tmp_path: Path) -> None:
    graph_spec = mini_specs()["unet"]
    fp16_spec = unet_spec(graph_spec.inputs[0].shape[1], graph_spec.outputs[0].shape[1], 8, 16, dtype="float16")
    report = check(tmp_path, graph_for(graph_spec), fp16_spec)
    assert any(i.check == "spec" and "sample" in i.message and "float16" in i.message for i in report.errors)
    wider = unet_spec(graph_spec.inputs[0].shape[1], graph_spec.outputs[0].shape[1], 8, 32)  # hidden 32 vs the graph's 16
    report = check(tmp_path, graph_for(graph_spec), wider)
    assert any("encoder_hidden_states: dim 2 is 16 in the graph, 32 in the spec" in i.message for i in report.errors), report.issues


def test_fixed_dim_where_the_spec_wants_a_symbol_is_a_warning(tmp_path: Path) -> None:
    spec = mini_specs()["vae_decoder"]
    model = graph_for(spec)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 8  # 'h' frozen to 8 in the graph
    report = check(tmp_path, model, spec)
    assert any(i.check == "spec" and "profiles cannot vary it" in i.message for i in report.warnings), report.issues


@pytest.mark.parametrize("model", ["text_encoder", "unet", "vae_encoder", "vae_decoder", "rmbg"])
def test_real_exported_graphs_pass(exported_dir: Path, model: str) -> None:
    manifest = Manifest.load(exported_dir)
    report = check_onnx_for_tensorrt(manifest.model_path(exported_dir, model), manifest.models[model].spec)
    assert report.ok, [i.message for i in report.errors]
