"""The device-resident denoising loop (runtime/trt_loop.py): its plan on CPU, its execution on a GPU.

CPU tests check every decision the CUDA code executes: the block layout (sizes from the
step graph's spec, 256-byte aligned rows, no overlap), the per-step bindings
(ping-pong without aliasing, the right schedule and noise rows), the packed uploads,
and when a CUDA graph is captured, replayed or not used. (The plan run end to end on
a host buffer is in tests/test_unet_step.py, next to the fused graph it needs.)

GPU tests build a TensorRT plan of the fused tiny UNet-step graph and compare the
device loop with the ONNX Runtime step loop, CUDA-graph replay with eager execution,
and check buffer reuse. They need ``tensorrt``, ``cuda-python`` and an NVIDIA GPU and
are skipped with the reason otherwise (``pytest -ra`` lists them as SKIPPED); they run
unchanged on a GPU machine: ``pip install 'trt-bgswap[trt]' --extra-index-url
https://pypi.nvidia.com`` then ``pytest tests/test_trt_loop_gpu.py``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
from trt_bgswap.specs import unet_spec, unet_step_spec

LATENT, MAX_LENGTH, HIDDEN = 4, 77, 32
SPEC = unet_step_spec(LATENT, MAX_LENGTH, HIDDEN, len(COEFFICIENT_NAMES))
SIZES = [{"B": 1, "h": 16, "w": 24}, {"B": 2, "h": 64, "w": 64}, {"B": 1, "h": 3, "w": 5}]


def coefficients(steps: int):  # noqa: ANN201 - LCMCoefficients
    sched = LCMScheduler()
    sched.set_timesteps(steps)
    assert sched.coefficients is not None
    return sched.coefficients


def inputs_for(dims: dict[str, int], steps: int, seed: int = 0, guidance: float = 1.5) -> DenoiseInputs:
    rng = np.random.default_rng(seed)
    draw = lambda name: rng.standard_normal(SPEC.tensor(name).resolve(dims)).astype(np.float32)  # noqa: E731
    return DenoiseInputs(
        latents=draw("latents"),
        step_noise=tuple(draw("noise") for _ in range(steps - 1)),
        mask=(draw("mask") > 0).astype(np.float32),
        masked_image_latents=draw("masked_image_latents"),
        embeddings=draw("encoder_hidden_states"),
        guidance=guidance,
    )


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
TOL = {"fp32": 1e-4, "fp16": 2e-2}  # max abs error relative to the reference's max magnitude


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


def assert_close(got: np.ndarray, want: np.ndarray, tol: float, label: str) -> None:
    err = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want))) or 1.0
    assert err <= tol * scale, f"{label}: device loop vs ONNX Runtime step loop max abs err {err:.3g} (scale {scale:.3g}, tol {tol} x scale)"


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_device_loop_matches_onnxruntime_step_loop(step_onnx, plans, steps: int, guidance: float, precision: str) -> None:  # noqa: ANN001
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
    assert_close(got, reference(step_onnx, coeff, inputs), TOL[precision], f"{steps} steps, guidance {guidance}, {precision}")


@pytest.mark.gpu
@pytest.mark.trt
def test_cuda_graph_replay_equals_eager_and_reuses_buffers(step_onnx, plans) -> None:  # noqa: ANN001
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
            assert err == 0.0, f"CUDA-graph loop ({graphed.last_action}) differs from eager by {err:.3g} ({steps} steps, seed {seed})"
            actions.append(graphed.last_action)
            blocks.append(graphed._block.ptr if graphed._block is not None else None)
        assert actions == [GRAPH_CAPTURE, GRAPH_REPLAY, GRAPH_REPLAY, GRAPH_CAPTURE, GRAPH_REPLAY]
        assert len(set(blocks)) == 1, f"the loop block was reallocated for a smaller schedule: {blocks}"
        # and the replayed result is the ONNX Runtime loop's
        assert_close(got, reference(step_onnx, coeff, inputs), TOL["fp32"], "graph replay")
    finally:
        eager.close()
        graphed.close()
