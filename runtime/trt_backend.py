"""TensorRT backend: runs a serialized plan through the engine interface of :mod:`runtime.engine`.

Uses the TensorRT 10 named-tensor API as NVIDIA documents it ("Performing
Inference" in the TensorRT developer guide): ``trt.Runtime.deserialize_cuda_engine``,
``ICudaEngine.get_tensor_name/get_tensor_mode/get_tensor_dtype``,
``IExecutionContext.set_optimization_profile_async``, ``set_input_shape``,
``set_tensor_address`` and ``execute_async_v3`` on one CUDA stream. Around it:

- device buffers are allocated once per shape and reused; a buffer is only
  reallocated when a tensor outgrows it (:func:`trt_bgswap.runtime.trt_shapes.reallocations`);
- :meth:`TrtEngine.run` executes on the device buffers without host copies, and
  :meth:`TrtEngine.device_ptr` / :meth:`TrtEngine.feed_from_device` pass one
  engine's output to the next engine on the device;
- optionally one activation block is shared by several engines on **one** stream
  (:class:`SharedActivations`: contexts created with
  ``ExecutionContextAllocationStrategy.USER_MANAGED`` and given memory with
  ``set_device_memory``; "using it in another execution context running in parallel ... will
  result in undefined behavior", NvInferRuntime.h@v11.1:4072-4074, so a second stream is
  refused); the block follows the largest need of the engines loaded now, shrinking when
  one unloads, and engines can be unloaded/reloaded for small GPUs;
- uploads go through a pinned staging buffer per input (:class:`~.cuda_device.PinnedStaging`);
- optionally the execution is captured once into a CUDA graph and replayed, for
  static profiles only (:func:`trt_bgswap.runtime.trt_shapes.cuda_graph_eligibility`);
  a failed capture is logged with its cause and the engine runs eagerly from then on
  (trtexec's fallback, sampleInference.cpp@v11.1:1361-1369);
- one ``trt.ILogger`` for the process (:func:`trt_logger`), forwarding to :mod:`logging`,
  shared by the builder and every runtime (Polygraphy's ``get_trt_logger`` does the same,
  tools/Polygraphy/polygraphy/backend/trt/util.py@v11.1:36-76).

Version notes (NVIDIA's bindings, tests/emulation/SOURCES.md): ``device_memory_size`` is
deprecated in 10.1 and gone in 11 (``device_memory_size_v2`` from 10.1); ``set_device_memory``
exists from 10.1 (10.0 has the ``device_memory`` property).

The profile choice, buffer sizes and graph eligibility are plain Python tested
on CPU; this module imports without ``tensorrt``/``cuda-python`` and raises
:class:`~trt_bgswap.errors.BackendUnavailable` with the install hint when used.

One concept, kept in one file although it passes 400 lines: running a TensorRT plan behind the
engine interface (the logger, the activation memory and the engine are its parts).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trt_bgswap.errors import BackendUnavailable, ModelError, UsageError
from trt_bgswap.runtime.cuda_device import (
    INSTALL_HINT,
    CudaGraph,
    DeviceBuffer,
    PinnedStaging,
    Stream,
    copy_device,
    copy_to_host,
)
from trt_bgswap.runtime.engine import Engine
from trt_bgswap.runtime.trt_shapes import ShapeProfile, TensorProfile, buffer_plan, complete_dims, cuda_graph_eligibility, reallocations, select_profile
from trt_bgswap.specs import ModelSpec

log = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10


def import_tensorrt() -> Any:
    """``import tensorrt`` (>= 10), or an actionable :class:`BackendUnavailable`."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(f"TensorRT is not installed (import tensorrt failed: {e}); {INSTALL_HINT}") from e
    major = int(str(trt.__version__).split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is too old: trt-bgswap needs TensorRT >= {MIN_TENSORRT_MAJOR}; {INSTALL_HINT}")
    return trt


class _LogForwarder:
    """Maps TensorRT severities to :mod:`logging` levels (INFO and VERBOSE are debug noise for users)."""

    def __init__(self, trt: Any) -> None:
        s = trt.ILogger.Severity
        self.levels = {s.INTERNAL_ERROR: logging.ERROR, s.ERROR: logging.ERROR, s.WARNING: logging.WARNING, s.INFO: logging.DEBUG, s.VERBOSE: logging.DEBUG}

    def __call__(self, severity: Any, msg: str) -> None:
        logging.getLogger("tensorrt").log(self.levels.get(severity, logging.INFO), "%s", msg)


_LOGGER: tuple[Any, Any] | None = None  # (the tensorrt module, its logger): one per process


def trt_logger(trt: Any) -> Any:
    """The process's one ``trt.ILogger`` (forwarding to the ``tensorrt`` logger of :mod:`logging`).

    TensorRT 8.0 required one logger for every builder and runtime; 8.2+ only needs the logger
    to outlive what it made (NvInferRuntime.h@v11.1:1567-1568). One forwarder for the process
    satisfies both, and puts the builder's and the runtime's messages in the same place.
    """
    global _LOGGER
    if _LOGGER is not None and _LOGGER[0] is trt:
        return _LOGGER[1]
    forward = _LogForwarder(trt)

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            forward(severity, msg)

    _LOGGER = (trt, _Logger())
    return _LOGGER[1]


def _scratch_size(engine: Any) -> int:
    """Activation bytes the context needs: ``device_memory_size_v2`` (10.1+, the only one in 11.x), else 10.0's name.

    ``hasattr``, not ``or``: a size of 0 is a real answer (an engine whose every node writes a
    network output), and 11.x no longer binds ``device_memory_size`` (pyCore.cpp@v11.1:1426-1428).
    """
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def _set_scratch(context: Any, ptr: int, nbytes: int) -> None:
    if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
        context.set_device_memory(ptr, nbytes)
    else:
        context.device_memory = ptr


class SharedActivations:
    """One activation block for several engines run in turn on one stream.

    TensorRT lets a context run on user-managed scratch memory; engines that never run
    concurrently can share one block sized to the largest need. "Never concurrently" is
    what one stream guarantees, so the block belongs to one stream: engines opened without
    a stream take it (:attr:`stream`), an engine on another stream is refused. The block
    follows the engines loaded now: it grows when a bigger one loads and shrinks when the
    biggest unloads; every context is re-pointed (and its CUDA graphs invalidated) then.
    """

    def __init__(self, stream: Stream | None = None) -> None:
        self.buffer: DeviceBuffer | None = None
        self._needs: dict[TrtEngine, int] = {}
        self._given = stream
        self._stream = stream
        self._owns_stream = False

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes if self.buffer is not None else 0

    @property
    def stream(self) -> Stream:
        """The one stream of every engine on this block (made here when nobody gave one)."""
        if self._stream is None:
            self._stream = Stream()
            self._owns_stream = True
        return self._stream

    def attach(self, engine: "TrtEngine", nbytes: int) -> None:
        if self._stream is None:
            self._stream = engine.stream  # the first engine's stream becomes the block's
        if engine.stream is not self._stream:
            raise UsageError(
                f"{engine.spec.name}: shared activation memory is used by engines on one CUDA stream only (TensorRT: using it from "
                "another context running in parallel is undefined behaviour); open the engines with the same stream"
            )
        self._needs[engine] = nbytes
        self._resize()
        engine._bind_scratch()

    def detach(self, engine: "TrtEngine") -> None:
        self._needs.pop(engine, None)
        self._resize()
        if not self._needs:
            if self._owns_stream and self._stream is not None:
                self._stream.close()
            self._stream, self._owns_stream = self._given, False

    def _resize(self) -> None:
        """Make the block exactly the largest need of the attached engines (freed first: no peak of old + new)."""
        need = max(self._needs.values(), default=0)
        if need == self.nbytes:
            return
        if self.buffer is not None:
            self.buffer.free()  # cudaFree waits for the device: no queued work still uses the block
            self.buffer = None
        if need > 0:
            self.buffer = DeviceBuffer(need)
        log.info("shared activation memory: %.1f MiB for %d engine(s)", need / 2**20, len(self._needs))
        for e in self._needs:
            e._bind_scratch()  # every context must see the new block; their CUDA graphs are stale


class TrtEngine(Engine):
    """A TensorRT plan behind the common engine interface."""

    def __init__(
        self,
        spec: ModelSpec,
        path: Path,
        stream: Stream | None = None,
        shared_activations: SharedActivations | None = None,
        use_cuda_graph: bool = False,
    ) -> None:
        super().__init__(spec, path)
        self._stream = stream
        self._given_stream = stream is not None
        self._owns_stream = stream is None
        self.shared = shared_activations
        self.use_cuda_graph = use_cuda_graph
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self.profiles: list[ShapeProfile] = []
        self._profile: int | None = None
        self._device: dict[str, DeviceBuffer] = {}
        self._host_out: dict[str, np.ndarray] = {}
        self._graph: CudaGraph | None = None
        self._graph_ok = False
        self._graph_failed = False  # a capture failed: eager from then on
        self._staging: dict[str, PinnedStaging] = {}

    @property
    def backend(self) -> str:
        return "tensorrt" if self._engine is not None else "tensorrt (not loaded)"

    @property
    def stream(self) -> Stream:
        if self._stream is None:
            raise BackendUnavailable(f"{self.spec.name}: engine not loaded; call load() first")
        return self._stream

    def load(self) -> None:
        if self._engine is not None:
            return
        trt = import_tensorrt()
        if not self.path.is_file():
            raise ModelError(f"{self.path}: TensorRT plan missing; run `trt-bgswap build DIR --backend trt`")
        if self._stream is None:
            self._stream = self.shared.stream if self.shared is not None else Stream()
            self._owns_stream = self.shared is None
        self._runtime = trt.Runtime(trt_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise ModelError(
                f"{self.path}: TensorRT {trt.__version__} cannot deserialize this plan (built by another TensorRT version "
                "or for another GPU?); rebuild it with `trt-bgswap build DIR --backend trt`"
            )
        self._check_tensors(trt)
        self.profiles = [
            ShapeProfile(
                tuple(
                    TensorProfile(t.name, *(tuple(s) for s in self._engine.get_tensor_profile_shape(t.name, i)))
                    for t in self.spec.inputs
                )
            )
            for i in range(self._engine.num_optimization_profiles)
        ]
        if self.shared is not None:
            self._context = self._engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        else:
            self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailable(f"{self.spec.name}: TensorRT could not create an execution context (out of GPU memory?)")
        if self.shared is not None:
            self.shared.attach(self, _scratch_size(self._engine))
        self._graph = CudaGraph(self.stream)
        self._profile = None
        log.info("%s: TensorRT plan %s loaded (%d profile(s))", self.spec.name, self.path, len(self.profiles))

    def _check_tensors(self, trt: Any) -> None:
        e = self._engine
        names = {e.get_tensor_name(i) for i in range(e.num_io_tensors)}
        for t, mode in [(t, trt.TensorIOMode.INPUT) for t in self.spec.inputs] + [(t, trt.TensorIOMode.OUTPUT) for t in self.spec.outputs]:
            if t.name not in names:
                raise ModelError(f"{self.path}: the plan has no tensor {t.name!r} declared for {self.spec.name} (has {sorted(names)})")
            if e.get_tensor_mode(t.name) != mode:
                raise ModelError(f"{self.path}: {t.name!r} is not an {mode.name.lower()} of the plan")
            got = np.dtype(trt.nptype(e.get_tensor_dtype(t.name)))
            if got != t.np_dtype:
                raise ModelError(f"{self.path}: {t.name!r} is {got} in the plan but {t.dtype} in the spec; rebuild from this export")

    def _bind_scratch(self) -> None:
        if self._context is not None and self.shared is not None and self.shared.buffer is not None and _scratch_size(self._engine) > 0:
            _set_scratch(self._context, self.shared.buffer.ptr, self.shared.buffer.nbytes)
            self._invalidate_graph()

    @property
    def scratch_ptr(self) -> int:
        """The shared activation block's address (0 without one): captured graphs bake it in."""
        return self.shared.buffer.ptr if self.shared is not None and self.shared.buffer is not None else 0

    def _invalidate_graph(self) -> None:
        if self._graph is not None:
            self._graph.reset()

    def allocate(self, dims: Mapping[str, int]) -> None:
        """Select the profile, set input shapes and (re)allocate buffers that are new or too small."""
        if self._engine is None:
            self.load()
        shapes = self.spec.input_shapes(dims)
        index = select_profile(self.profiles, shapes)
        if index != self._profile:
            if not self._context.set_optimization_profile_async(index, self.stream.handle):
                raise BackendUnavailable(f"{self.spec.name}: TensorRT refused optimization profile {index}")
            self._profile = index
        for name, shape in shapes.items():
            if not self._context.set_input_shape(name, shape):
                raise UsageError(f"{self.spec.name}.{name}: TensorRT rejects shape {shape} (profile {self.profiles[index].tensor(name)})")
        reported = {t.name: tuple(self._context.get_tensor_shape(t.name)) for t in self.spec.outputs}
        try:
            full = complete_dims(self.spec, dims, reported)
        except ValueError as e:
            raise ModelError(f"{self.path}: {e}; rebuild the plan from this export") from e
        plan = buffer_plan(self.spec, full)
        capacity = {k: b.nbytes for k, b in self._device.items()}
        grown = reallocations(capacity, plan.sizes())
        for name in grown:
            if name in self._device:
                self._device[name].free()
            self._device[name] = DeviceBuffer(plan.sizes()[name])
        for t in plan.tensors:
            self._context.set_tensor_address(t.name, self._device[t.name].ptr)
            if not t.is_input:
                self._host_out[t.name] = np.empty(t.shape, dtype=self.spec.tensor(t.name).np_dtype)
        if grown:
            log.debug("%s: allocated device buffers %s", self.spec.name, grown)
        eligibility = cuda_graph_eligibility(self.profiles[index])
        self._graph_ok = self.use_cuda_graph and eligibility.eligible and not self._graph_failed
        if self.use_cuda_graph and not eligibility.eligible:
            log.info("%s: not using a CUDA graph: %s", self.spec.name, eligibility.reason)
        self._invalidate_graph()  # shapes, profile or pointers may have changed
        super().allocate(dims)

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self.stream.handle):
            raise BackendUnavailable(f"{self.spec.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")

    def run(self) -> None:
        """Run once on the current device buffers, asynchronously on the stream (no host copies)."""
        if self._dims is None:
            raise UsageError(f"{self.spec.name}: call allocate(dims) (or the engine with inputs) before run()")
        if not self._graph_ok or self._graph is None:
            self._execute()
            return
        if not self._graph.captured:
            # TensorRT may finish shape-dependent setup on the first enqueue after a shape change;
            # run once eagerly so that work is not recorded into the graph.
            self._execute()
            try:
                self._graph.capture(self._execute)
            except BackendUnavailable as e:
                self._graph_failed, self._graph_ok = True, False
                log.warning("%s: CUDA-graph capture failed (%s); running eagerly from now on", self.spec.name, e)
                self._execute()  # the warm-up's result would do; an enqueue of its own is certain
                return
            log.info("%s: captured a CUDA graph for dims %s", self.spec.name, self._dims)
        self._graph.replay()

    def device_ptr(self, name: str) -> int:
        """Device address of a tensor's buffer, to hand to another engine or kernel."""
        if name not in self._device:
            raise UsageError(f"{self.spec.name}: no device buffer for {name!r}; allocate first (has {sorted(self._device)})")
        return self._device[name].ptr

    def feed_from_device(self, name: str, src_ptr: int) -> None:
        """Copy another engine's device output into this engine's input ``name``, on the stream."""
        nbytes = self.spec.tensor(name).nbytes(self._dims or {})
        copy_device(self.device_ptr(name), src_ptr, nbytes, self.stream)

    def upload(self, name: str, array: np.ndarray) -> None:
        """Host array -> this input's device buffer, through the input's pinned staging buffer (asynchronous)."""
        staging = self._staging.setdefault(name, PinnedStaging())
        staging.upload(self.device_ptr(name), np.ascontiguousarray(array, dtype=self.spec.tensor(name).np_dtype), self.stream)

    def download(self, name: str) -> np.ndarray:
        """Copy one output to the host and wait for it."""
        out = self._host_out[name]
        copy_to_host(out, self.device_ptr(name), self.stream)
        self.stream.synchronize()
        return out.copy()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._engine is None:
            self.load()
        dims = self.spec.infer_dims(feeds)
        if dims != self._dims:
            self.allocate(dims)
        for name, array in feeds.items():
            self.upload(name, array)
        self.run()
        for name, out in self._host_out.items():
            copy_to_host(out, self._device[name].ptr, self.stream)
        self.stream.synchronize()
        return {name: out.copy() for name, out in self._host_out.items()}

    def unload(self) -> None:
        """Free the context, the engine and all device buffers (the stream is kept for a reload)."""
        if self._engine is None:
            return
        self.stream.synchronize()
        self._invalidate_graph()
        for b in self._device.values():
            b.free()
        self._device.clear()
        for staging in self._staging.values():
            staging.free()
        self._staging.clear()
        self._host_out.clear()
        if self.shared is not None:
            self.shared.detach(self)
            if not self._given_stream:
                self._stream = None  # the block's stream; the next load takes it again
        self._context = None
        self._engine = None
        self._runtime = None
        self._profile = None
        self._dims = None
        log.info("%s: TensorRT engine unloaded", self.spec.name)

    def close(self) -> None:
        """Unload and destroy the stream if this engine created it."""
        self.unload()
        if self._owns_stream and self._stream is not None:
            self._stream.close()
            self._stream = None
