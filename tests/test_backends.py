"""Backend choice (pure decision over injected facts) and the TensorRT layer's behaviour without TensorRT."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
from engine_graphs import mini_specs, write_mini_export

from trt_bgswap.engines.trt_build import BuildProgress, TrtBuildOptions
from trt_bgswap.errors import BackendUnavailable, UsageError
from trt_bgswap.runtime.backends import Availability, BackendChoice, choose_backend

CPU_ORT = ("CPUExecutionProvider",)
GPU_ORT = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
CUDA_ORT = ("CUDAExecutionProvider", "CPUExecutionProvider")

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA_PYTHON = importlib.util.find_spec("cuda") is not None


@pytest.mark.parametrize(
    "facts, want",
    [
        (Availability(1, True, GPU_ORT), ("trt", "trt", None)),
        (Availability(1, True, CPU_ORT), ("trt", "trt", None)),
        (Availability(1, False, GPU_ORT), ("ort-cuda", "ort", "cuda")),
        (Availability(1, False, CUDA_ORT), ("ort-cuda", "ort", "cuda")),
        (Availability(0, True, GPU_ORT), ("cpu", "ort", "cpu")),  # packages but no GPU
        (Availability(1, False, CPU_ORT), ("cpu", "ort", "cpu")),  # GPU but CPU-only onnxruntime
        (Availability(0, False, CPU_ORT), ("cpu", "ort", "cpu")),
    ],
)
def test_auto_prefers_tensorrt_then_ort_cuda_then_cpu(facts: Availability, want: tuple, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trt_bgswap.runtime.backends"):
        choice = choose_backend("auto", facts)
    assert (choice.name, choice.engine, choice.provider) == want
    assert f"backend: {choice.name}" in caplog.text and choice.reason in caplog.text


def test_auto_cpu_reason_says_what_is_missing() -> None:
    choice = choose_backend("auto", Availability(0, False, CPU_ORT))
    assert "no CUDA device" in choice.reason


@pytest.mark.parametrize(
    "requested, facts, want",
    [
        ("trt", Availability(2, True, CPU_ORT), BackendChoice("trt", "trt", None, "requested")),
        ("ort-tensorrt", Availability(1, False, GPU_ORT), BackendChoice("ort-tensorrt", "ort", "tensorrt", "requested")),
        ("ort-cuda", Availability(1, True, CUDA_ORT), BackendChoice("ort-cuda", "ort", "cuda", "requested")),
        ("cpu", Availability(1, True, GPU_ORT), BackendChoice("cpu", "ort", "cpu", "requested")),
    ],
)
def test_explicit_choice_is_honoured(requested: str, facts: Availability, want: BackendChoice) -> None:
    assert choose_backend(requested, facts) == want


@pytest.mark.parametrize(
    "requested, facts, match",
    [
        ("trt", Availability(0, True, GPU_ORT), "no CUDA device"),
        ("trt", Availability(1, False, GPU_ORT), r"pip install 'trt-bgswap\[trt-cu13\]'"),
        ("ort-tensorrt", Availability(1, True, CUDA_ORT), "onnxruntime-gpu"),
        ("ort-cuda", Availability(1, True, CPU_ORT), "onnxruntime-gpu"),
        ("ort-cuda", Availability(0, True, GPU_ORT), "no CUDA device"),
    ],
)
def test_explicit_unavailable_choice_is_an_error_not_a_fallback(requested: str, facts: Availability, match: str) -> None:
    with pytest.raises(BackendUnavailable, match=match):
        choose_backend(requested, facts)


def test_unknown_backend_lists_choices() -> None:
    with pytest.raises(UsageError, match="auto, trt, ort-tensorrt, ort-cuda, cpu"):
        choose_backend("tensorrt", Availability(0, False, CPU_ORT))


def test_probe_on_this_machine_agrees_with_auto() -> None:
    facts = Availability.probe()
    assert "CPUExecutionProvider" in facts.ort_providers
    assert facts.tensorrt == HAS_TENSORRT
    choice = choose_backend("auto", facts)
    if facts.cuda_devices == 0:
        assert choice.name == "cpu"


# --- TensorRT absent: every entry point fails with the install hint ---

needs_no_tensorrt = pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here; these check its absence")


@needs_no_tensorrt
def test_trt_engine_load_without_tensorrt_is_actionable(tmp_path: Path) -> None:
    from trt_bgswap.runtime.trt_backend import TrtEngine

    engine = TrtEngine(mini_specs()["unet"], tmp_path / "model.plan")
    assert engine.backend == "tensorrt (not loaded)"
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed.*pip install 'trt-bgswap\[trt-cu13\]'"):
        engine.load()


@needs_no_tensorrt
def test_trt_build_without_tensorrt_is_actionable(tmp_path: Path) -> None:
    from trt_bgswap.engines.build import build_engines

    export = write_mini_export(tmp_path / "export")
    with pytest.raises(BackendUnavailable, match=r"pip install 'trt-bgswap\[trt-cu13\]'"):
        build_engines(export, backend="trt")
    assert not (export / "engines" / "unet" / "model.plan").exists()


@pytest.mark.skipif(HAS_CUDA_PYTHON, reason="cuda-python is installed here; this checks its absence")
def test_cuda_calls_without_cuda_python_are_actionable() -> None:
    from trt_bgswap.runtime.cuda_device import Stream

    with pytest.raises(BackendUnavailable, match=r"cuda-python.*pip install 'trt-bgswap\[trt-cu13\]'"):
        Stream()


# --- builder options and progress: the plain-Python parts of the TensorRT build ---


@pytest.mark.parametrize(
    "kwargs, match",
    [({"precision": "int8"}, "fp16, fp32"), ({"precision": "fp32", "weak_fp16": True}, "needs --precision fp16"), ({"opt_level": 6}, "0..5"), ({"opt_level": -1}, "0..5"), ({"workspace_bytes": 1000}, "1 MiB")],
)
def test_bad_builder_options(kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        TrtBuildOptions(**kwargs)


@pytest.mark.parametrize(
    "kwargs, flags",
    [({}, {"TF32": True}), ({"precision": "fp32"}, {"TF32": True}), ({"tf32": False}, {"TF32": False}), ({"weak_fp16": True}, {"TF32": True, "FP16": True})],
)
def test_builder_flags(kwargs: dict, flags: dict) -> None:
    """Strongly typed builds set no precision flag (precision is the graph's); FP16 only for the explicit weak fallback."""
    assert TrtBuildOptions(**kwargs).builder_flags() == flags


@pytest.mark.parametrize("field, value", [("opt_level", 5), ("workspace_bytes", 1 << 30), ("tf32", False), ("timing_cache", False), ("precision", "fp32"), ("weak_fp16", True)])
def test_every_builder_option_is_in_the_key(field: str, value: object) -> None:
    assert TrtBuildOptions(**{field: value}).key_parts() != TrtBuildOptions().key_parts()


def test_build_progress_logs_phases_and_throttles_steps(caplog: pytest.LogCaptureFixture) -> None:
    every = BuildProgress("unet", interval=0.0)
    every.phase_start("Building engine", None, 3)
    every.phase_start("Tactic search", "Building engine", 2)  # nested: no line of its own
    for s in range(2):
        assert every.step_complete("Tactic search", s) is True  # never cancels
    every.phase_finish("Tactic search")
    assert every.lines == ["Building engine (3 steps)", "Tactic search: step 1/2", "Tactic search: step 2/2"]
    quiet = BuildProgress("unet", interval=3600.0)
    quiet.phase_start("Building engine", None, 100)
    with caplog.at_level(logging.INFO, logger="trt_bgswap.engines.trt_build"):
        for s in range(100):
            quiet.step_complete("Building engine", s)
    assert quiet.lines == ["Building engine (100 steps)"]
