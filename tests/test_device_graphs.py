"""export/device_graphs.py: each device graph vs the host computation it replaces, on ONNX Runtime CPU.

- ``vae_encoder_sample`` vs the host VAE encoder stage (VAE encoder graph + numpy draw/scale),
- ``vae_decoder_image`` vs ``Pipeline.decode`` (numpy unscale + VAE decoder graph + numpy clamp),
- ``rmbg_full`` vs ``Masker.predict`` (RMBG-1.4's reference pre/post-processing in numpy around the net),

on the tiny exported models and real photos, with and without a VAE shift factor, from the
exported RMBG graph and from a published-style one (side outputs, dynamic size), at opset
17 and at opset 11 (Resize's positional roi/scales), and the constant-prediction guard.
Every graph also passes the TensorRT-parser compatibility check.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from skimage import data
from tolerance import EIGHT_BIT_STEP, assert_within, graph_tolerances

from trt_bgswap.engines.onnx_check import check_onnx_for_tensorrt
from trt_bgswap.errors import ModelError
from trt_bgswap.export.device_graphs import (
    export_device_graphs,
    rmbg_full_graph,
    save_graph,
    vae_decoder_image_graph,
    vae_encoder_sample_graph,
)
from trt_bgswap.manifest import Manifest, RmbgConfig
from trt_bgswap.runtime.masker import Masker
from trt_bgswap.runtime.ort_backend import OrtEngine
from trt_bgswap.runtime.pipeline import Pipeline
from trt_bgswap.specs import DEVICE_GRAPHS
from trt_bgswap.specs import RMBG_FULL as RMBG
from trt_bgswap.specs import VAE_DECODER_IMAGE as DECODER
from trt_bgswap.specs import VAE_ENCODER_SAMPLE as ENCODER

# The alpha becomes an 8-bit mask, and the device graph resamples with ONNX Runtime's Resize where
# the masker uses numpy: parity is asked to one 8-bit step (the product's quantum), as in test_masker.
ALPHA_TOL = EIGHT_BIT_STEP
SIZES = [(64, 96), (128, 64), (32, 32)]  # (H, W) pixels, multiples of the tiny VAE's factor
SHIFTS = [None, 0.1159]  # SD1.5 has no shift; families that do subtract it before scaling


def photo(name: str) -> np.ndarray:
    if name == "astronaut-crop":
        return np.ascontiguousarray(data.astronaut()[40:211:3, 100:357:2])  # 57x129: odd sizes, upscaled to the net
    if name == "tiny":
        # 20x30, far smaller than the net's input. (At 5x7 the tiny random net's mask spans 3e-7 after the
        # resize back, and min-max normalisation turns float rounding into any error at all, in both paths.)
        return np.ascontiguousarray(data.coffee()[::20, ::20])
    return getattr(data, name)()


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def device_dir(exported_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's tiny export with the device graphs added by export_device_graphs."""
    folder = tmp_path_factory.mktemp("device-graphs") / "export"
    shutil.copytree(exported_dir, folder)
    manifest = Manifest.load(folder)
    added = export_device_graphs(folder, manifest.models, manifest.inpaint, manifest.rmbg)
    assert sorted(added) == sorted(DEVICE_GRAPHS)
    manifest.models.update(added)
    manifest.save(folder)
    return folder


@pytest.fixture(scope="module")
def host(device_dir: Path) -> Pipeline:
    return Pipeline.load(device_dir, provider="cpu")


def engine_for(folder: Path, name: str) -> OrtEngine:
    entry = Manifest.load(folder).models[name]
    engine = OrtEngine(entry.spec, folder / entry.file, provider="cpu")
    engine.load()
    return engine


def with_shift(host: Pipeline, shift: float | None, folder: Path, tmp_path: Path) -> tuple[Pipeline, OrtEngine, OrtEngine]:
    """The host pipeline and the two VAE device graphs, for a config with the given shift factor."""
    assert host.config is not None
    cfg = dataclasses.replace(host.config, vae_shift_factor=shift)
    assert host.stages.text_encoder is not None
    pipe = Pipeline.from_engines(dataclasses.replace(host.manifest, inpaint=cfg), host.engines, host.stages.text_encoder.tokenizer)
    manifest = Manifest.load(folder)
    enc_model, enc_spec = vae_encoder_sample_graph(onnx.load(str(folder / manifest.models["vae_encoder"].file)), cfg)
    dec_model, dec_spec = vae_decoder_image_graph(onnx.load(str(folder / manifest.models["vae_decoder"].file)), cfg)
    engines = []
    for model, spec in ((enc_model, enc_spec), (dec_model, dec_spec)):
        entry = save_graph(model, spec, tmp_path / spec.name, "fp32")
        engine = OrtEngine(entry.spec, tmp_path / entry.file, provider="cpu")
        engine.load()
        engines.append(engine)
    return pipe, engines[0], engines[1]


@pytest.mark.parametrize("name", DEVICE_GRAPHS)
def test_device_graphs_pass_the_tensorrt_parser_check(device_dir: Path, name: str) -> None:
    entry = Manifest.load(device_dir).models[name]
    report = check_onnx_for_tensorrt(device_dir / entry.file, entry.spec)
    assert report.ok, f"{name}: {[str(i) for i in report.errors]}"


@pytest.mark.parametrize("shift", SHIFTS, ids=lambda s: f"shift={s}")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_vae_encoder_sample_equals_host_encode(host: Pipeline, device_dir: Path, tmp_path: Path, size: tuple[int, int], shift: float | None) -> None:
    pipe, encoder, _ = with_shift(host, shift, device_dir, tmp_path)
    assert pipe.config is not None
    f = pipe.config.vae_scale_factor
    rng = np.random.default_rng(size[0] + size[1])
    image = photo("chelsea")[: size[0], : size[1]].transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1.0
    masked = image * (rng.random((1, 1, *size)) < 0.5)  # a masked image, as the pipeline feeds it
    eps = rng.standard_normal((1, pipe.config.latent_channels, size[0] // f, size[1] // f)).astype(np.float32)
    want = pipe.stages.generator.encoder.encode(masked.astype(np.float32), eps)
    feeds = {"sample": masked.astype(np.float32), "eps": eps}
    got = encoder(**feeds)["masked_image_latents"]
    assert got.shape == want.shape, f"masked_image_latents {got.shape} vs host {want.shape}"
    # the same VAE graph and the same few wrapper operations on both sides: they differ by rounding only
    tol = graph_tolerances(encoder.path, feeds, {"masked_image_latents": got})["masked_image_latents"]
    assert_within(max_err(got, want), tol, "masked_image_latents vs host encode")
    # the draw matters: other eps, other latents
    assert max_err(encoder(sample=feeds["sample"], eps=-eps)["masked_image_latents"], want) > 100 * tol


@pytest.mark.parametrize("shift", SHIFTS, ids=lambda s: f"shift={s}")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_vae_decoder_image_equals_host_decode(host: Pipeline, device_dir: Path, tmp_path: Path, size: tuple[int, int], shift: float | None) -> None:
    pipe, _, decoder = with_shift(host, shift, device_dir, tmp_path)
    assert pipe.config is not None
    f = pipe.config.vae_scale_factor
    rng = np.random.default_rng(size[0] * size[1])
    latents = (rng.standard_normal((1, pipe.config.latent_channels, size[0] // f, size[1] // f)) * 3).astype(np.float32)
    want = pipe.stages.generator.decoder.decode(latents)[0]  # float32 HxWx3 in [0, 1]
    got = decoder(latents=latents)["image"]
    assert got.shape == (1, 3, *size), f"image shape {got.shape}"
    tol = lambda: graph_tolerances(decoder.path, {"latents": latents}, {"image": got})["image"]  # noqa: E731 - same graph + wrapper ops: rounding only
    assert_within(max_err(got[0].transpose(1, 2, 0), want), tol, "image vs host decode")
    assert 0.0 <= got.min() and got.max() <= 1.0, f"image outside [0, 1]: [{got.min()}, {got.max()}]"


@pytest.mark.parametrize("name", ["chelsea", "astronaut-crop", "coffee", "tiny"])
def test_rmbg_full_equals_masker_on_photos(device_dir: Path, name: str) -> None:
    manifest = Manifest.load(device_dir)
    masker = Masker.from_export(device_dir, manifest, provider="cpu")
    rmbg_full = engine_for(device_dir, RMBG)
    rgb = photo(name)
    want = masker.predict(rgb)
    got = rmbg_full(image=rgb[None])["alpha"]
    assert got.shape == (1, 1, *rgb.shape[:2]), f"alpha shape {got.shape} for a {rgb.shape} photo"
    err = max_err(got[0, 0], want)
    assert_within(err, ALPHA_TOL, f"alpha of {name} {rgb.shape} vs Masker.predict")
    print(f"rmbg_full vs masker, {name} {rgb.shape[:2]}: max abs err {err:.3g}")


def test_rmbg_full_from_a_published_style_graph(tiny_models_dir: Path, tmp_path: Path) -> None:
    """The tiny RMBG's published-style ONNX (side outputs, dynamic size, config one folder up)."""
    path = tiny_models_dir / "rmbg" / "onnx" / "model.onnx"
    masker = Masker.from_onnx(path, provider="cpu")
    model, spec = rmbg_full_graph(onnx.load(str(path)), masker.cfg)
    entry = save_graph(model, spec, tmp_path / RMBG, "fp32")
    assert [o.name for o in onnx.load(str(tmp_path / entry.file)).graph.output] == ["alpha"], "side outputs must be pruned"
    engine = OrtEngine(entry.spec, tmp_path / entry.file, provider="cpu")
    rgb = photo("coffee")
    err = max_err(engine(image=rgb[None])["alpha"][0, 0], masker.predict(rgb))
    assert_within(err, ALPHA_TOL, "alpha (published-style graph) vs Masker.predict")
    assert check_onnx_for_tensorrt(tmp_path / entry.file, entry.spec).ok


def toy_rmbg(path: Path, opset: int, side: int, constant: float | None) -> Path:
    """A published-style RMBG stand-in with batch fixed to 1: a 3x3 conv + sigmoid, or a constant prediction."""
    rng = np.random.default_rng(opset)
    w = numpy_helper.from_array(rng.standard_normal((1, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["logits"], pads=[1, 1, 1, 1])]
    inits = [w]
    if constant is None:
        nodes.append(helper.make_node("Sigmoid", ["logits"], ["output"]))
    else:
        inits += [numpy_helper.from_array(np.float32(0.0), "zero"), numpy_helper.from_array(np.float32(constant), "c")]
        nodes += [helper.make_node("Mul", ["logits", "zero"], ["nothing"]), helper.make_node("Add", ["nothing", "c"], ["output"])]
    graph = helper.make_graph(
        nodes,
        "toy-rmbg",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, side, side])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize(
    "constant, crop",
    [(None, False), (0.0, False), (0.25, True), (1.5, True)],
    ids=["varying", "constant-0", "constant-0.25", "constant-1.5"],
)
@pytest.mark.parametrize("opset", [11, 17])
def test_rmbg_full_opsets_fixed_batch_and_constant_guard(tmp_path: Path, opset: int, constant: float | None, crop: bool) -> None:
    """A blank prediction (zeros, as a saturated sigmoid gives) or any constant: clipped, never NaN.

    A constant other than 0 survives bilinear resizing exactly only at scale 1 (ONNX Runtime's
    weights need not sum to exactly 1), hence a photo of the net's size for those.
    """
    side = 24
    path = toy_rmbg(tmp_path / "toy.onnx", opset, side, constant)
    cfg = RmbgConfig(input_size=(side, side), mean=(0.5, 0.4, 0.3), std=(1.0, 0.9, 1.1), input_name="input", output_name="output")
    masker = Masker(OrtEngine(Masker.from_onnx(path, provider="cpu").engine.spec, path, provider="cpu"), cfg)
    model, spec = rmbg_full_graph(onnx.load(str(path)), cfg)
    assert spec.inputs[0].shape[0] == 1, "a graph that fixes batch 1 keeps it"
    entry = save_graph(model, spec, tmp_path / RMBG, "fp32")
    engine = OrtEngine(entry.spec, tmp_path / entry.file, provider="cpu")
    rgb = np.ascontiguousarray(photo("astronaut-crop")[:side, :side]) if crop else photo("astronaut-crop")
    want = masker.predict(rgb)
    got = engine(image=rgb[None])["alpha"][0, 0]
    err = max_err(got, want)
    assert np.isfinite(got).all(), "the constant guard must not divide by zero"
    assert_within(err, ALPHA_TOL, f"alpha (opset {opset}, {constant}) vs Masker.predict")
    if constant is not None:  # exact: a constant survives the resize and the guard clips it, on both sides
        assert err == 0.0 and (got == min(constant, 1.0)).all(), f"constant prediction {constant} -> {np.unique(got)}"
    report = check_onnx_for_tensorrt(tmp_path / entry.file, entry.spec)
    assert report.ok, [str(i) for i in report.errors]


def test_wrapper_refuses_name_clashes(device_dir: Path) -> None:
    manifest = Manifest.load(device_dir)
    model = onnx.load(str(device_dir / manifest.models["vae_encoder"].file))
    old = model.graph.node[0].output[0]
    for node in model.graph.node:  # rename an inner tensor to a name the wrapper adds
        for names in (node.input, node.output):
            for i, n in enumerate(names):
                if n == old:
                    names[i] = "dg_std_eps"
    assert manifest.inpaint is not None
    with pytest.raises(ModelError, match="dg_std_eps"):
        vae_encoder_sample_graph(model, manifest.inpaint)


@pytest.mark.parametrize("name", [ENCODER, DECODER])
def test_vae_graphs_keep_weights_of_the_host_graphs(device_dir: Path, name: str) -> None:
    """The composed graph is the exported one plus wrapper nodes: every inner weight is there, unchanged."""
    manifest = Manifest.load(device_dir)
    inner = onnx.load(str(device_dir / manifest.models[name.split("_image")[0].replace("_sample", "")].file))
    outer = onnx.load(str(device_dir / manifest.models[name].file))
    outer_w = {t.name: numpy_helper.to_array(t) for t in outer.graph.initializer}
    for t in inner.graph.initializer:
        np.testing.assert_array_equal(outer_w[t.name], numpy_helper.to_array(t), err_msg=f"{name}: weight {t.name}")


def test_rmbg_full_around_an_fp16_graph(device_dir: Path, tmp_path: Path) -> None:
    """fp16 weights behind fp32 I/O (export --precision fp16): the wrapper feeds and reads the same fp32 boundary."""
    from trt_bgswap.export.fp16 import convert_to_fp16

    manifest = Manifest.load(device_dir)
    assert manifest.rmbg is not None
    half = tmp_path / "rmbg-fp16.onnx"
    onnx.save_model(convert_to_fp16(device_dir / manifest.models["rmbg"].file), str(half))
    masker = Masker(OrtEngine(manifest.models["rmbg"].spec, half, provider="cpu"), manifest.rmbg)
    model, spec = rmbg_full_graph(onnx.load(str(half)), manifest.rmbg)
    entry = save_graph(model, spec, tmp_path / RMBG, "fp16")
    rgb = photo("chelsea")
    err = max_err(OrtEngine(entry.spec, tmp_path / entry.file, provider="cpu")(image=rgb[None])["alpha"][0, 0], masker.predict(rgb))
    assert_within(err, ALPHA_TOL, "alpha (fp16 net) vs Masker.predict on the same fp16 graph")
    assert check_onnx_for_tensorrt(tmp_path / entry.file, entry.spec).ok


def test_rmbg_full_normalises_each_image_of_a_batch(device_dir: Path) -> None:
    masker = Masker.from_export(device_dir, Manifest.load(device_dir), provider="cpu")
    rmbg_full = engine_for(device_dir, RMBG)
    photos = [np.ascontiguousarray(data.astronaut()[:300, :400]), np.ascontiguousarray(data.coffee()[:300, :400])]
    got = rmbg_full(image=np.stack(photos))["alpha"]
    for i, rgb in enumerate(photos):
        err = max_err(got[i, 0], masker.predict(rgb))
        assert_within(err, ALPHA_TOL, f"batch item {i} vs Masker.predict of that image alone")
        assert got[i, 0].min() == 0.0 and got[i, 0].max() == 1.0, f"batch item {i} is not min-max normalised on its own"
