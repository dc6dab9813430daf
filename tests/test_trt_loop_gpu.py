"""The device-resident denoising loop (runtime/trt_loop.py): its plan on CPU, its execution on a GPU.

CPU tests check every decision the CUDA code executes: the block layout (sizes from the
step graph's spec, 256-byte aligned rows, no overlap), the per-step bindings
(ping-pong without aliasing, the right schedule and noise rows), the packed uploads,
and when a CUDA graph is captured, replayed or not used. (The plan run end to end on
a host buffer is in tests/test_unet_step.py, next to the fused graph it needs.)

The loop's CUDA-touching code itself (TrtStepLoop and the TrtEngine it drives) also
runs on CPU against an emulation of cuda-python and TensorRT (memory, stream capture
that records instead of running, graph launch, ONNX Runtime as the "engine"): results
equal the step loop exactly, only the final latents come back, the schedule is
uploaded once per schedule, capture/replay happen when planned.

GPU tests build a TensorRT plan of the fused tiny UNet-step graph and compare the
device loop with the ONNX Runtime step loop, CUDA-graph replay with eager execution,
and check buffer reuse. They need ``tensorrt``, ``cuda-python`` and an NVIDIA GPU and
are skipped with the reason otherwise (``pytest -ra`` lists them as SKIPPED); they run
unchanged on a GPU machine: ``pip install 'trt-bgswap[trt]' --extra-index-url
https://pypi.nvidia.com`` then ``pytest tests/test_trt_loop_gpu.py``.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.util
import itertools
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from tolerance import NOISE_SAMPLES, assert_within, network_tolerance, noisy_engine

from trt_bgswap.engines.buffers import DEVICE_ALIGNMENT, GraphEligibility, cuda_graph_eligibility
from trt_bgswap.engines.profiles import DimRange, profile_from_ranges
from trt_bgswap.errors import BackendUnavailable, ModelError, UsageError
from trt_bgswap.runtime.scheduler import COEFFICIENT_NAMES, LCMScheduler
from trt_bgswap.runtime.step_loop import DenoiseInputs
from trt_bgswap.runtime.trt_loop import (
    GRAPH_CAPTURE,
    GRAPH_EAGER,
    GRAPH_REPLAY,
    LOOP_TENSORS,
    GraphKey,
    TrtStepLoop,
    final_latents_offset,
    graph_action,
    loop_layout,
    pack_noise,
    pack_schedule,
    step_bindings,
)
from trt_bgswap.specs import ModelSpec, unet_spec, unet_step_spec

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
    expected_rows = {"timestep": (4, steps), "coefficients": (4 * len(COEFFICIENT_NAMES), steps), "noise": (sample, steps + 1), "latents": (sample, 2), "denoised": (sample, 1)}
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
def test_bindings_ping_pong_without_aliasing(steps: int) -> None:
    layout = loop_layout(SPEC, SIZES[0], steps)
    written_by_previous = None
    for i in range(steps):
        b = step_bindings(layout, i)
        assert set(b) == set(LOOP_TENSORS)
        assert all(off % DEVICE_ALIGNMENT == 0 for off in b.values())
        assert b["latents"] == (layout.noise.at(0) if i == 0 else written_by_previous), f"step {i} does not read what step {i - 1} wrote"
        assert b["prev_latents"] != b["latents"], f"step {i} writes the buffer it reads"
        assert b["prev_latents"] in (layout.latents.at(0), layout.latents.at(1))
        assert b["noise"] == layout.noise.at(i + 1)
        assert (b["timestep"], b["coefficients"]) == (layout.timestep.at(i), layout.coefficients.at(i))
        written_by_previous = b["prev_latents"]
    assert final_latents_offset(layout) == written_by_previous
    with pytest.raises(IndexError):
        step_bindings(layout, steps)


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


def test_graph_action_captures_once_replays_and_recaptures_on_any_change() -> None:
    static = cuda_graph_eligibility(_profile(SIZES[0], SIZES[0]))
    dynamic = cuda_graph_eligibility(_profile(SIZES[0], {"B": 2, "h": 32, "w": 32}))
    assert static.eligible and not dynamic.eligible
    key = GraphKey.of(SIZES[0], 4, (1024, 2048))
    assert graph_action(False, static, None, key) == GRAPH_EAGER
    assert graph_action(True, dynamic, None, key) == GRAPH_EAGER
    assert graph_action(True, dynamic, key, key) == GRAPH_EAGER
    assert graph_action(True, static, None, key) == GRAPH_CAPTURE
    assert graph_action(True, static, GraphKey.of(dict(SIZES[0]), 4, [1024, 2048]), key) == GRAPH_REPLAY
    for changed in (
        GraphKey.of({**SIZES[0], "w": 32}, 4, (1024, 2048)),
        GraphKey.of(SIZES[0], 3, (1024, 2048)),
        GraphKey.of(SIZES[0], 4, (1024, 4096)),
    ):
        assert graph_action(True, static, changed, key) == GRAPH_CAPTURE
    assert graph_action(True, GraphEligibility(False, "why"), key, key) == GRAPH_EAGER


def test_modules_import_without_tensorrt_torch_or_cuda() -> None:
    code = (
        "import sys, trt_bgswap.runtime.trt_loop, trt_bgswap.runtime.step_loop\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'tensorrt', 'cuda'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"importing the loop modules pulled in {proc.stdout.strip()}"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here; this checks the error without it")
def test_using_the_loop_without_tensorrt_says_how_to_install(tmp_path: Path) -> None:
    loop = TrtStepLoop(SPEC, tmp_path / "model.plan")
    assert "not loaded" in loop.backend
    with pytest.raises(BackendUnavailable, match=r"trt-bgswap\[trt\]"):
        loop.denoise(coefficients(2), inputs_for(SIZES[0], 2))


# --- on a GPU --------------------------------------------------------------------------------

GPU_DIMS = {"h": 16, "w": 24}  # the tiny UNet's latents at 192x128


@pytest.fixture(scope="module")
def trt_gpu() -> None:
    """Skip (with the reason) unless tensorrt, cuda-python and a CUDA device are all present."""
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("needs TensorRT: the tensorrt package is not installed (pip install 'trt-bgswap[trt]' on a GPU machine)")
    if importlib.util.find_spec("cuda") is None:
        pytest.skip("needs cuda-python (pip install 'trt-bgswap[trt]')")
    from trt_bgswap.runtime.cuda_device import device_count_via_driver

    if device_count_via_driver() < 1:
        pytest.skip("needs an NVIDIA GPU: no CUDA device visible to the driver")


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
    from trt_bgswap.runtime.step_loop import denoise

    path, entry = step_onnx
    return denoise(OrtEngine(entry.spec, path, provider="cpu"), coeff, inputs)


def assert_close(got: np.ndarray, want: np.ndarray, step_onnx, coeff, inputs: DenoiseInputs, precision: str, noisy_dir: Path, label: str) -> None:  # noqa: ANN001
    """Within the ONNX Runtime loop's rounding noise: float32, or with any layer in float16 for an fp16 plan (:mod:`tolerance`)."""
    from trt_bgswap.runtime.step_loop import denoise

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
        got = loop.denoise(coeff, inputs)
        assert loop.last_action == GRAPH_EAGER
    finally:
        loop.close()
    want = reference(step_onnx, coeff, inputs)
    assert_close(got, want, step_onnx, coeff, inputs, precision, tmp_path, f"{steps} steps, guidance {guidance}, {precision}")


@pytest.mark.gpu
@pytest.mark.trt
def test_cuda_graph_replay_equals_eager_and_reuses_buffers(step_onnx, plans, tmp_path: Path) -> None:  # noqa: ANN001
    _, entry = step_onnx
    eager = TrtStepLoop(entry.spec, plans["fp32"], use_cuda_graph=False)
    graphed = TrtStepLoop(entry.spec, plans["fp32"], use_cuda_graph=True)
    dims = {**GPU_DIMS, "B": 2}
    try:
        actions, blocks = [], []
        for steps, seed in ((4, 1), (4, 2), (4, 3), (2, 4), (2, 5)):  # new noise each time; then a shorter schedule
            inputs, coeff = inputs_for(dims, steps, seed=seed, guidance=2.0), coefficients(steps)
            want, got = eager.denoise(coeff, inputs), graphed.denoise(coeff, inputs)
            err = float(np.max(np.abs(got - want)))
            # exact: a replay launches the very kernels the eager run launched, on the same bytes
            assert err == 0.0, f"CUDA-graph loop ({graphed.last_action}) differs from eager by {err:.3g} ({steps} steps, seed {seed})"
            actions.append(graphed.last_action)
            blocks.append(graphed._block.ptr if graphed._block is not None else None)
        assert actions == [GRAPH_CAPTURE, GRAPH_REPLAY, GRAPH_REPLAY, GRAPH_CAPTURE, GRAPH_REPLAY]
        assert len(set(blocks)) == 1, f"the loop block was reallocated for a smaller schedule: {blocks}"
        # and the replayed result is the ONNX Runtime loop's
        assert_close(got, reference(step_onnx, coeff, inputs), step_onnx, coeff, inputs, "fp32", tmp_path, "graph replay")
    finally:
        eager.close()
        graphed.close()


# --- the loop's CUDA code on an emulated device, on CPU ----------------------------------------
#
# TrtStepLoop's own code (and the TrtEngine it drives) runs against a stand-in for the
# two libraries it calls: cuda-python's runtime (device memory = bounds-checked host
# blocks, copies executed in stream order, stream capture *records* work instead of
# running it, graph launch replays the record) and TensorRT (a "plan" names an ONNX graph
# that ONNX Runtime executes on the bound addresses; set_tensor_address refuses
# unaligned pointers and execution refuses inputs aliasing outputs, as TensorRT
# documents). The step graph is a small spec-shaped one: what is tested is the
# orchestration (bindings, uploads, capture/replay), not the model.

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


class EmulatedCudart:
    """The cuda-python runtime calls cuda_device.py makes, on host memory."""

    class cudaError_t:  # noqa: N801 - cuda-python's names
        cudaSuccess = 0
        cudaErrorInvalidValue = 1

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = 1, 2, 3

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeGlobal = 0

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[np.ndarray, int]] = {}  # address -> (backing array, size asked for)
        self.capturing: dict[int, list] = {}
        self.counts = {"HtoD": 0, "DtoH": 0, "DtoD": 0, "execute": 0, "malloc": 0}
        self._ids = itertools.count(1)

    def device(self, addr: int, nbytes: int) -> np.ndarray:
        """A writable view of emulated device memory; out-of-bounds access fails like a bad pointer would."""
        for base, (_, size) in self.blocks.items():
            if base <= addr and addr + nbytes <= base + size:
                return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(addr), dtype=np.uint8)
        raise AssertionError(f"device access [{addr:#x}, +{nbytes}) is outside every allocation")

    def enqueue(self, stream: int, op) -> None:  # noqa: ANN001
        if stream in self.capturing:
            self.capturing[stream].append(op)
        else:
            op()

    def cudaGetErrorName(self, err: int):  # noqa: ANN201, N802
        return 0, b"cudaErrorEmulated"

    def cudaGetErrorString(self, err: int):  # noqa: ANN201, N802
        return 0, b"emulated failure"

    def cudaMalloc(self, nbytes: int):  # noqa: ANN201, N802
        arr = np.zeros(nbytes + 256, dtype=np.uint8)
        addr = -(-arr.ctypes.data // 256) * 256  # cudaMalloc's alignment
        self.blocks[addr] = (arr, nbytes)
        self.counts["malloc"] += 1
        return 0, addr

    def cudaFree(self, addr: int):  # noqa: ANN201, N802
        del self.blocks[addr]
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: int):  # noqa: ANN201, N802
        name = {1: "HtoD", 2: "DtoH", 3: "DtoD"}[kind]
        if kind in (1, 3):
            self.device(dst, nbytes)
        if kind in (2, 3):
            self.device(src, nbytes)

        def op() -> None:
            self.counts[name] += 1
            ctypes.memmove(dst, src, nbytes)

        self.enqueue(stream, op)
        return (0,)

    def cudaStreamCreate(self):  # noqa: ANN201, N802
        return 0, next(self._ids)

    def cudaStreamSynchronize(self, stream: int):  # noqa: ANN201, N802
        return (0,)

    def cudaStreamDestroy(self, stream: int):  # noqa: ANN201, N802
        return (0,)

    def cudaStreamBeginCapture(self, stream: int, mode: int):  # noqa: ANN201, N802
        self.capturing[stream] = []
        return (0,)

    def cudaStreamEndCapture(self, stream: int):  # noqa: ANN201, N802
        return 0, self.capturing.pop(stream)

    def cudaGraphInstantiate(self, graph: list, flags: int):  # noqa: ANN201, N802
        return 0, list(graph)

    def cudaGraphLaunch(self, graph_exec: list, stream: int):  # noqa: ANN201, N802
        for op in graph_exec:
            self.enqueue(stream, op)
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec: list):  # noqa: ANN201, N802
        return (0,)

    def cudaGraphDestroy(self, graph: list):  # noqa: ANN201, N802
        return (0,)


def emulated_tensorrt(cuda: EmulatedCudart) -> types.ModuleType:
    """The TensorRT 10 Python API subset trt_backend.py uses; a plan is JSON naming an ONNX graph and its profiles."""
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.0.0"

    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class Context:
        def __init__(self, engine: "Engine") -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_optimization_profile_async(self, index: int, stream: int) -> bool:
            return 0 <= index < len(self.engine.profiles)

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            spec = self.engine.spec
            dims = {s: v for t in spec.inputs for s, v in zip(t.shape, self.shapes[t.name]) if isinstance(s, str)}
            return spec.tensor(name).resolve(dims)

        def set_device_memory(self, ptr: int, nbytes: int) -> None:
            cuda.device(ptr, nbytes)  # must be a live allocation of that size
            self.scratch = ptr

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            if ptr % 256:
                return False
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream: int) -> bool:
            spec, addresses = self.engine.spec, dict(self.addresses)  # a graph bakes in today's pointers
            shapes = {t.name: self.get_tensor_shape(t.name) for t in (*spec.inputs, *spec.outputs)}
            spans = {n: (addresses[n], addresses[n] + spec.tensor(n).nbytes(self._dims(shapes))) for n in shapes}

            def op() -> None:
                for i in spec.input_names:
                    for o in spec.output_names:
                        assert spans[i][1] <= spans[o][0] or spans[o][1] <= spans[i][0], f"input {i} aliases output {o}"
                feeds = {
                    t.name: cuda.device(addresses[t.name], spans[t.name][1] - spans[t.name][0]).view(t.np_dtype).reshape(shapes[t.name]).copy()
                    for t in spec.inputs
                }
                for name, value in zip(spec.output_names, self.engine.session.run(spec.output_names, feeds)):
                    cuda.device(addresses[name], value.nbytes)[:] = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
                cuda.counts["execute"] += 1

            cuda.enqueue(stream, op)
            return True

        def _dims(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
            return {s: v for t in self.engine.spec.inputs for s, v in zip(t.shape, shapes[t.name]) if isinstance(s, str)}

    class Engine:
        def __init__(self, plan: dict) -> None:
            self.spec = ModelSpec.from_json(plan["spec"])
            self.profiles = plan["profiles"]
            self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
            self.names = self.spec.input_names + self.spec.output_names
            self.num_io_tensors = len(self.names)
            self.num_optimization_profiles = len(self.profiles)
            self.device_memory_size_v2 = plan.get("scratch", 1024)  # activation bytes the context needs

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return TensorIOMode.INPUT if name in self.spec.input_names else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> np.dtype:
            return self.spec.tensor(name).np_dtype

        def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
            t = next(t for t in self.profiles[index] if t["name"] == name)
            return [tuple(t["min"]), tuple(t["opt"]), tuple(t["max"])]

        def create_execution_context(self, strategy: str | None = None) -> Context:
            return Context(self)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> Engine:
            return Engine(json.loads(data))

    trt.TensorIOMode, trt.Logger, trt.Runtime = TensorIOMode, Logger, Runtime
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="user_managed")
    trt.nptype = np.dtype
    return trt


@pytest.fixture()
def emulated_device(monkeypatch: pytest.MonkeyPatch) -> EmulatedCudart:
    from trt_bgswap.runtime import cuda_device

    cuda = EmulatedCudart()
    monkeypatch.setattr(cuda_device, "_cudart_module", cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", emulated_tensorrt(cuda))
    return cuda


@pytest.fixture(scope="module")
def toy_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An emulated "plan": the toy step graph with one static profile per guidance batch at 3x5 latents."""
    folder = tmp_path_factory.mktemp("emulated")
    onnx_path = toy_step_graph(folder / "unet_step.onnx")
    profiles = [profile_from_ranges(TOY, {"B": DimRange.fixed(b), "h": DimRange.fixed(3), "w": DimRange.fixed(5)}) for b in (1, 2)]
    plan = folder / "unet_step.plan"
    plan.write_text(json.dumps({"onnx": str(onnx_path), "spec": TOY.to_json(), "profiles": [p.to_json() for p in profiles]}))
    return plan


def toy_reference(plan: Path, coeff, inputs: DenoiseInputs) -> np.ndarray:  # noqa: ANN001
    from trt_bgswap.runtime.ort_backend import OrtEngine
    from trt_bgswap.runtime.step_loop import denoise

    return denoise(OrtEngine(TOY, Path(json.loads(plan.read_text())["onnx"]), provider="cpu"), coeff, inputs)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_emulated_device_loop_equals_step_loop(emulated_device: EmulatedCudart, toy_plan: Path, steps: int, batch: int) -> None:
    dims = {"B": batch, "h": 3, "w": 5}
    inputs = inputs_for_spec(TOY, dims, steps, seed=steps + 10 * batch)
    coeff = coefficients(steps)
    loop = TrtStepLoop(TOY, toy_plan, use_cuda_graph=False)
    try:
        got = loop.denoise(coeff, inputs)
    finally:
        loop.close()
    want = toy_reference(toy_plan, coeff, inputs)
    err = float(np.max(np.abs(got - want)))
    assert err == 0.0, f"{steps} steps, B={batch}: emulated device loop differs from the step loop by {err:.3g}"
    assert float(np.max(np.abs(want - inputs.latents))) > 1e-2  # the steps did move the latents
    counts = emulated_device.counts
    assert counts["execute"] == steps
    assert counts["DtoH"] == 1, "only the final latents may come back to the host"
    assert counts["HtoD"] == 1 + 1 + 4, "one schedule upload, one noise upload, four conditioning inputs"
    assert counts["DtoD"] == 0 and not emulated_device.blocks, "everything is freed on close"


def test_emulated_cuda_graph_replay_equals_eager_with_one_upload_per_schedule(emulated_device: EmulatedCudart, toy_plan: Path) -> None:
    dims = {"B": 2, "h": 3, "w": 5}
    loop = TrtStepLoop(TOY, toy_plan, use_cuda_graph=True)
    counts = emulated_device.counts
    try:
        log = []
        for steps, seed in ((4, 1), (4, 2), (4, 3), (2, 4), (2, 5), (4, 6)):
            before = dict(counts)
            inputs, coeff = inputs_for_spec(TOY, dims, steps, seed=seed), coefficients(steps)
            got = loop.denoise(coeff, inputs)
            err = float(np.max(np.abs(got - toy_reference(toy_plan, coeff, inputs))))
            assert err == 0.0, f"{loop.last_action} ({steps} steps, seed {seed}) differs from the step loop by {err:.3g}"
            delta = {k: counts[k] - before[k] for k in counts}
            log.append((loop.last_action, delta["execute"], delta["HtoD"], delta["malloc"]))
        # capture runs the steps once eagerly (TensorRT's warm-up) and records them without running them again;
        # the schedule is uploaded only when it changes; the block allocated first serves the shorter schedule
        assert log == [
            (GRAPH_CAPTURE, 4, 6, log[0][3]),
            (GRAPH_REPLAY, 4, 5, 0),
            (GRAPH_REPLAY, 4, 5, 0),
            (GRAPH_CAPTURE, 2, 6, 0),
            (GRAPH_REPLAY, 2, 5, 0),
            (GRAPH_CAPTURE, 4, 6, 0),
        ], log
    finally:
        loop.close()


def test_emulated_dynamic_profile_runs_eagerly(emulated_device: EmulatedCudart, tmp_path: Path, toy_plan: Path) -> None:
    plan = json.loads(toy_plan.read_text())
    plan["profiles"] = [profile_from_ranges(TOY, {"B": DimRange(1, 1, 2), "h": DimRange(3, 3, 4), "w": DimRange(5, 5, 6)}).to_json()]
    dynamic = tmp_path / "dynamic.plan"
    dynamic.write_text(json.dumps(plan))
    loop = TrtStepLoop(TOY, dynamic, use_cuda_graph=True)
    try:
        for dims in ({"B": 1, "h": 3, "w": 5}, {"B": 2, "h": 4, "w": 6}):
            inputs, coeff = inputs_for_spec(TOY, dims, 2, seed=dims["h"]), coefficients(2)
            got = loop.denoise(coeff, inputs)
            assert loop.last_action == GRAPH_EAGER
            assert float(np.max(np.abs(got - toy_reference(dynamic, coeff, inputs)))) == 0.0
    finally:
        loop.close()


def test_emulated_shared_activation_growth_forces_a_recapture(emulated_device: EmulatedCudart, toy_plan: Path, tmp_path: Path) -> None:
    """Another engine enlarging the shared scratch block moves it: the captured loop must not replay stale pointers."""
    from trt_bgswap.runtime.trt_backend import SharedActivations, TrtEngine

    bigger = json.loads(toy_plan.read_text())
    bigger["scratch"] = 1 << 20
    other_plan = tmp_path / "other.plan"
    other_plan.write_text(json.dumps(bigger))
    shared = SharedActivations()
    loop = TrtStepLoop(TOY, toy_plan, use_cuda_graph=True, shared_activations=shared)
    other = TrtEngine(TOY, other_plan, shared_activations=shared)
    dims = {"B": 1, "h": 3, "w": 5}
    try:
        actions = []
        for seed in range(4):
            if seed == 2:
                other.load()  # grows the shared block
            inputs, coeff = inputs_for_spec(TOY, dims, 3, seed=seed), coefficients(3)
            got = loop.denoise(coeff, inputs)
            assert float(np.max(np.abs(got - toy_reference(toy_plan, coeff, inputs)))) == 0.0
            actions.append(loop.last_action)
        assert shared.nbytes == 1 << 20
        assert actions == [GRAPH_CAPTURE, GRAPH_REPLAY, GRAPH_CAPTURE, GRAPH_REPLAY]
    finally:
        loop.close()
        other.close()
