"""Sub-pixel upsampling (engines/upsample.py): nearest 2x + 3x3 conv computed as four 2x2 convs on the small image.

Both graphs are checked against the exact result (float64 numpy) with each one's own rounding
bound, so the rewrite is shown to compute the same function, not merely something close to
the original on one CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tolerance import gamma

from trt_bgswap.engines.upsample import phase_kernels, subpixel_upsampling

pytestmark = pytest.mark.numerics


def _graph(weight: np.ndarray, bias: np.ndarray | None, mode: str = "nearest", extra_user: bool = False) -> onnx.ModelProto:
    """x -> Resize(x2, as PyTorch exports F.interpolate(nearest)) -> Conv 3x3 pad 1 -> y (plus, optionally, Resize's output as a second output)."""
    scales = helper.make_node("Constant", [], ["scales"], value=numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32)))
    resize = helper.make_node(
        "Resize", ["x", "", "scales"], ["up"], mode=mode, coordinate_transformation_mode="asymmetric", nearest_mode="floor",
    )  # fmt: skip
    inits = [numpy_helper.from_array(weight, "w")]
    conv_in = ["up", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
        conv_in.append("b")
    conv = helper.make_node("Conv", conv_in, ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_user:
        outputs.append(helper.make_tensor_value_info("up", TensorProto.FLOAT, None))
    graph = helper.make_graph([scales, resize, conv], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


def _exact(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The upsampled convolution in float64, and the sum of |terms| each output adds up (for the rounding bound)."""
    up = np.repeat(np.repeat(x.astype(np.float64), 2, axis=2), 2, axis=3)
    padded = np.pad(up, ((0, 0), (0, 0), (1, 1), (1, 1)))
    w = weight.astype(np.float64)
    h, wd = up.shape[2:]
    y = np.zeros((x.shape[0], w.shape[0], h, wd))
    mag = np.zeros_like(y)
    for dy in range(3):
        for dx in range(3):
            window = padded[:, :, dy : dy + h, dx : dx + wd]
            y += np.einsum("oc,nchw->nohw", w[:, :, dy, dx], window)
            mag += np.einsum("oc,nchw->nohw", np.abs(w[:, :, dy, dx]), np.abs(window))
    if bias is not None:
        y += bias[None, :, None, None]
        mag += np.abs(bias)[None, :, None, None]
    return y, mag


@pytest.mark.parametrize("bias", [True, False])
def test_phase_convolutions_compute_the_upsampled_convolution(bias: bool) -> None:
    rng = np.random.default_rng(7)
    cin, cout = 5, 7
    weight = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32) if bias else None
    x = rng.standard_normal((2, cin, 6, 9)).astype(np.float32)  # batch 2, non-square, odd width
    original = _graph(weight, b)
    rewritten = _graph(weight, b)
    assert subpixel_upsampling(rewritten, ".") == 1
    ops = [n.op_type for n in rewritten.graph.node]
    assert "Resize" not in ops and ops.count("Conv") == 4 and "DepthToSpace" in ops, ops
    assert [t.name for t in rewritten.graph.initializer if t.name == "w"] == [], "the 3x3 weight is dropped once unused"

    exact, mag = _exact(x, weight, b)
    got_original, got_rewritten = _run(original, x), _run(rewritten, x)
    assert got_rewritten.shape == exact.shape == (2, cout, 12, 18)
    # a sum of n products and the bias: gamma_(n+1) of the magnitudes; the rewrite first adds up to 3 taps
    # per kernel entry (gamma_3, relative to the taps' magnitudes), then sums 4 cin products
    bound_original = gamma(9 * cin + 1) * mag
    bound_rewritten = (gamma(3) + gamma(4 * cin + 1) * (1 + gamma(3))) * mag
    assert np.all(np.abs(got_original - exact) <= bound_original)
    assert np.all(np.abs(got_rewritten - exact) <= bound_rewritten)


def test_phase_kernels_sum_the_taps_each_phase_sees() -> None:
    """Phase (a, b) = (0, 0) reads small rows/cols (i-1, i): kernel row 0 alone, then rows 1 and 2 summed."""
    w = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)  # [[0 1 2] [3 4 5] [6 7 8]]
    k00, k01, k10, k11 = (k[0, 0] for k in phase_kernels(w))
    np.testing.assert_array_equal(k00, [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]])
    np.testing.assert_array_equal(k11, [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]])
    np.testing.assert_array_equal(k01, [[0 + 1, 2], [3 + 4 + 6 + 7, 5 + 8]])
    np.testing.assert_array_equal(k10, [[0 + 3, 1 + 2 + 4 + 5], [6, 7 + 8]])
    assert k00.sum() == k01.sum() == k10.sum() == k11.sum() == w.sum()


@pytest.mark.parametrize("case", ["linear", "resize_also_an_output", "strided"])
def test_other_patterns_are_left_alone(case: str) -> None:
    weight = np.ones((2, 2, 3, 3), np.float32)
    model = _graph(weight, None, mode="linear" if case == "linear" else "nearest", extra_user=case == "resize_also_an_output")
    if case == "strided":
        conv = model.graph.node[2]
        conv.attribute.append(helper.make_attribute("strides", [2, 2]))
    before = model.SerializeToString()
    assert subpixel_upsampling(model, ".") == 0
    assert model.SerializeToString() == before


def test_external_weights_are_read_from_their_file(tmp_path: Path) -> None:
    """The UNet's 3x3 weights live in model.onnx_data: the rewrite reads them from there."""
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    onnx.save_model(_graph(weight, None), str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert subpixel_upsampling(model, tmp_path) == 1
    x = rng.standard_normal((1, 4, 5, 3)).astype(np.float32)
    exact, mag = _exact(x, weight, None)
    onnx.load_external_data_for_model(model, str(tmp_path))
    assert np.all(np.abs(_run(model, x) - exact) <= (gamma(3) + gamma(4 * 4 + 1) * (1 + gamma(3))) * mag)


def test_the_cpu_build_runs_every_upsampling_on_the_small_image(exported_dir: Path, built_cpu_dir: Path) -> None:
    """The tiny export's UNet and VAE decoder upsample as diffusers does; the built graphs (what `run` opens, and what
    tests/test_pipeline_parity.py checks against diffusers) hold the phase convolutions instead."""
    from trt_bgswap.build_index import ENGINES_DIR, ORT, read_index

    index = read_index(built_cpu_dir, ORT, "cpu")
    assert index is not None
    for name in ("unet", "vae_decoder"):
        exported = [n.op_type for n in onnx.load(str(exported_dir / name / "model.onnx"), load_external_data=False).graph.node]
        nodes = onnx.load(str(index[name].resolve(built_cpu_dir / ENGINES_DIR)), load_external_data=False).graph.node
        built = [n.op_type for n in nodes]
        interleaves = [n for n in nodes if n.op_type == "DepthToSpace" and n.name.endswith(".subpixel_interleave")]  # Winograd's are others
        assert exported.count("Resize") >= 1, f"{name}: the tiny model should upsample"
        assert len(interleaves) == exported.count("Resize") and "Resize" not in built, (name, len(interleaves))
