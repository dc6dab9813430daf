"""Winograd F(2x2, 3x3) convolutions (engines/winograd.py): the rewritten graph computes the 3x3 convolution.

Both graphs are checked against the exact result (float64 numpy) with each one's own rounding bound:
the direct convolution's gamma(9 Cin + 1) of the terms' magnitudes, Winograd's gamma(Cin + 42) of the
magnitudes its transforms combine (|A|^T [(|G| |g| |G|^T) * (|B|^T |d| |B|)] |A|), so the rewrite is shown
to compute the same function, not merely something close to the original on one CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tolerance import gamma

from trt_bgswap.engines.winograd import _AT, _BT, _G, MAX_KERNEL_PAIRS, input_transform, kernel_taps, kernel_transform, output_transform, winograd_convolutions

pytestmark = pytest.mark.numerics


def _graph(weight: np.ndarray, bias: np.ndarray | None, **conv_attrs: object) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
        inputs.append("b")
    attrs = {"kernel_shape": list(weight.shape[2:]), "pads": [1, 1, 1, 1], **conv_attrs}
    conv = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weight.shape[1], "H", "W"])
    graph = helper.make_graph([conv], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray, level: str = "disable") -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


def _exact(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The convolution in float64; the sum of |terms| it adds (direct); the magnitudes Winograd's transforms combine."""
    x64, w = x.astype(np.float64), weight.astype(np.float64)
    n, _, h, wd = x.shape
    padded = np.pad(x64, ((0, 0), (0, 0), (1, 1), (1, 1)))
    y = np.zeros((n, w.shape[0], h, wd))
    mag = np.zeros_like(y)
    for dy in range(3):
        for dx in range(3):
            window = padded[:, :, dy : dy + h, dx : dx + wd]
            y += np.einsum("oc,nchw->nohw", w[:, :, dy, dx], window)
            mag += np.einsum("oc,nchw->nohw", np.abs(w[:, :, dy, dx]), np.abs(window))
    # Winograd's magnitudes, tile by tile: the input padded to whole 2x2 output tiles
    th, tw = -(-h // 2), -(-wd // 2)
    tiles_in = np.pad(np.abs(x64), ((0, 0), (0, 0), (1, 1 + 2 * th - h), (1, 1 + 2 * tw - wd)))
    u = np.einsum("ui,ocij,vj->ocuv", np.abs(_G), np.abs(w), np.abs(_G))
    wmag = np.zeros((n, w.shape[0], 2 * th, 2 * tw))
    for i in range(th):
        for j in range(tw):
            d = tiles_in[:, :, 2 * i : 2 * i + 4, 2 * j : 2 * j + 4]
            v = np.einsum("uy,ncyx,vx->ncuv", np.abs(_BT), d, np.abs(_BT))
            m = np.einsum("ocuv,ncuv->nouv", u, v)
            wmag[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = np.einsum("au,nouv,bv->noab", np.abs(_AT), m, np.abs(_AT))
    wmag = wmag[:, :, :h, :wd]
    if bias is not None:
        y += bias[None, :, None, None]
        mag += np.abs(bias)[None, :, None, None]
        wmag += np.abs(bias)[None, :, None, None]
    return y, mag, wmag


def test_transforms_are_lavin_and_grays() -> None:
    """One tile by hand: the three transforms applied through the graph's tile order give the direct 3x3 result."""
    rng = np.random.default_rng(0)
    d, g = rng.standard_normal((4, 4)), rng.standard_normal((1, 1, 3, 3))
    order = [(2 * si + a, 2 * sj + b) for si in (0, 1) for sj in (0, 1) for a in (0, 1) for b in (0, 1)]
    gathered = np.array([d[y, x] for y, x in order])
    products = (kernel_transform() @ kernel_taps(g))[:, 0] * (input_transform() @ gathered)
    tile = (output_transform() @ products).reshape(2, 2)
    direct = np.array([[np.sum(d[a : a + 3, b : b + 3] * g[0, 0]) for b in (0, 1)] for a in (0, 1)])
    np.testing.assert_allclose(tile, direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("batch", "cin", "cout", "h", "w", "bias"),
    [(2, 5, 7, 6, 9, True), (1, 4, 3, 7, 5, False), (1, 3, 2, 1, 1, True), (2, 6, 6, 8, 8, True)],
    ids=["batch2-odd-width", "odd-both", "one-pixel", "square"],
)
def test_winograd_computes_the_convolution(batch: int, cin: int, cout: int, h: int, w: int, bias: bool) -> None:
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32) if bias else None
    x = rng.standard_normal((batch, cin, h, w)).astype(np.float32)
    original, rewritten = _graph(weight, b), _graph(weight, b)
    assert winograd_convolutions(rewritten, ".", least_channels=1) == 1
    ops = [n.op_type for n in rewritten.graph.node]
    assert "Conv" not in ops and ops.count("MatMul") == 4, ops
    assert "w" not in {t.name for t in rewritten.graph.initializer}, "the 3x3 weight is dropped once unused"

    exact, mag, wmag = _exact(x, weight, b)
    for level in ("disable", "all"):  # as written, and as ONNX Runtime's optimizer leaves it (what the build saves)
        got_original, got_rewritten = _run(original, x, level), _run(rewritten, x, level)
        assert got_rewritten.shape == exact.shape == (batch, cout, h, w)
        assert np.all(np.abs(got_original - exact) <= gamma(9 * cin + 1) * mag), level
        # input transform (16 terms), kernel transform (9), Cin products, output transform (16), bias
        assert np.all(np.abs(got_rewritten - exact) <= gamma(cin + 42) * wmag), level


@pytest.mark.parametrize("case", ["strided", "1x1", "grouped", "too_narrow", "too_wide"])
def test_other_convolutions_are_left_alone(case: str) -> None:
    wide = (MAX_KERNEL_PAIRS // 64 + 1, 64, 3, 3)  # one output channel more than the most kernel pairs allow
    shape = (4, 4, 1, 1) if case == "1x1" else (4, 2, 3, 3) if case == "grouped" else wide if case == "too_wide" else (4, 4, 3, 3)
    attrs: dict[str, object] = {"strides": [2, 2]} if case == "strided" else {"group": 2} if case == "grouped" else {}
    if case == "1x1":
        attrs["pads"] = [0, 0, 0, 0]
    model = _graph(np.zeros(shape, np.float32), None, **attrs)
    before = model.SerializeToString()
    assert winograd_convolutions(model, ".", least_channels=5 if case == "too_narrow" else 1) == 0
    assert winograd_convolutions(model, ".", least_channels=0) == 0  # 0: off
    assert model.SerializeToString() == before


def test_external_weights_are_read_from_their_file(tmp_path: Path) -> None:
    """The UNet's 3x3 weights live in model.onnx_data: the rewrite reads them from there."""
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    onnx.save_model(_graph(weight, None), str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert winograd_convolutions(model, tmp_path, least_channels=1) == 1
    x = rng.standard_normal((1, 4, 5, 6)).astype(np.float32)
    exact, _, wmag = _exact(x, weight, None)
    onnx.load_external_data_for_model(model, str(tmp_path))
    assert np.all(np.abs(_run(model, x) - exact) <= gamma(4 + 42) * wmag)


def test_the_optimized_graph_keeps_only_the_original_weights(tmp_path: Path) -> None:
    """ONNX Runtime's constant folding (level all, as the build optimizes) must not store the transformed kernels:
    at 16/9 of the weights, they would add 1.6 GB to the SD1.5 UNet."""
    rng = np.random.default_rng(9)
    weight = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
    model = _graph(weight, rng.standard_normal(6).astype(np.float32))
    assert winograd_convolutions(model, ".", least_channels=1) == 1
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sizes = sorted(int(np.prod(t.dims)) for t in onnx.load(str(tmp_path / "optimized.onnx")).graph.initializer)
    assert weight.size in sizes and 16 * 6 * 5 not in sizes, sizes


def test_the_rewrite_is_off_unless_a_builder_opts_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The product's builds leave every convolution alone (memory first); the environment variable opts in, and its
    value is part of the build's cache key so a change rebuilds."""
    from trt_bgswap.engines.winograd import MIN_CHANNELS_ENV, cache_tag, min_channels
    from trt_bgswap.errors import UsageError

    model = _graph(np.ones((4, 4, 3, 3), np.float32), None)
    monkeypatch.delenv(MIN_CHANNELS_ENV, raising=False)
    assert (min_channels(), cache_tag(), winograd_convolutions(model, ".")) == (0, "off", 0)
    monkeypatch.setenv(MIN_CHANNELS_ENV, "4")
    assert min_channels() == 4 and cache_tag() != "off" and winograd_convolutions(model, ".") == 1
    monkeypatch.setenv(MIN_CHANNELS_ENV, "wide")
    with pytest.raises(UsageError, match=MIN_CHANNELS_ENV):
        min_channels()
