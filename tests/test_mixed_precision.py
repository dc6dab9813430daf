"""fp16 graphs with fp32 islands (trt_bgswap.mixed_precision) against their fp32 sources, on ONNX Runtime's CPU provider.

The graph checked here is the graph TensorRT builds strongly typed (engines/trt_build.py runs the
same pass), so its precision decisions are proven on CPU: per stage (text encoder, UNet at the
worst timestep, RMBG) and the whole 4-step loop. What a GPU adds on top (fp16 accumulation in
some kernels) is not covered here; README, "TensorRT", says so.

Tolerances (tests/tolerance.py): the fp16 graph differs from its fp32 source by the fp16 roundings
of this very computation: every fp16-stored node output rounds once more (u = 2**-11) and every
fp16 weight was rounded once from fp32, accumulation stays fp32 on ONNX Runtime's CPU provider.
Monte Carlo arithmetic on the fp16 graph itself measures how those roundings travel through this
network at these magnitudes and this depth (network_tolerance = SAFETY x the noisy runs' largest
deviation); the bound never looks at the fp32 result it judges.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from skimage import data
from tolerance import NOISE_SAMPLES, assert_within, graph_tolerances, network_tolerance, noisy_pipeline

from trt_bgswap.manifest import Manifest, ModelEntry, sha256_file
from trt_bgswap.mixed_precision import NORM_OPS, TIMESTEP_MODULES, keeps_fp32, to_mixed_fp16
from trt_bgswap.runtime.pipeline import GenerationOptions, Noise, Pipeline
from trt_bgswap.specs import RMBG, TEXT_ENCODER, UNET

WIDTH, HEIGHT, STEPS = 192, 128, 4  # non-square, multiples of the tiny model's size multiple
PROMPT = "a sunny beach with palm trees, photograph"


@pytest.fixture(scope="module")
def fp16_dir(exported_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp32 export with every graph but the VAE run through the fp16 pass (what `build --precision fp16` builds)."""
    folder = tmp_path_factory.mktemp("fp16") / "export"
    shutil.copytree(exported_dir, folder, ignore=shutil.ignore_patterns("engines"))
    manifest = Manifest.load(folder)
    models = dict(manifest.models)
    for name, entry in manifest.models.items():
        if keeps_fp32(name):
            continue
        path = folder / entry.file
        onnx.save_model(to_mixed_fp16(path, name), str(path))
        models[name] = ModelEntry(entry.file, sha256_file(path), "fp16", entry.spec)
    dataclasses.replace(manifest, precision="fp16", models=models).save(folder)  # everything else (memory facts, ...) as exported
    return folder


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)} | {t.name: t.data_type for t in g.initializer}


def test_the_islands_stay_fp32_and_the_rest_is_fp16(fp16_dir: Path) -> None:
    model = onnx.load(str(fp16_dir / Manifest.load(fp16_dir).models[UNET].file))
    types = _types(model)
    FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    timestep = [n for n in model.graph.node if any(m in n.name for m in TIMESTEP_MODULES) and n.op_type in ("Sin", "Cos", "Gemm")]
    norms = [n for n in model.graph.node if n.op_type in NORM_OPS]
    assert timestep and norms
    for n in timestep + norms:
        got = {t: types.get(t) for t in (*n.input, *n.output) if t}
        assert all(v == FLOAT for v in got.values()), f"{n.name} ({n.op_type}) must compute in fp32: {got}"
    matmul_weights = [types.get(n.input[1]) for n in model.graph.node if n.op_type in ("MatMul", "Conv") and n.input[1] in types]
    assert matmul_weights.count(HALF) > 0.9 * len(matmul_weights), "the UNet's matmuls and convolutions run fp16"
    assert all(types[i.name] == FLOAT for i in model.graph.input) and all(types[o.name] == FLOAT for o in model.graph.output), "fp32 I/O"


def _feeds(name: str, spec, rng: np.random.Generator, timestep: float) -> dict[str, np.ndarray]:  # noqa: ANN001
    dims = {"B": 2, "h": HEIGHT // 8, "w": WIDTH // 8, "S": 64}
    feeds = {}
    for t in spec.inputs:
        shape = tuple(dims.get(d, d) if isinstance(d, str) else d for d in t.shape)
        if t.dtype == "int32":
            feeds[t.name] = rng.integers(0, 1000, size=shape).astype(np.int32)
        elif t.name == "timestep":
            feeds[t.name] = np.full(shape, timestep, np.float32)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.numerics
@pytest.mark.parametrize(("name", "timestep"), [(TEXT_ENCODER, 0.0), (UNET, 999.0), (RMBG, 0.0)], ids=["text_encoder", "unet-t999", "rmbg"])
def test_each_fp16_stage_matches_its_fp32_source(exported_dir: Path, fp16_dir: Path, name: str, timestep: float) -> None:
    """Per stage: max |fp16 graph - fp32 graph| within the fp16 graph's own rounding noise (t = 999 is the LCM schedule's first step)."""
    manifest = Manifest.load(exported_dir)
    if name not in manifest.models:
        pytest.skip(f"the export has no {name}")
    entry = manifest.models[name]
    feeds = _feeds(name, entry.spec, np.random.default_rng(0), timestep)
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in onnx.load(str(exported_dir / entry.file), load_external_data=False).graph.input}}
    fp32 = ort.InferenceSession(str(exported_dir / entry.file), providers=["CPUExecutionProvider"])
    fp16_path = fp16_dir / entry.file
    fp16 = ort.InferenceSession(str(fp16_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in fp32.get_outputs()]
    want = dict(zip(names, fp32.run(names, feeds)))
    got = dict(zip(names, fp16.run(names, feeds)))
    tolerances = graph_tolerances(fp16_path, feeds, clean=got)
    for out in names:
        err = float(np.max(np.abs(got[out].astype(np.float64) - want[out])))
        scale = float(np.max(np.abs(want[out])))
        assert_within(err, tolerances[out], f"{name}.{out} (t={timestep:g}): fp16 graph vs fp32 (max |ref| {scale:.3g}, rel {err / scale:.2e})")


@pytest.mark.numerics
@pytest.mark.slow  # ~35 s on the shared 2-core machine (two noisy 4-step loops): run with -m slow
def test_whole_loop_at_four_steps_in_fp16_matches_fp32(exported_dir: Path, fp16_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The 4-step LCM loop with fp16 text encoder and UNet (VAE fp32, as the build keeps it) against the fp32 loop, same noise."""
    rgb = data.chelsea()
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    mask = np.where(((yy - 150) / 110.0) ** 2 + ((xx - 200) / 140.0) ** 2 < 1.0, 0, 255).astype(np.uint8)
    options = GenerationOptions(PROMPT, steps=STEPS, guidance=2.0, size=(WIDTH, HEIGHT))
    fp32, fp16 = Pipeline.load(exported_dir, provider="cpu"), Pipeline.load(fp16_dir, provider="cpu")
    cfg = fp32.manifest.inpaint
    assert cfg is not None
    shape = (1, cfg.latent_channels, HEIGHT // cfg.vae_scale_factor, WIDTH // cfg.vae_scale_factor)
    rng = np.random.default_rng(7)
    noise = Noise(latents=rng.standard_normal(shape).astype(np.float32), posterior=rng.standard_normal(shape).astype(np.float32),
                  steps=tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(STEPS - 1)))
    try:
        want = fp32.inpaint(rgb, mask, options, noise)
        got = fp16.inpaint(rgb, mask, options, noise)
        err = float(np.max(np.abs(got.astype(np.float64) - want)))

        def loop_noise() -> float:  # the fp16 loop's own rounding noise, carried through 4 steps and the fp32 VAE
            noisy = noisy_pipeline(fp16_dir, tmp_path_factory.mktemp("noisy16"))
            try:
                return network_tolerance(got, [noisy.inpaint(rgb, mask, options, noise) for _ in range(NOISE_SAMPLES)])
            finally:
                noisy.close()

        assert_within(err, loop_noise, f"4-step loop, guidance 2: fp16 image vs fp32 image (values in [0, 1], mean abs {float(np.mean(np.abs(got - want))):.2e})")
        assert float(want.std()) > 1e-2, "the comparison is meaningful: the image is not flat"
    finally:
        fp32.close()
        fp16.close()


def test_the_step_arithmetic_of_unet_step_stays_fp32(tmp_path: Path) -> None:
    """In the fused step graph, every node outside the wrapped UNet (``/model/``: guidance and the LCM update) computes fp32."""
    from onnx import TensorProto, helper, numpy_helper

    from trt_bgswap.specs import UNET_STEP

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w")
    c = numpy_helper.from_array(np.array([0.07], np.float32), "c")  # sqrt(alpha_prod) at t = 999
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["eps"], name="/model/conv_in/MatMul"),
        helper.make_node("Mul", ["eps", "c"], ["scaled"], name="/Mul_4"),
        helper.make_node("Sub", ["x", "scaled"], ["diff"], name="/Sub"),
        helper.make_node("Div", ["diff", "c"], ["x0"], name="/Div"),
    ]
    graph = helper.make_graph(nodes, "step", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [2, 4])], [w, c])
    path = tmp_path / "step.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    model = to_mixed_fp16(path, UNET_STEP)
    onnx.checker.check_model(model)
    types = _types(model)
    FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert types["w"] == HALF and types["eps"] == HALF, "the UNet part runs fp16"
    for node in model.graph.node:
        if node.name in ("/Mul_4", "/Sub", "/Div"):  # fp32 from the island's inputs to its outputs: no fp16 round trip between
            seen = {t: types.get(t) for t in (*node.input, *node.output)}
            assert all(v == FLOAT for v in seen.values()), f"{node.name}: {seen}"
            for t in node.input:
                src = next((n for n in model.graph.node if t in n.output), None)
                assert src is None or src.op_type != "Cast" or src.input[0] != "eps" or t.endswith("fp32"), src
    casts = [(n.input[0], n.output[0]) for n in model.graph.node if n.op_type == "Cast"]
    assert not any(types.get(i) == FLOAT and types.get(o) == HALF and any(c[0] == o for c in casts) and all(
        types.get(c[1]) == FLOAT for c in casts if c[0] == o) for i, o in casts), f"an fp32 -> fp16 -> fp32 round trip is left: {casts}"
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # only the fp16 part rounds: eps = x.w (fp16 x and w, fp32 accumulation, stored fp16) errs by at most
    # 3 u16 sum |x_i w_ij| (two input roundings, one output rounding; Higham eq. 3.5); x0 = x/c - eps has it once,
    # and no further fp16 rounding (an fp16 round trip of diff would add u16 |diff| / c ~ 14 u16 |diff|)
    bound = 3 * 2.0**-11 * (np.abs(x) @ np.abs(numpy_helper.to_array(w))) + 8 * 2.0**-24 * np.abs(want)
    assert np.all(np.abs(got - want) <= bound), f"max err {np.max(np.abs(got - want)):.3g}, bound {np.min(bound):.3g}..{np.max(bound):.3g}"
