"""The few CUDA runtime calls the TensorRT backend needs, through NVIDIA's ``cuda-python`` bindings.

Device buffers (``cudaMalloc``), one stream, host<->device copies, device
queries, and CUDA-graph capture/replay (``cudaStreamBeginCapture`` /
``cudaStreamEndCapture`` / ``cudaGraphInstantiate`` / ``cudaGraphLaunch``, see
the "CUDA Graphs" section of the CUDA C++ Programming Guide and of the TensorRT
developer guide). ``cuda-python`` returns ``(error, *values)`` tuples; every
call goes through :func:`check`, which raises with CUDA's own error string.

Imported lazily: this module imports without ``cuda-python`` installed and
raises :class:`~trt_bgswap.errors.BackendUnavailable` with the install hint
when a function is used.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from trt_bgswap.errors import BackendUnavailable

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "on a machine with an NVIDIA GPU and driver: pip install 'trt-bgswap[trt]' "
    "--extra-index-url https://pypi.nvidia.com (see README, 'TensorRT')"
)


def cudart() -> Any:
    """``cuda.bindings.runtime`` (cuda-python >= 12.6), else the older ``cuda.cudart``.

    No module-level cache: ``sys.modules`` is the cache (one dict lookup per call), so the
    module used is always the one installed now; tests install an emulated one and remove it.
    """
    rt = sys.modules.get("cuda.bindings.runtime") or sys.modules.get("cuda.cudart")
    if rt is not None:
        return rt
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt
        except ImportError as e:
            raise BackendUnavailable(f"the CUDA Python bindings (cuda-python) are not installed; {INSTALL_HINT}") from e
    return rt


def check(result: Any) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result; raise on error."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        _, text = rt.cudaGetErrorString(err)
        raise BackendUnavailable(f"CUDA error {name.decode()}: {text.decode()}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def handle(obj: Any) -> int:
    """The raw integer handle of a cuda-python object (what TensorRT's Python API takes)."""
    return int(obj)


def device_count_via_driver() -> int:
    """CUDA devices visible through the driver library, without cuda-python (0 when there is no driver).

    Lets :mod:`trt_bgswap.runtime.backends` decide without importing anything heavy.
    """
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return 0
    if lib.cuInit(0) != 0:
        return 0
    n = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(n)) != 0:
        return 0
    return int(n.value)


def compute_capability(device: int = 0) -> str:
    """``"major.minor"`` of a device, part of the engine cache key."""
    prop = check(cudart().cudaGetDeviceProperties(device))
    return f"{prop.major}.{prop.minor}"


class Stream:
    """One CUDA stream; the pipeline runs every engine on it, in order."""

    def __init__(self) -> None:
        self._stream = check(cudart().cudaStreamCreate())

    @property
    def handle(self) -> int:
        return handle(self._stream)

    @property
    def raw(self) -> Any:
        return self._stream

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self._stream))

    def close(self) -> None:
        if self._stream is not None:
            check(cudart().cudaStreamDestroy(self._stream))
            self._stream = None


class DeviceBuffer:
    """A ``cudaMalloc`` block, freed explicitly (engines free on unload) or when collected."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr = int(check(cudart().cudaMalloc(max(self.nbytes, 1))))

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr))
            self.ptr = 0

    def __del__(self) -> None:  # a safety net only; engines free buffers on unload
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn cuda-python down
            pass


def copy_to_device(dst: int, src: np.ndarray, stream: Stream) -> None:
    src = np.ascontiguousarray(src)
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.raw))


def copy_to_host(dst: np.ndarray, src: int, stream: Stream) -> None:
    """Copy into a contiguous host array; the caller synchronizes the stream before reading it."""
    if not dst.flags.c_contiguous:
        raise ValueError("copy_to_host needs a C-contiguous destination array")
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.raw))


def copy_device(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    """Device-to-device, so one engine's output feeds the next without a host round trip."""
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.raw))


class CudaGraph:
    """Capture a sequence of launches on a stream once, replay it with one ``cudaGraphLaunch``.

    The captured work reads and writes the same device pointers on every
    replay: callers update inputs in place (e.g. :func:`copy_to_device` into the
    captured buffers) and must re-capture after any reallocation or shape change.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._graph: Any = None
        self._exec: Any = None

    @property
    def captured(self) -> bool:
        return self._exec is not None

    def capture(self, launch: Callable[[], None]) -> None:
        rt = cudart()
        self.reset()
        check(rt.cudaStreamBeginCapture(self.stream.raw, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        try:
            launch()
        finally:
            graph = check(rt.cudaStreamEndCapture(self.stream.raw))
        self._graph = graph
        self._exec = check(rt.cudaGraphInstantiate(graph, 0))
        log.debug("captured a CUDA graph")

    def replay(self) -> None:
        if self._exec is None:
            raise BackendUnavailable("no CUDA graph captured; call capture() first")
        check(cudart().cudaGraphLaunch(self._exec, self.stream.raw))

    def reset(self) -> None:
        rt = cudart()
        if self._exec is not None:
            check(rt.cudaGraphExecDestroy(self._exec))
            self._exec = None
        if self._graph is not None:
            check(rt.cudaGraphDestroy(self._graph))
            self._graph = None
