"""The device-resident denoising loop (runtime/trt_loop.py): its plan on CPU, its execution on a GPU.

CPU tests check every decision the CUDA code executes: the block layout (sizes from the
step graph's spec, 256-byte aligned rows, no overlap), the per-step bindings
(ping-pong without aliasing, the right schedule and noise rows), the packed uploads,
and when a CUDA graph is captured, replayed or not used. (The plan run end to end on
a host buffer is in tests/test_unet_step.py, next to the fused graph it needs.)

The loop's CUDA-touching code itself (TrtStepLoop and the TrtEngine it drives) also
runs on CPU against the version-aware emulation of cuda-python and TensorRT in
tests/emulation, once per emulated release (TensorRT 10.0, 10.16, 11.1; cuda-bindings 12
and 13): results equal the step loop exactly, only the final latents come back, the
schedule is uploaded once per schedule, capture/replay happen when planned, nothing leaks.

GPU tests build a TensorRT plan of the fused tiny UNet-step graph and compare the
device loop with the ONNX Runtime step loop, CUDA-graph replay with eager execution,
and check buffer reuse. They need ``tensorrt``, ``cuda-python`` and an NVIDIA GPU and
are skipped with the reason otherwise (``pytest -ra`` lists them as SKIPPED); they run
unchanged on a GPU machine: ``pip install 'trt-bgswap[trt]' --extra-index-url
https://pypi.nvidia.com`` then ``pytest tests/test_trt_loop.py``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from emulation import Emulation, emulate
from onnx import TensorProto, helper, numpy_helper
from tolerance import NOISE_SAMPLES, assert_within, network_tolerance, noisy_engine

from trt_bgswap.runtime.trt_shapes import DEVICE_ALIGNMENT, GraphEligibility, cuda_graph_eligibility
from trt_bgswap.engines.profiles import DimRange, profile_from_ranges
from trt_bgswap.errors import BackendUnavailable, ModelError, UsageError
from trt_bgswap.runtime.scheduler import COEFFICIENT_NAMES, LCMScheduler
from trt_bgswap.runtime.denoise import DenoiseInputs
from trt_bgswap.runtime.trt_loop import (
    GRAPH_CAPTURE,
    GRAPH_EAGER,
    GRAPH_REPLAY,
    GraphKey,
    TrtStepLoop,
    graph_action,
    loop_layout,
    pack_noise,
    pack_schedule,
    step_copies,
)
from trt_bgswap.specs import StepIO, ModelSpec, unet_spec, unet_step_spec

LATENT, MAX_LENGTH, HIDDEN = 4, 77, 32
SPEC = unet_step_spec(LATENT, MAX_LENGTH, HIDDEN, len(COEFFICIENT_NAMES))
SIZES = [{"B": 1, "h": 16, "w": 24}, {"B": 2, "h": 64, "w": 64}, {"B": 1, "h": 3, "w": 5}]


def coefficients(steps: int):  # noqa: ANN201 - LCMCoefficients
    sched = LCMScheduler()
    sched.set_timesteps(steps)
    assert sched.coefficients is not None
    return sched.coefficients


def inputs_for_spec(spec: ModelSpec, dims: dict[str, int], steps: int, seed: int = 0, guidance: float = 1.5) -> DenoiseInputs:
    rng = np.random.default_rng(seed)
    draw = lambda name: rng.standard_normal(spec.tensor(name).resolve(dims)).astype(np.float32)  # noqa: E731
    return DenoiseInputs(
        latents=draw("latents"),
        step_noise=tuple(draw("noise") for _ in range(steps - 1)),
        mask=(draw("mask") > 0).astype(np.float32),
        masked_image_latents=draw("masked_image_latents"),
        embeddings=draw("encoder_hidden_states"),
        guidance=guidance,
    )


def inputs_for(dims: dict[str, int], steps: int, seed: int = 0, guidance: float = 1.5) -> DenoiseInputs:
    return inputs_for_spec(SPEC, dims, steps, seed, guidance)


# --- the plan, on CPU -------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("dims", SIZES, ids=lambda d: f"B{d['B']}-{d['h']}x{d['w']}")
def test_layout_rows_are_aligned_sized_from_spec_and_disjoint(dims: dict[str, int], steps: int) -> None:
    layout = loop_layout(SPEC, dims, steps)
    sample = SPEC.tensor("latents").nbytes(dims)
    assert sample == 4 * LATENT * dims["h"] * dims["w"]
    expected_rows = {"timestep": (4, steps), "coefficients": (4 * len(COEFFICIENT_NAMES), steps), "noise": (sample, steps + 1)}
    spans = []
    for name, region in layout.regions().items():
        assert (region.row_bytes, region.rows) == expected_rows[name], name
        assert region.stride >= region.row_bytes and region.stride % DEVICE_ALIGNMENT == 0, name
        for row in range(region.rows):
            assert region.at(row) % DEVICE_ALIGNMENT == 0, f"{name} row {row} at {region.at(row)} is not 256-byte aligned"
            spans.append((region.at(row), region.at(row) + region.row_bytes, f"{name}[{row}]"))
    spans.sort()
    for (a0, a1, a), (b0, _, b) in zip(spans, spans[1:]):
        assert a1 <= b0, f"{a} [{a0}, {a1}) overlaps {b} at {b0}"
    assert spans[-1][1] <= layout.nbytes
    # the two uploads are single contiguous ranges holding exactly their regions
    assert layout.schedule_bytes == (layout.timestep.offset, layout.coefficients.end)
    assert layout.noise_bytes == (layout.noise.offset, layout.noise.end)
    assert layout.schedule_bytes[1] <= layout.noise_bytes[0]


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
def test_each_step_copies_its_rows_into_the_fixed_inputs(steps: int) -> None:
    """NVIDIA's pattern: the engine stays bound to its own buffers; each step copies its rows in, then one enqueue."""
    layout = loop_layout(SPEC, SIZES[0], steps)
    for i in range(steps):
        copies = {c.dst: c for c in step_copies(layout, i)}
        assert set(copies) == {StepIO.LATENTS, StepIO.NOISE, StepIO.TIMESTEP, StepIO.COEFFICIENTS}, "every step-varying input, nothing else"
        latents = copies[StepIO.LATENTS]
        if i == 0:
            assert (latents.src_offset, latents.src_output) == (layout.noise.at(0), None), "step 0 reads the initial latents"
        else:
            assert (latents.src_offset, latents.src_output) == (None, StepIO.PREV_LATENTS), f"step {i} reads what step {i - 1} wrote"
        assert copies[StepIO.NOISE].src_offset == layout.noise.at(i + 1)
        assert (copies[StepIO.TIMESTEP].src_offset, copies[StepIO.COEFFICIENTS].src_offset) == (layout.timestep.at(i), layout.coefficients.at(i))
        for c in copies.values():
            assert c.nbytes == SPEC.tensor(c.dst).nbytes(SIZES[0]), c
            assert c.src_offset is None or c.src_offset % DEVICE_ALIGNMENT == 0, c
    with pytest.raises(IndexError):
        step_copies(layout, steps)


@pytest.mark.parametrize("steps", [1, 4])
def test_packed_schedule_and_noise_round_trip(steps: int) -> None:
    dims = SIZES[0]
    layout = loop_layout(SPEC, dims, steps)
    coeff = coefficients(steps)
    inputs = inputs_for(dims, steps)
    schedule, noise = pack_schedule(layout, coeff), pack_noise(layout, inputs)
    s0, s1 = layout.schedule_bytes
    n0, n1 = layout.noise_bytes
    assert (schedule.dtype, schedule.size, noise.size) == (np.uint8, s1 - s0, n1 - n0)

    def row(buf: np.ndarray, base: int, region, i: int, shape) -> np.ndarray:  # noqa: ANN001
        start = region.at(i) - base
        return buf[start : start + region.row_bytes].view(np.float32).reshape(shape)

    for i in range(steps):
        assert row(schedule, s0, layout.timestep, i, (1,))[0] == np.float32(coeff.timesteps[i])
        np.testing.assert_array_equal(row(schedule, s0, layout.coefficients, i, (6,)), coeff.table()[i])
    shape = inputs.latents.shape
    np.testing.assert_array_equal(row(noise, n0, layout.noise, 0, shape), inputs.latents)
    for i in range(steps - 1):
        np.testing.assert_array_equal(row(noise, n0, layout.noise, i + 1, shape), inputs.step_noise[i])
    assert not row(noise, n0, layout.noise, steps, shape).any(), "the final step must inject zeros"
    # a schedule of another length does not fit this layout
    with pytest.raises(UsageError):
        pack_schedule(layout, coefficients(steps + 1))


def test_layout_refuses_other_graphs_and_empty_schedules() -> None:
    with pytest.raises(ModelError):
        loop_layout(unet_spec(9, 4, MAX_LENGTH, HIDDEN), SIZES[0], 2)
    with pytest.raises(UsageError):
        loop_layout(SPEC, SIZES[0], 0)


def _profile(dims_min: dict[str, int], dims_max: dict[str, int]):  # noqa: ANN202
    return profile_from_ranges(SPEC, {k: DimRange(dims_min[k], dims_min[k], dims_max[k]) for k in dims_min})


def test_graph_action_captures_once_per_key_and_replays_any_kept_slot() -> None:
    static = cuda_graph_eligibility(_profile(SIZES[0], SIZES[0]))
    dynamic = cuda_graph_eligibility(_profile(SIZES[0], {"B": 2, "h": 32, "w": 32}))
    assert static.eligible and not dynamic.eligible
    key = GraphKey.of(SIZES[0], (1024, 2048))
    other_batch = GraphKey.of({**SIZES[0], "B": 2}, (1024, 2048))
    assert graph_action(False, static, set(), key) == GRAPH_EAGER
    assert graph_action(True, dynamic, set(), key) == GRAPH_EAGER
    assert graph_action(True, dynamic, {key}, key) == GRAPH_EAGER
    assert graph_action(True, static, set(), key) == GRAPH_CAPTURE
    assert graph_action(True, static, {GraphKey.of(dict(SIZES[0]), [1024, 2048])}, key) == GRAPH_REPLAY
    assert graph_action(True, static, {other_batch, key}, key) == GRAPH_REPLAY, "guidance 1 and 2 each keep their slot"
    for changed in (GraphKey.of({**SIZES[0], "w": 32}, (1024, 2048)), other_batch, GraphKey.of(SIZES[0], (1024, 4096))):
        assert graph_action(True, static, {changed}, key) == GRAPH_CAPTURE
    assert graph_action(True, GraphEligibility(False, "why"), {key}, key) == GRAPH_EAGER


def test_modules_import_without_tensorrt_torch_or_cuda() -> None:
    code = (
        "import sys, trt_bgswap.runtime.trt_loop, trt_bgswap.runtime.denoise\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'tensorrt', 'cuda'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"importing the loop modules pulled in {proc.stdout.strip()}"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here; this checks the error without it")
def test_using_the_loop_without_tensorrt_says_how_to_install(tmp_path: Path) -> None:
    loop = TrtStepLoop(SPEC, tmp_path / "model.plan")
    assert "not loaded" in loop.backend
    with pytest.raises(BackendUnavailable, match=r"trt-bgswap\[trt-cu13\]"):
        loop.denoise_with(coefficients(2), inputs_for(SIZES[0], 2))


# --- on a GPU --------------------------------------------------------------------------------

GPU_DIMS = {"h": 16, "w": 24}  # the tiny UNet's latents at 192x128


@pytest.fixture(scope="module")
def step_onnx(trt_gpu: None, tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - (path, entry)
    from trt_bgswap.export.lora import lora_file
    from trt_bgswap.export.unet_step import export_unet_step

    out = tmp_path_factory.mktemp("trt-loop") / "unet_step"
    entry = export_unet_step(tiny_models_dir / "sd-inpainting", out, MAX_LENGTH, lora=lora_file(tiny_models_dir / "lcm-lora"))
    return out / "model.onnx", entry


@pytest.fixture(scope="module")
def plans(step_onnx, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: ANN001
    """fp32 (TF32 off) and fp16 plans with one static profile per guidance batch (1 and 2)."""
    from trt_bgswap.engines.trt_build import TrtBuildOptions, build_plan

    path, entry = step_onnx
    profiles = [profile_from_ranges(entry.spec, {k: DimRange.fixed(v) for k, v in {**GPU_DIMS, "B": b}.items()}) for b in (1, 2)]
    out = tmp_path_factory.mktemp("plans")
    built = {}
    for precision in ("fp32", "fp16"):
        built[precision] = out / f"unet_step-{precision}.plan"
        build_plan(path, built[precision], profiles, TrtBuildOptions(precision=precision, opt_level=1, tf32=False, timing_cache=False), None, "unet_step")
    return built


def reference(step_onnx, coeff, inputs: DenoiseInputs) -> np.ndarray:  # noqa: ANN001
    from trt_bgswap.runtime.ort_backend import OrtEngine
    from trt_bgswap.runtime.denoise import fused_denoise as denoise

    path, entry = step_onnx
    return denoise(OrtEngine(entry.spec, path, provider="cpu"), coeff, inputs)


def assert_close(got: np.ndarray, want: np.ndarray, step_onnx, coeff, inputs: DenoiseInputs, precision: str, noisy_dir: Path, label: str) -> None:  # noqa: ANN001
    """Within the ONNX Runtime loop's rounding noise: float32, or with any layer in float16 for an fp16 plan (:mod:`tolerance`)."""
    from trt_bgswap.runtime.denoise import fused_denoise as denoise

    def loop_noise() -> float:
        path, entry = step_onnx
        noisy = noisy_engine(entry.spec, path, noisy_dir / f"step-{precision}.onnx", float16=precision == "fp16")
        return network_tolerance(want, [denoise(noisy, coeff, inputs) for _ in range(NOISE_SAMPLES)])

    assert_within(float(np.max(np.abs(got - want))), loop_noise, f"{label}: device loop vs ONNX Runtime step loop")


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_device_loop_matches_onnxruntime_step_loop(step_onnx, plans, steps: int, guidance: float, precision: str, tmp_path: Path) -> None:  # noqa: ANN001
    _, entry = step_onnx
    dims = {**GPU_DIMS, "B": 2 if guidance > 1 else 1}
    inputs = inputs_for(dims, steps, seed=steps, guidance=guidance)
    coeff = coefficients(steps)
    loop = TrtStepLoop(entry.spec, plans[precision], use_cuda_graph=False)
    try:
        got = loop.denoise_with(coeff, inputs)
        assert loop.last_action == GRAPH_EAGER
    finally:
        loop.close()
    want = reference(step_onnx, coeff, inputs)
    assert_close(got, want, step_onnx, coeff, inputs, precision, tmp_path, f"{steps} steps, guidance {guidance}, {precision}")


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graph_replay_equals_eager_and_reuses_buffers(step_onnx, plans, precision: str, tmp_path: Path) -> None:  # noqa: ANN001
    """fp32 and the strongly typed fp16 plan (the fp16 graph with fp32 islands): a replayed step is the eager step, bit for bit."""
    _, entry = step_onnx
    eager = TrtStepLoop(entry.spec, plans[precision], use_cuda_graph=False)
    graphed = TrtStepLoop(entry.spec, plans[precision], use_cuda_graph=True)
    dims = {**GPU_DIMS, "B": 2}
    try:
        actions, blocks = [], []
        for steps, seed in ((4, 1), (4, 2), (4, 3), (2, 4), (2, 5)):  # new noise each time; then a shorter schedule
            inputs, coeff = inputs_for(dims, steps, seed=seed, guidance=2.0), coefficients(steps)
            want, got = eager.denoise_with(coeff, inputs), graphed.denoise_with(coeff, inputs)
            err = float(np.max(np.abs(got - want)))
            # exact: a replay launches the very kernels the eager run launched, on the same bytes
            assert err == 0.0, f"CUDA-graph loop ({graphed.last_action}, {precision}) differs from eager by {err:.3g} ({steps} steps, seed {seed})"
            actions.append(graphed.last_action)
            blocks.append(graphed._block.ptr if graphed._block is not None else None)
        # the graph is one step on fixed buffers: a shorter schedule replays it too
        assert actions == [GRAPH_CAPTURE, GRAPH_REPLAY, GRAPH_REPLAY, GRAPH_REPLAY, GRAPH_REPLAY]
        assert len(set(blocks)) == 1, f"the loop block was reallocated for a smaller schedule: {blocks}"
        # and the replayed result is the ONNX Runtime loop's
        assert_close(got, reference(step_onnx, coeff, inputs), step_onnx, coeff, inputs, precision, tmp_path, f"graph replay ({precision})")
    finally:
        eager.close()
        graphed.close()


@pytest.fixture(scope="module")
def vae_decoder_plan(trt_gpu: None, tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - (plan, spec)
    """The tiny VAE decoder as an fp32 plan at the loop's latent size (the VAE stays fp32 in fp16 builds)."""
    from trt_bgswap.engines.trt_build import TrtBuildOptions, build_plan
    from trt_bgswap.export.vae import export_vae

    out = tmp_path_factory.mktemp("vae")
    _, decoder = export_vae(tiny_models_dir / "sd-inpainting", out / "vae_encoder", out / "vae_decoder")
    profile = profile_from_ranges(decoder.spec, {s: DimRange.fixed({"B": 1, **GPU_DIMS}[s]) for s in decoder.spec.symbols() if s in ("B", "h", "w")})
    plan = out / "vae_decoder.plan"
    build_plan(out / "vae_decoder" / "model.onnx", plan, [profile], TrtBuildOptions(precision="fp32", opt_level=1, tf32=False, timing_cache=False), None, "vae_decoder")
    return plan, decoder.spec


@pytest.mark.gpu
@pytest.mark.trt
def test_alternating_guidance_on_shared_scratch_with_a_vae_call_between_replays(step_onnx, plans, vae_decoder_plan) -> None:  # noqa: ANN001
    """Guidance 1/2/1/2 on the fp16 plan, sharing scratch memory with the VAE decoder that runs between generations.

    The step graphs are captured at warm-up (Pipeline.load) and every generation replays one of
    them, bit-identical to an eager loop; the VAE's use of the shared block between replays does
    not disturb them (one stream orders everything).
    """
    from trt_bgswap.runtime.trt_backend import SharedActivations, TrtEngine

    _, entry = step_onnx
    plan, vae_spec = vae_decoder_plan
    shared = SharedActivations()
    vae = TrtEngine(vae_spec, plan, shared_activations=shared)
    loop = TrtStepLoop(entry.spec, plans["fp16"], use_cuda_graph=True, shared_activations=shared)
    eager = TrtStepLoop(entry.spec, plans["fp16"], use_cuda_graph=False)
    try:
        vae.load()  # the block is sized for both before the loop captures
        assert sorted(d["B"] for d in loop.warm_up()) == [1, 2]
        actions = []
        for seed, guidance in enumerate((1.0, 2.0, 1.0, 2.0)):
            dims = {**GPU_DIMS, "B": 2 if guidance > 1 else 1}
            inputs, coeff = inputs_for(dims, 4, seed=seed, guidance=guidance), coefficients(4)
            got, want = loop.denoise_with(coeff, inputs), eager.denoise_with(coeff, inputs)
            assert float(np.max(np.abs(got - want))) == 0.0, f"guidance {guidance}: replay differs from eager"
            image = vae(**{vae_spec.inputs[0].name: got})[vae_spec.outputs[0].name]
            assert np.isfinite(image).all()
            actions.append(loop.last_action)
        assert actions == [GRAPH_REPLAY] * 4, actions
    finally:
        loop.close()
        eager.close()
        vae.close()


# --- the loop's CUDA code on an emulated device, on CPU ----------------------------------------
#
# TrtStepLoop's own code (and the TrtEngine it drives) runs against the version-aware emulation
# of TensorRT and cuda-python in tests/emulation (installed by the `emulated` fixture, once per
# emulated TensorRT / cuda-bindings release): device memory in bounds-checked blocks,
# asynchronous streams, stream capture that records instead of running, graph launch, and a
# "plan" built through the emulated builder that ONNX Runtime executes on the bound addresses.
# The step graph is a small spec-shaped one: what is tested is the orchestration (bindings,
# uploads, capture/replay), not the model.

TOY = unet_step_spec(LATENT, 8, 16, len(COEFFICIENT_NAMES))


def toy_step_graph(path: Path) -> Path:
    """The fused step's arithmetic around a one-conv "UNet" whose output depends on every input and on B."""
    import onnx

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((LATENT, 2 * LATENT + 1, 3, 3)) * 0.2).astype(np.float32), "w")
    consts = [
        numpy_helper.from_array(np.array(v, dtype=np.int64), n)
        for n, v in (("s4", [1, 1, 1, 1]), ("c6", [len(COEFFICIENT_NAMES), 1, 1, 1]), ("ones6", [1] * 6), ("z", [0]), ("o", [1]), ("m1", [-1]), ("big", [2**62]), ("ax3", [3]))
    ]
    n = helper.make_node
    c = [f"c{i}" for i in range(6)]
    nodes = [
        n("Concat", ["latents", "mask", "masked_image_latents"], ["x"], axis=1),
        n("Conv", ["x", "w"], ["eps0"], pads=[1, 1, 1, 1]),
        n("ReduceMean", ["encoder_hidden_states"], ["e"], axes=[1, 2], keepdims=1),
        n("Unsqueeze", ["e", "ax3"], ["e4"]),
        n("Mul", ["e4", "timestep"], ["te"]),
        n("Add", ["eps0", "te"], ["eps"]),
        n("Slice", ["eps", "z", "o", "z"], ["uncond"]),
        n("Slice", ["eps", "m1", "big", "z"], ["cond"]),
        n("Reshape", ["guidance", "s4"], ["g"]),
        n("Sub", ["cond", "uncond"], ["d"]),
        n("Mul", ["g", "d"], ["gd"]),
        n("Add", ["uncond", "gd"], ["eps_g"]),
        n("Reshape", ["coefficients", "c6"], ["cr"]),
        n("Split", ["cr", "ones6"], c, axis=0),
        n("Mul", [c[3], "eps_g"], ["be"]),
        n("Sub", ["latents", "be"], ["num"]),
        n("Div", ["num", c[2]], ["x0"]),
        n("Mul", [c[1], "x0"], ["ox"]),
        n("Mul", [c[0], "latents"], ["sx"]),
        n("Add", ["ox", "sx"], ["denoised"]),
        n("Mul", [c[4], "denoised"], ["ad"]),
        n("Mul", [c[5], "noise"], ["bn"]),
        n("Add", ["ad", "bn"], ["prev_latents"]),
    ]
    vi = lambda t: helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.shape))  # noqa: E731
    graph = helper.make_graph(nodes, "unet_step", [vi(t) for t in TOY.inputs], [vi(t) for t in TOY.outputs], [w, *consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def toy_plan(emulated: Emulation, folder: Path, profiles: list) -> Path:
    """The toy step graph built by the emulated TensorRT into an (emulated) plan with ``profiles``."""
    onnx_path = folder / "unet_step.onnx"
    if not onnx_path.exists():
        toy_step_graph(onnx_path)
    return emulated.build_plan(onnx_path, folder / f"unet_step-{len(list(folder.glob('*.plan')))}.plan", profiles)


def static_profiles(batches: tuple[int, ...] = (1, 2), h: int = 3, w: int = 5) -> list:
    """One static profile per guidance batch at h x w latents."""
    return [profile_from_ranges(TOY, {"B": DimRange.fixed(b), "h": DimRange.fixed(h), "w": DimRange.fixed(w)}) for b in batches]


def toy_reference(folder: Path, coeff, inputs: DenoiseInputs) -> np.ndarray:  # noqa: ANN001
    from trt_bgswap.runtime.ort_backend import OrtEngine
    from trt_bgswap.runtime.denoise import fused_denoise as denoise

    return denoise(OrtEngine(TOY, folder / "unet_step.onnx", provider="cpu"), coeff, inputs)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_emulated_device_loop_equals_step_loop(emulated: Emulation, tmp_path: Path, steps: int, batch: int) -> None:
    plan = toy_plan(emulated, tmp_path, static_profiles())
    dims = {"B": batch, "h": 3, "w": 5}
    inputs = inputs_for_spec(TOY, dims, steps, seed=steps + 10 * batch)
    coeff = coefficients(steps)
    loop = TrtStepLoop(TOY, plan, use_cuda_graph=False)
    try:
        got = loop.denoise_with(coeff, inputs)
    finally:
        loop.close()
    want = toy_reference(tmp_path, coeff, inputs)
    err = float(np.max(np.abs(got - want)))
    assert err == 0.0, f"{steps} steps, B={batch}: emulated device loop differs from the step loop by {err:.3g}"
    assert float(np.max(np.abs(want - inputs.latents))) > 1e-2  # the steps did move the latents
    counts = emulated.counts
    assert counts["execute"] == steps
    assert counts["DtoH"] == 1, "only the final latents may come back to the host"
    assert counts["HtoD"] == 1 + 1 + 4, "one schedule upload, one noise upload, four conditioning inputs"
    assert counts["DtoD"] == 4 * steps, "per step: latents, noise, timestep and coefficients copied into the fixed inputs"
    assert not emulated.leaks(), f"left behind after close: {emulated.leaks()}"


# The loop follows NVIDIA's documented pattern (one enqueue per graph on fixed addresses); the emulation
# refuses anything else (several enqueues of one context in one capture raise UndocumentedBehaviour), so
# every test below runs under the default, strict emulation.


def test_emulated_loop_capture_uses_only_documented_graph_patterns(emulated: Emulation, tmp_path: Path) -> None:
    plan = toy_plan(emulated, tmp_path, static_profiles())
    loop = TrtStepLoop(TOY, plan, use_cuda_graph=True)
    try:
        inputs, coeff = inputs_for_spec(TOY, {"B": 1, "h": 3, "w": 5}, 2, seed=1), coefficients(2)
        loop.denoise_with(coeff, inputs)
        assert loop.last_action == GRAPH_CAPTURE
    finally:
        loop.close()


def test_emulated_cuda_graph_replay_equals_eager_with_one_upload_per_schedule(emulated: Emulation, tmp_path: Path) -> None:
    plan = toy_plan(emulated, tmp_path, static_profiles())
    dims = {"B": 2, "h": 3, "w": 5}
    loop = TrtStepLoop(TOY, plan, use_cuda_graph=True)
    counts = emulated.counts
    try:
        log = []
        for steps, seed in ((4, 1), (4, 2), (4, 3), (2, 4), (2, 5), (4, 6)):
            before = dict(counts)
            inputs, coeff = inputs_for_spec(TOY, dims, steps, seed=seed), coefficients(steps)
            got = loop.denoise_with(coeff, inputs)
            err = float(np.max(np.abs(got - toy_reference(tmp_path, coeff, inputs))))
            assert err == 0.0, f"{loop.last_action} ({steps} steps, seed {seed}) differs from the step loop by {err:.3g}"
            delta = {k: counts[k] - before.get(k, 0) for k in counts}
            log.append((loop.last_action, delta["execute"], delta["HtoD"], delta["malloc"]))
        # the first run captures step 0 after its eager warm-up (recording runs nothing) and replays the rest;
        # the graph is one step, so another step count replays it too; the schedule is uploaded only when it
        # changes; the block allocated first serves the shorter schedule
        assert log == [
            (GRAPH_CAPTURE, 4, 6, log[0][3]),
            (GRAPH_REPLAY, 4, 5, 0),
            (GRAPH_REPLAY, 4, 5, 0),
            (GRAPH_REPLAY, 2, 6, 0),
            (GRAPH_REPLAY, 2, 5, 0),
            (GRAPH_REPLAY, 4, 6, 0),
        ], log
        assert emulated.counts["captures"] == 1
    finally:
        loop.close()
    assert not emulated.leaks(), f"left behind after close: {emulated.leaks()}"


def test_emulated_dynamic_profile_runs_eagerly(emulated: Emulation, tmp_path: Path) -> None:
    plan = toy_plan(emulated, tmp_path, [profile_from_ranges(TOY, {"B": DimRange(1, 1, 2), "h": DimRange(3, 3, 4), "w": DimRange(5, 5, 6)})])
    loop = TrtStepLoop(TOY, plan, use_cuda_graph=True)
    try:
        for dims in ({"B": 1, "h": 3, "w": 5}, {"B": 2, "h": 4, "w": 6}):
            inputs, coeff = inputs_for_spec(TOY, dims, 2, seed=dims["h"]), coefficients(2)
            got = loop.denoise_with(coeff, inputs)
            assert loop.last_action == GRAPH_EAGER
            assert float(np.max(np.abs(got - toy_reference(tmp_path, coeff, inputs)))) == 0.0
    finally:
        loop.close()
    assert emulated.counts["captures"] == 0


def test_emulated_shared_activation_growth_forces_a_recapture(emulated: Emulation, tmp_path: Path) -> None:
    """Another engine enlarging the shared scratch block moves it: the captured loop must not replay stale pointers."""
    from trt_bgswap.runtime.trt_backend import SharedActivations, TrtEngine

    plan = toy_plan(emulated, tmp_path, static_profiles())
    # the same graph for latents up to 6x10: more activation memory than the loop's 3x5 plan needs
    bigger = toy_plan(emulated, tmp_path, [profile_from_ranges(TOY, {"B": DimRange(1, 1, 2), "h": DimRange(3, 3, 6), "w": DimRange(5, 5, 10)})])
    need = [emulated.read_plan(p)["activation_bytes"][0] for p in (plan, bigger)]
    assert 0 < need[0] < need[1], need
    shared = SharedActivations()
    loop = TrtStepLoop(TOY, plan, use_cuda_graph=True, shared_activations=shared)
    other = TrtEngine(TOY, bigger, shared_activations=shared)
    dims = {"B": 1, "h": 3, "w": 5}
    try:
        actions = []
        for seed in range(4):
            if seed == 2:
                other.load()  # grows the shared block
            inputs, coeff = inputs_for_spec(TOY, dims, 3, seed=seed), coefficients(3)
            got = loop.denoise_with(coeff, inputs)
            assert float(np.max(np.abs(got - toy_reference(tmp_path, coeff, inputs)))) == 0.0
            actions.append(loop.last_action)
        assert shared.nbytes == need[1]
        assert actions == [GRAPH_CAPTURE, GRAPH_REPLAY, GRAPH_CAPTURE, GRAPH_REPLAY]
    finally:
        loop.close()
        other.close()
    assert not emulated.leaks(), f"left behind after close: {emulated.leaks()}"


def test_emulated_alternating_guidance_replays_both_graphs(tmp_path: Path) -> None:
    from emulation import STACKS

    with emulate(STACKS[-1]) as emulated:  # not version-specific: one release is enough
        loop = TrtStepLoop(TOY, toy_plan(emulated, tmp_path, static_profiles()), use_cuda_graph=True)
        try:
            actions = []
            for seed, batch in enumerate((1, 2, 1, 2)):
                inputs = inputs_for_spec(TOY, {"B": batch, "h": 3, "w": 5}, 2, seed=seed, guidance=1.0 if batch == 1 else 2.0)
                loop.denoise_with(coefficients(2), inputs)
                actions.append(loop.last_action)
        finally:
            loop.close()
    assert actions == [GRAPH_CAPTURE, GRAPH_CAPTURE, GRAPH_REPLAY, GRAPH_REPLAY], actions


def test_emulated_warm_up_captures_every_static_profile_before_the_first_request(tmp_path: Path) -> None:
    """Pipeline.load calls warm_up: the first request (guidance 1 or 2) replays, it neither deserializes nor captures."""
    from emulation import STACKS

    with emulate(STACKS[0]) as emulated:
        loop = TrtStepLoop(TOY, toy_plan(emulated, tmp_path, static_profiles()), use_cuda_graph=True)
        try:
            captured = loop.warm_up()
            assert sorted(d["B"] for d in captured) == [1, 2] and emulated.counts["captures"] == 2, captured
            assert loop.warm_up() == [], "a second warm-up finds every slot captured"
            for seed, batch in enumerate((2, 1)):
                inputs, coeff = inputs_for_spec(TOY, {"B": batch, "h": 3, "w": 5}, 3, seed=seed, guidance=2.0 if batch == 2 else 1.0), coefficients(3)
                got = loop.denoise_with(coeff, inputs)
                assert loop.last_action == GRAPH_REPLAY, (batch, loop.last_action)
                assert float(np.max(np.abs(got - toy_reference(tmp_path, coeff, inputs)))) == 0.0
            assert emulated.counts["captures"] == 2
        finally:
            loop.close()
        assert not emulated.leaks(), emulated.leaks()
