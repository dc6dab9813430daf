"""IS-Net (export/isnet.py) and the RMBG export (export/rmbg.py) against PyTorch and the source graphs."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.torch import load_file, save_file
from skimage import data
from tolerance import assert_within, graph_tolerances

from trt_bgswap.errors import ModelError
from trt_bgswap.export.isnet import RSU4, RSU7, BriaRMBG, _upsample_like
from trt_bgswap.export.rmbg import export_rmbg, load_rmbg_weights
from trt_bgswap.onnx_graph import graph_precision, prune_to_outputs
from trt_bgswap.export.tiny_rmbg import TINY_CHANNEL_DIVISOR, TINY_INPUT_SIZE, random_isnet, write_tiny_rmbg

SEED = 0


@pytest.fixture(scope="module")
def tiny(tiny_rmbg_dir: Path) -> Path:
    """write_tiny_rmbg(seed=SEED): the session's folder (tests/conftest.py; read-only)."""
    return tiny_rmbg_dir


def _photo_batch(size: int, names: tuple[str, ...] = ("astronaut", "chelsea", "coffee")) -> np.ndarray:
    """Real photos resized as RMBG's reference does: (B, 3, size, size), x/255 - 0.5."""
    out = []
    for name in names:
        t = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].float()
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear") / 255.0 - 0.5
        out.append(t[0].numpy())
    return np.stack(out).astype(np.float32)


def _ort(path: Path, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


# --- (i) the architecture ---

# Every key of RMBG-1.4's state dict: convs/BNs inside RSU stages, the stem conv and six side convs.
KEY_PATTERN = re.compile(
    r"^(conv_in|side[1-6])\.(weight|bias)$"
    r"|^stage[1-6]d?\.rebnconv(in|[1-7]d?)\."
    r"(conv_s1\.(weight|bias)|bn_s1\.(weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def test_full_width_matches_rmbg14_layout() -> None:
    """Built on the meta device (no memory, no forward): RMBG-1.4's key names and its published 44.1 M size."""
    with torch.device("meta"):
        full = BriaRMBG()
    state = full.state_dict()
    bad = [k for k in state if not KEY_PATTERN.match(k)]
    assert not bad, f"keys outside RMBG-1.4's naming: {bad[:5]}"
    # The hub counts every tensor in model.safetensors (BatchNorm statistics included): "44.1M params".
    total = sum(v.numel() for v in state.values())
    assert round(total / 1e6, 1) == 44.1, f"{total} tensor elements, the published RMBG-1.4 has 44.1 M"
    assert state["conv_in.weight"].shape == (64, 3, 3, 3)
    assert state["stage5d.rebnconvin.conv_s1.weight"].shape == (512, 1024, 3, 3)
    assert state["stage1d.rebnconv7.conv_s1.weight"].shape == (16, 16, 3, 3)
    assert state["side6.weight"].shape == (1, 512, 3, 3)
    # the tiny model keeps the module tree: same keys, every channel count divided
    tiny = BriaRMBG(channel_divisor=TINY_CHANNEL_DIVISOR).state_dict()
    assert list(tiny) == list(state)
    assert tiny["stage5d.rebnconvin.conv_s1.weight"].shape == (512 // 8, 1024 // 8, 3, 3)


def _rsu7_unrolled(b: RSU7, x: torch.Tensor) -> torch.Tensor:
    """RSU-7 written out as in the reference, to check the loop in :class:`RSU`."""
    hxin = b.rebnconvin(x)
    hx1 = b.rebnconv1(hxin)
    hx2 = b.rebnconv2(b.pool1(hx1))
    hx3 = b.rebnconv3(b.pool2(hx2))
    hx4 = b.rebnconv4(b.pool3(hx3))
    hx5 = b.rebnconv5(b.pool4(hx4))
    hx6 = b.rebnconv6(b.pool5(hx5))
    hx7 = b.rebnconv7(hx6)
    hx6d = b.rebnconv6d(torch.cat((hx7, hx6), 1))
    hx5d = b.rebnconv5d(torch.cat((_upsample_like(hx6d, hx5), hx5), 1))
    hx4d = b.rebnconv4d(torch.cat((_upsample_like(hx5d, hx4), hx4), 1))
    hx3d = b.rebnconv3d(torch.cat((_upsample_like(hx4d, hx3), hx3), 1))
    hx2d = b.rebnconv2d(torch.cat((_upsample_like(hx3d, hx2), hx2), 1))
    hx1d = b.rebnconv1d(torch.cat((_upsample_like(hx2d, hx1), hx1), 1))
    return hx1d + hxin


def _rsu4_unrolled(b: RSU4, x: torch.Tensor) -> torch.Tensor:
    hxin = b.rebnconvin(x)
    hx1 = b.rebnconv1(hxin)
    hx2 = b.rebnconv2(b.pool1(hx1))
    hx3 = b.rebnconv3(b.pool2(hx2))
    hx4 = b.rebnconv4(hx3)
    hx3d = b.rebnconv3d(torch.cat((hx4, hx3), 1))
    hx2d = b.rebnconv2d(torch.cat((_upsample_like(hx3d, hx2), hx2), 1))
    hx1d = b.rebnconv1d(torch.cat((_upsample_like(hx2d, hx1), hx1), 1))
    return hx1d + hxin


@pytest.mark.parametrize(("stage", "unrolled", "side"), [("stage1", _rsu7_unrolled, 75), ("stage4", _rsu4_unrolled, 9)])
def test_rsu_loop_matches_unrolled_reference(
    stage: str, unrolled: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor], side: int
) -> None:
    model = random_isnet(SEED)
    block = getattr(model, stage)
    x = torch.randn(2, block.rebnconvin.conv_s1.in_channels, side, side, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        err = (block(x) - unrolled(block, x)).abs().max().item()
    # exact: the loop calls the same modules on the same tensors in the same order as the unrolled code
    assert err == 0.0, f"{stage} ({type(block).__name__}) on {side}x{side}: max abs diff {err:.3g} vs the unrolled block"


def test_safetensors_round_trip_is_strict_and_exact(tiny: Path, tmp_path: Path) -> None:
    """The folder's weights reload strictly (via config.json's channel_divisor) and give the same 12 tensors."""
    ref = random_isnet(SEED)
    loaded = load_rmbg_weights(tiny)
    path = tmp_path / "again.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.state_dict().items()}, str(path))
    again = BriaRMBG(channel_divisor=TINY_CHANNEL_DIVISOR)
    again.load_state_dict(load_file(str(path)), strict=True)
    again.eval()
    x = torch.from_numpy(_photo_batch(TINY_INPUT_SIZE, ("chelsea",)))
    with torch.no_grad():
        want = ref(x)
        for model in (loaded, again):
            got = model(x)
            for kind, a, b in (("mask", want[0], got[0]), ("feature", want[1], got[1])):
                for i, (t_ref, t_got) in enumerate(zip(a, b), start=1):
                    err = (t_ref - t_got).abs().max().item()
                    # exact: bit-identical weights through the same module code
                    assert err == 0.0, f"{kind} {i}: max abs diff {err:.3g} after the safetensors round trip"
    assert len(want[0]) == 6 and all(m.shape == (1, 1, TINY_INPUT_SIZE, TINY_INPUT_SIZE) for m in want[0])
    spread = float(want[0][0].std())
    assert spread > 0.05, f"the tiny model's main mask is nearly constant (std {spread:.3g}); tests would be weak"


def test_tiny_folder_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = write_tiny_rmbg(tmp_path / "again", seed=SEED)
    for name in ("config.json", "preprocessor_config.json", "model.safetensors", "onnx/model.onnx"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), f"{name} differs between two writes with seed {SEED}"
    other = random_isnet(SEED + 1).state_dict()
    base = load_file(str(tiny / "model.safetensors"))
    assert not torch.equal(other["conv_in.weight"], base["conv_in.weight"]), "a different seed gave the same weights"
    stats = base["stage3.rebnconv2.bn_s1.running_var"]
    assert not torch.allclose(stats, torch.ones_like(stats)), "BatchNorm running stats are left at their defaults"


def test_tiny_folder_mirrors_published_files(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    assert (config["in_ch"], config["out_ch"]) == (3, 1)
    pre = json.loads((tiny / "preprocessor_config.json").read_text())
    assert pre["size"] == {"width": TINY_INPUT_SIZE, "height": TINY_INPUT_SIZE}
    assert pre["image_mean"] == [0.5] * 3 and pre["image_std"] == [1] * 3 and abs(pre["rescale_factor"] - 1 / 255) < 1e-12
    for name, precision in (("model.onnx", "fp32"), ("model_fp16.onnx", "fp16"), ("model_quantized.onnx", "int8")):
        m = onnx.load(str(tiny / "onnx" / name))
        assert [i.name for i in m.graph.input] == ["input"]
        assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT, f"{name}: input is not float32"
        assert m.graph.output[0].name == "output" and len(m.graph.output) == 12, f"{name}: outputs {[o.name for o in m.graph.output]}"
        assert graph_precision(m) == precision


# --- (ii) export from safetensors weights vs PyTorch ---


# fp32 is re-run under the portable arithmetic (PyTorch's kernels change there; fp16's own roundings dwarf that)
@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.numerics), "fp16"])
def test_export_from_weights_matches_pytorch(tiny: Path, tmp_path: Path, precision: str) -> None:
    entry, cfg = export_rmbg(tiny, tmp_path, precision=precision)
    path = tmp_path / entry.file
    assert entry.file == "rmbg/model.onnx" and path.is_file() and entry.precision == precision
    assert (cfg.input_size, cfg.mean, cfg.std) == ((TINY_INPUT_SIZE,) * 2, (0.5,) * 3, (1.0,) * 3)
    assert (cfg.input_name, cfg.output_name) == ("input", "output") == (entry.spec.input_names[0], entry.spec.output_names[0])
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == ["output"]
    sigmoids = sum(n.op_type == "Sigmoid" for n in graph.node)
    assert sigmoids == 1, f"{sigmoids} Sigmoid nodes: the side outputs were not dropped"

    x = _photo_batch(TINY_INPUT_SIZE)  # batch of 3: the exported batch is dynamic
    (got,) = _ort(path, {"input": x})
    with torch.no_grad():
        want = random_isnet(SEED)(torch.from_numpy(x))[0][0].numpy()
    assert got.shape == want.shape == (3, 1, TINY_INPUT_SIZE, TINY_INPUT_SIZE) and got.dtype == np.float32
    err = float(np.abs(got - want).max())
    tol = graph_tolerances(path, {"input": x}, {"output": got})["output"]  # same net, two implementations: rounding only
    assert_within(err, tol, f"{precision} ONNX 'output' vs PyTorch sigmoid(d1)")


# --- (iii) published-style ONNX sources, pruned ---


@pytest.mark.parametrize(
    ("precision", "source_file", "tol"),
    [("fp32", "model.onnx", 0.0), ("fp16", "model_fp16.onnx", 0.0), ("int8", "model_quantized.onnx", 0.0)],
)
def test_published_folder_pruned_main_output_is_unchanged(
    tiny: Path, tmp_path: Path, precision: str, source_file: str, tol: float
) -> None:
    """ONNX-only folder: the file is chosen by precision; pruning leaves the main output bit-identical."""
    folder = tmp_path / "published"
    shutil.copytree(tiny / "onnx", folder / "onnx")
    shutil.copy(tiny / "preprocessor_config.json", folder)
    entry, cfg = export_rmbg(folder, tmp_path / "out", precision=precision)
    out = tmp_path / "out" / entry.file
    assert entry.precision == precision
    assert (cfg.input_name, cfg.output_name, cfg.input_size) == ("input", "output", (TINY_INPUT_SIZE,) * 2)
    assert entry.spec.tensor("input").shape == ("B", 3, "S", "S")

    source = onnx.load(str(folder / "onnx" / source_file))
    pruned = onnx.load(str(out))
    assert [o.name for o in pruned.graph.output] == ["output"]
    assert len(pruned.graph.node) < len(source.graph.node), "nothing was pruned"
    assert sum(n.op_type == "Sigmoid" for n in pruned.graph.node) == 1

    x = _photo_batch(TINY_INPUT_SIZE, ("coffee", "astronaut"))
    want = _ort(folder / "onnx" / source_file, {"input": x})[0]  # all 12 outputs computed, the first kept
    (got,) = _ort(out, {"input": x})
    err = float(np.abs(got - want).max())
    # exact: pruning only drops nodes that do not feed 'output'; what remains runs the same kernels on the same inputs
    assert err <= tol, f"{source_file}: pruned main output vs the original graph's: max abs diff {err:.3g}"


def test_published_file_converted_to_fp16(tiny: Path, tmp_path: Path) -> None:
    entry, _ = export_rmbg(tiny / "onnx" / "model.onnx", tmp_path, precision="fp16")
    assert entry.precision == "fp16"
    pruned = onnx.load(str(tmp_path / entry.file))
    assert graph_precision(pruned) == "fp16"
    x = _photo_batch(TINY_INPUT_SIZE, ("chelsea",))
    want = _ort(tiny / "onnx" / "model.onnx", {"input": x}, ["output"])[0]
    (got,) = _ort(tmp_path / entry.file, {"input": x})
    err = float(np.abs(got - want).max())
    tol = graph_tolerances(tmp_path / entry.file, {"input": x}, {"output": got})["output"]  # the float16 roundings of every node
    assert_within(err, tol, "fp16-converted published graph vs fp32")


def test_fp16_io_graph_gets_fp32_boundary(tiny: Path, tmp_path: Path) -> None:
    """A graph with fp16 inputs/outputs is wrapped in casts; the numbers stay the fp16 graph's.

    Not bit-identical: ONNX Runtime's CPU provider runs fp16 nodes in fp32 behind casts it
    inserts, and folds our input cast with them, so the input skips one fp16 rounding.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = tmp_path / "fp16io.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(tiny / "onnx" / "model.onnx")), keep_io_types=False), str(src))
    entry, _ = export_rmbg(src, tmp_path / "out", precision="fp16")
    out = onnx.load(str(tmp_path / "out" / entry.file))
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = _photo_batch(TINY_INPUT_SIZE, ("coffee",))
    want = _ort(src, {"input": x.astype(np.float16)}, ["output"])[0].astype(np.float32)
    (got,) = _ort(tmp_path / "out" / entry.file, {"input": x})
    err = float(np.abs(got - want).max())
    # one float16 rounding apart at the input, so every later float16 rounding may fall differently
    tol = graph_tolerances(tmp_path / "out" / entry.file, {"input": x}, {"output": got})["output"]
    assert_within(err, tol, "cast-wrapped fp16 graph vs the fp16-I/O original")


def test_static_batch_stays_static(tiny: Path, tmp_path: Path) -> None:
    m = onnx.load(str(tiny / "onnx" / "model.onnx"))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    src = tmp_path / "batch1.onnx"
    onnx.save(m, str(src))
    entry, _ = export_rmbg(src, tmp_path / "out")
    assert entry.spec.tensor("input").shape == (1, 3, "S", "S")
    assert entry.spec.tensor("output").shape == (1, 1, "S", "S")


def test_prune_rejects_unknown_output(tiny: Path) -> None:
    with pytest.raises(ModelError, match="no outputs"):
        prune_to_outputs(onnx.load(str(tiny / "onnx" / "model.onnx")), ["d7"])


# --- (v) bad sources ---


def _four_channel_onnx(path: Path) -> Path:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])
    graph = helper.make_graph([helper.make_node("Sigmoid", ["input"], ["output"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", "no such file or folder"),
        ("pickle_file", "pickled PyTorch weights are refused"),
        ("pickle_folder", "pickled PyTorch weights are refused"),
        ("empty_folder", "no RMBG model here"),
        ("not_onnx", "not a readable ONNX file"),
        ("four_channel_onnx", "4 channels; RMBG takes 3"),
        ("four_channel_config", "in_ch=4; RMBG takes 3-channel"),
        ("wrong_width", "does not fit RMBG-1.4's IS-Net"),
        ("int8_from_weights", "int8 comes only from a published"),
        ("bad_precision", "choose one of fp32, fp16, int8"),
        ("lonely_safetensors", "need RMBG-1.4's layout"),
    ],
)
def test_bad_sources_raise_model_error(tiny: Path, tmp_path: Path, case: str, match: str) -> None:
    precision = "fp32"
    src = tmp_path / "src"
    if case == "pickle_file":
        src = tmp_path / "model.pth"
        src.write_bytes(b"\x80\x04not really a pickle")
    elif case in ("pickle_folder", "empty_folder"):
        src.mkdir()
        if case == "pickle_folder":
            (src / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif case == "not_onnx":
        src = tmp_path / "model.onnx"
        src.write_text("this is not a protobuf")
    elif case == "four_channel_onnx":
        src = _four_channel_onnx(tmp_path / "rgba.onnx")
    elif case in ("four_channel_config", "wrong_width", "int8_from_weights"):
        shutil.copytree(tiny, src, ignore=shutil.ignore_patterns("onnx"))
        config = json.loads((src / "config.json").read_text())
        if case == "four_channel_config":
            config["in_ch"] = 4
        elif case == "wrong_width":
            config["channel_divisor"] = 4
        else:
            precision = "int8"
        (src / "config.json").write_text(json.dumps(config))
    elif case == "bad_precision":
        src, precision = tiny, "bf16"
    elif case == "lonely_safetensors":
        src.mkdir()
        src = src / "weights.safetensors"
        shutil.copy(tiny / "model.safetensors", src)
    with pytest.raises(ModelError, match=match) as info:
        export_rmbg(src, tmp_path / "out", precision=precision)
    message = str(info.value)
    assert "\n" not in message, f"multi-line error: {message!r}"
    if case != "bad_precision":
        assert str(src.name) in message, f"the error does not name the source: {message!r}"
    assert not (tmp_path / "out" / "rmbg" / "model.onnx").exists(), "a failed export left a model behind"
