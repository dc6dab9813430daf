"""Which backend runs the models: TensorRT engines, ONNX Runtime on a GPU, or the CPU.

``auto`` prefers TensorRT when an NVIDIA GPU and the ``tensorrt`` package are
both present, then ONNX Runtime's CUDA execution provider, then the CPU, and
says why; an explicitly requested backend that is not usable is an error with
the fix, never a silent fallback (the most common complaint against rembg is a
GPU silently not used).

:func:`choose_backend` is a pure decision over :class:`Availability` facts so it
is unit-tested with injected facts; :meth:`Availability.probe` gathers the real
ones cheaply (no ``tensorrt`` import: a module spec lookup and the CUDA driver
library's device count).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

from trt_bgswap.errors import BackendUnavailable, UsageError
from trt_bgswap.runtime.cuda_versions import INSTALL_HINT

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "trt", "ort-tensorrt", "ort-cuda", "cpu")

TRT_HINT = INSTALL_HINT
ORT_GPU_HINT = "pip install onnxruntime-gpu (with CUDA and cuDNN; TensorRT too for ort-tensorrt)"


@dataclass(frozen=True)
class Availability:
    """What this machine offers."""

    cuda_devices: int
    tensorrt: bool  # the tensorrt Python package is importable
    ort_providers: tuple[str, ...]

    @classmethod
    def probe(cls) -> "Availability":
        from trt_bgswap.runtime.cuda_device import device_count_via_driver
        from trt_bgswap.runtime.ort_backend import available_providers

        return cls(
            cuda_devices=device_count_via_driver(),
            tensorrt=importlib.util.find_spec("tensorrt") is not None,
            ort_providers=tuple(available_providers()),
        )


@dataclass(frozen=True)
class BackendChoice:
    """The chosen backend: ``trt`` (TensorRT engines) or ``ort`` with an ONNX Runtime provider."""

    name: str  # one of BACKEND_CHOICES other than "auto"
    engine: str  # "trt" | "ort": which engine class and which build_engines backend
    provider: str | None  # ONNX Runtime provider key ("tensorrt", "cuda", "cpu") when engine == "ort"
    reason: str


def _trt_problem(facts: Availability) -> str | None:
    if facts.cuda_devices < 1:
        return "no CUDA device found"
    if not facts.tensorrt:
        return f"the tensorrt package is not installed ({TRT_HINT})"
    return None


def _ort_problem(facts: Availability, provider: str) -> str | None:
    if facts.cuda_devices < 1:
        return "no CUDA device found"
    if provider not in facts.ort_providers:
        return f"ONNX Runtime has no {provider} ({ORT_GPU_HINT})"
    return None


def choose_backend(requested: str, facts: Availability, announce: bool = True) -> BackendChoice:
    """Pick the backend for ``requested`` on a machine with ``facts``; logs the choice and why when ``announce``
    (a check before loading passes False: the load that follows says it once)."""
    if requested not in BACKEND_CHOICES:
        raise UsageError(f"--backend {requested!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    trt_problem = _trt_problem(facts)
    ort_trt_problem = _ort_problem(facts, "TensorrtExecutionProvider")
    cuda_problem = _ort_problem(facts, "CUDAExecutionProvider")
    if requested == "trt":
        if trt_problem:
            raise BackendUnavailable(f"--backend trt: {trt_problem}; or use --backend auto")
        choice = BackendChoice("trt", "trt", None, "requested")
    elif requested == "ort-tensorrt":
        if ort_trt_problem:
            raise BackendUnavailable(f"--backend ort-tensorrt: {ort_trt_problem}; or use --backend auto")
        choice = BackendChoice("ort-tensorrt", "ort", "tensorrt", "requested")
    elif requested == "ort-cuda":
        if cuda_problem:
            raise BackendUnavailable(f"--backend ort-cuda: {cuda_problem}; or use --backend auto")
        choice = BackendChoice("ort-cuda", "ort", "cuda", "requested")
    elif requested == "cpu":
        choice = BackendChoice("cpu", "ort", "cpu", "requested")
    elif trt_problem is None:
        choice = BackendChoice("trt", "trt", None, f"auto: {facts.cuda_devices} CUDA device(s) and tensorrt installed")
    elif cuda_problem is None:
        choice = BackendChoice("ort-cuda", "ort", "cuda", f"auto: not TensorRT ({trt_problem}); ONNX Runtime has CUDA")
    else:
        choice = BackendChoice("cpu", "ort", "cpu", f"auto: not TensorRT ({trt_problem}), not ONNX Runtime CUDA ({cuda_problem})")
    if announce:
        log.info("backend: %s (%s)", choice.name, choice.reason)
    return choice
