"""The few CUDA runtime calls the TensorRT backend needs, through NVIDIA's ``cuda-python`` bindings.

Device buffers (``cudaMalloc``), pinned host staging (``cudaMallocHost``), one stream,
host<->device copies, device queries, and CUDA-graph capture/replay
(``cudaStreamBeginCapture`` / ``cudaStreamEndCapture`` / ``cudaGraphInstantiate`` /
``cudaGraphLaunch``, see the "CUDA Graphs" section of the CUDA C++ Programming Guide and of
the TensorRT developer guide). ``cuda-python`` returns ``(error, *values)`` tuples; every
call goes through :func:`check`, which raises with CUDA's own error string (and, for a
driver too old for the bindings, the driver version needed: :mod:`.cuda_versions`).

Captures follow trtexec (``samples/common/sampleDevice.h``@v11.1:216-251 and
``sampleInference.cpp``@v11.1:1335-1372): the stream is synchronized before capturing, the
capture is thread-local (another thread's ``cudaMalloc`` cannot break it), and a failed
capture ends the capture, destroys whatever graph it made and reports the call that failed.
Stream handles go to TensorRT through ``cuda.bindings.utils.get_cuda_native_handle``
(cuda-bindings >= 12.9.1; ``int(cudaStream_t)`` is deprecated since 12.9.1/13.0).

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
from trt_bgswap.runtime.cuda_versions import INSTALL_HINT

log = logging.getLogger(__name__)



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
        raise BackendUnavailable(error_text(rt, err))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def error_text(rt: Any, err: Any) -> str:
    """``CUDA error NAME: text``; for a too-old driver also what it supports and the driver needed."""
    _, name = rt.cudaGetErrorName(err)
    _, text = rt.cudaGetErrorString(err)
    message = f"CUDA error {name.decode()}: {text.decode()}"
    if err == rt.cudaError_t.cudaErrorInsufficientDriver:
        from trt_bgswap.runtime.cuda_versions import read_versions

        message += f"; {read_versions(rt).driver_hint()}"
    return message


def handle(obj: Any) -> int:
    """The raw integer handle of a cuda-python object (what TensorRT's Python API takes).

    ``get_cuda_native_handle`` where the bindings have it (12.9.1+, 13.x): ``int(obj)`` is
    deprecated there ("subject to future removal", cuda-bindings 12.9.1 / 13.0.0 release notes).
    """
    utils = sys.modules.get("cuda.bindings.utils")
    if utils is None:
        try:
            from cuda.bindings import utils
        except ImportError:
            utils = None
    native = getattr(utils, "get_cuda_native_handle", None)
    return int(native(obj)) if native is not None else int(obj)


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
    """A host-to-device copy from wherever ``src`` lives (pageable memory: CUDA stages it; see :class:`PinnedStaging`)."""
    src = np.ascontiguousarray(src)
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.raw))


class PinnedStaging:
    """A reusable page-locked host buffer for uploads: the copy is a true asynchronous DMA.

    CUDA stages copies from pageable memory through its own pinned buffer and "might be
    synchronous with respect to host" (CUDA runtime API, "API synchronization behavior"); a
    48 MB photo pays that on every upload. Here the array is copied once into a
    ``cudaMallocHost`` block that grows to the largest upload, and an event recorded after each
    copy guards the block: the next upload waits for it before overwriting the bytes a pending
    copy still reads.
    """

    def __init__(self) -> None:
        self.ptr = 0
        self.nbytes = 0
        self._event: Any = None
        self._pending = False

    def _wait(self) -> None:
        if self._pending:
            check(cudart().cudaEventSynchronize(self._event))
            self._pending = False

    def _reserve(self, nbytes: int) -> None:
        self._wait()
        if nbytes <= self.nbytes:
            return
        rt = cudart()
        if self.ptr:
            check(rt.cudaFreeHost(self.ptr))
            self.ptr, self.nbytes = 0, 0
        self.ptr = int(check(rt.cudaMallocHost(max(nbytes, 1))))
        self.nbytes = nbytes
        if self._event is None:
            self._event = check(rt.cudaEventCreate())

    def upload(self, dst: int, src: np.ndarray, stream: Stream) -> None:
        """Copy ``src`` into the pinned block, then enqueue the block's copy to ``dst`` on ``stream``."""
        src = np.ascontiguousarray(src)
        if src.nbytes == 0:
            return
        self._reserve(src.nbytes)
        np.ctypeslib.as_array((ctypes.c_uint8 * src.nbytes).from_address(self.ptr))[:] = src.reshape(-1).view(np.uint8)
        rt = cudart()
        check(rt.cudaMemcpyAsync(dst, self.ptr, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.raw))
        check(rt.cudaEventRecord(self._event, stream.raw))
        self._pending = True

    def free(self) -> None:
        rt = cudart()
        self._wait()
        if self.ptr:
            check(rt.cudaFreeHost(self.ptr))
            self.ptr, self.nbytes = 0, 0
        if self._event is not None:
            check(rt.cudaEventDestroy(self._event))
            self._event = None


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
        """Record ``launch``'s stream work; on any failure nothing is kept and the first error is raised.

        As trtexec: synchronize first (the warm-up's work is not recorded), capture thread-local
        (only this thread's unsafe calls can break it), and on error end the capture, destroy
        the graph it returned, clear CUDA's error and raise the failing call's error rather
        than the ``cudaErrorStreamCaptureInvalidated`` that ending the capture then reports.
        """
        rt = cudart()
        self.reset()
        self.stream.synchronize()
        check(rt.cudaStreamBeginCapture(self.stream.raw, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            launch()
        except BaseException:
            err, *graph = rt.cudaStreamEndCapture(self.stream.raw)
            if err == rt.cudaError_t.cudaSuccess and graph and graph[0] is not None:
                rt.cudaGraphDestroy(graph[0])
            rt.cudaGetLastError()
            raise
        graph = check(rt.cudaStreamEndCapture(self.stream.raw))
        try:
            self._exec = check(rt.cudaGraphInstantiate(graph, 0))
        except BaseException:
            rt.cudaGraphDestroy(graph)
            raise
        self._graph = graph
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
