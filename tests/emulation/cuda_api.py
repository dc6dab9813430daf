"""An emulated CUDA device and the ``cuda.bindings.runtime`` module of one cuda-bindings release.

What is modelled, each rule from NVIDIA's documentation (the docstrings shipped in the
cuda-bindings wheels, ``cuda/bindings/runtime.pyx`` in 12.9.10; the CUDA runtime API's
"API synchronization behavior"; the minor-version-compatibility table):

- **Calls return tuples** ``(cudaError_t, *values)`` of the length each function's docstring
  lists (``data/cuda_api.json``), ``(err, None, ...)`` on failure, as the real bindings do.
- **Driver**: ``cudaDriverGetVersion`` reports the emulated driver; every call that needs a
  context returns ``cudaErrorInsufficientDriver`` when the driver's CUDA major is below the
  runtime's (CUDA 13 needs an R580+ driver, 12.x an R525+ one) and ``cudaErrorNoDevice``
  without a device; the version queries and error-name lookups still work.
- **Device memory** lives in host numpy blocks at fake device addresses (never a host
  address, never reused), 256-byte aligned, bounds-checked, counted: a leak is a live block.
- **Streams are asynchronous**: work waits in a per-stream queue until something orders it
  (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``, a wait on an
  event, ``cudaFree``, the legacy default stream). A host array read before synchronizing
  holds stale data, as on a GPU. Copies from pinned memory read their source when they run;
  copies from pageable memory stage it at the call (CUDA may do either for pageable memory,
  so code must not rely on asynchrony there). Work on one stream that touches memory another
  stream's pending work writes, with no ordering between them, is a :class:`Hazard`.
- **Stream capture** (``cudaStreamBeginCapture`` .. ``cudaStreamEndCapture``): captured work is
  recorded, not run. The calling thread's interaction mode (``cudaThreadExchangeStreamCaptureMode``)
  and each capture's mode decide which "potentially unsafe" calls (``cudaMalloc``, ``cudaFree``,
  ``cudaMallocHost``, ``cudaFreeHost``, synchronous ``cudaMemcpy``, synchronizing a capturing
  stream or the device) are prohibited: they return ``cudaErrorStreamCaptureUnsupported`` and
  invalidate the captures that prohibited them; an invalidated capture ends with
  ``cudaErrorStreamCaptureInvalidated`` and no graph. Global mode: another thread's
  ``cudaMalloc`` breaks the capture; thread-local mode: it does not.
- **Graphs** replay exactly the recorded work with the pointers it was recorded with; graphs
  and executable graphs are counted so a leaked graph is visible.

Anything else the release has raises :class:`~emulation.api_data.NotEmulated` when used;
anything it lacks raises ``AttributeError``.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import threading
import traceback
import types
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emulation.api_data import EmulationError, Hazard, NotEmulated, UndocumentedBehaviour, cuda_releases, int_enum

DEVICE_BASE = 0x2000_0000_0000  # far from Linux heap (0x55..) and mmap (0x7f..) host addresses
ALIGNMENT = 256  # cudaMalloc's alignment; TensorRT wants every tensor address 256-byte aligned
DRIVER_FOR_CUDA = {12: 12000, 13: 13000}  # cudaDriverGetVersion of the oldest driver of each CUDA major (R525, R580)


@dataclass
class Machine:
    """The emulated hardware and driver."""

    driver_version: int = 13000  # what cudaDriverGetVersion reports: 1000 * major + 10 * minor (0: no driver)
    devices: int = 1
    compute_capability: tuple[int, int] = (8, 9)
    name: str = "Emulated NVIDIA GPU"
    memory_bytes: int = 4 << 30


@dataclass
class Span:
    """Bytes [start, end) of one device allocation, read or written by an operation."""

    base: int
    start: int
    end: int
    write: bool

    def overlaps(self, other: "Span") -> bool:
        return self.base == other.base and self.start < other.end and other.start < self.end


@dataclass
class Op:
    """One piece of stream work: what it does and which device bytes it reads and writes."""

    label: str
    run: Callable[[], None]
    spans: tuple[Span, ...] = ()
    context: Any = None  # the TensorRT execution context an enqueue came from (capture bookkeeping)


@dataclass
class Allocation:
    base: int
    nbytes: int
    array: np.ndarray
    where: str  # the caller's source line, for leak reports
    label: str = "cudaMalloc"


@dataclass
class Capture:
    stream: int
    mode: int
    thread: int
    ops: list[Op] = field(default_factory=list)
    invalidated: str | None = None  # why, once invalidated
    enqueued_contexts: Counter = field(default_factory=Counter)


@dataclass
class Graph:
    ops: tuple[Op, ...]
    executable: bool


def _caller() -> str:
    """The first stack frame outside the emulation: who allocated a block (for leak reports)."""
    for frame in reversed(traceback.extract_stack(limit=40)[:-1]):
        if "/emulation/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "?"


class Device:
    """One emulated GPU and the CUDA runtime state around it (shared by the emulated cuda and tensorrt modules)."""

    def __init__(self, machine: Machine, runtime_version: int) -> None:
        self.machine = machine
        self.runtime_version = runtime_version
        self.err: Any = None  # cudaError_t and cudaStreamCaptureMode of the bindings (set by runtime_module)
        self.modes: Any = None
        self.lock = threading.RLock()
        self.allocations: dict[int, Allocation] = {}
        self._bases: list[int] = []
        self._next = DEVICE_BASE
        self.pinned: dict[int, Allocation] = {}
        self.queues: dict[int, list[Op]] = {0: []}
        self.captures: dict[int, Capture] = {}
        self.graphs: dict[int, Graph] = {}
        self.events: dict[int, tuple[int, int] | None] = {}  # event -> (stream, ops enqueued on it when recorded)
        self.enqueued: Counter = Counter()  # ops ever enqueued per stream (for event positions)
        self.executed: Counter = Counter()  # ops run per stream
        self._handles = itertools.count(0x7000_0010, 0x10)
        self._thread = threading.local()
        self.counts: Counter = Counter()
        self.freed: dict[int, int] = {}  # base -> size of every freed block (addresses are never reused)
        self.strict_handles = False  # True: int(handle) raises, as cuda-bindings may do after the deprecation
        # called with (stream, op) after work is recorded into a capture: lets a test act "meanwhile" (another thread allocating)
        self.during_capture: list[Callable[[int, Op], None]] = []

    # --- driver and errors -----------------------------------------------------------------

    def context_error(self, runtime_major: int | None = None) -> int | None:
        """The error every context-needing call returns on this machine, or None (TensorRT brings its own CUDA runtime major)."""
        if self.machine.driver_version // 1000 < (runtime_major or self.runtime_version // 1000):
            return self.err.cudaErrorInsufficientDriver
        if self.machine.devices < 1:
            return self.err.cudaErrorNoDevice
        return None

    def thread_mode(self) -> int:
        return getattr(self._thread, "mode", self.modes.cudaStreamCaptureModeGlobal)

    def set_thread_mode(self, mode: int) -> int:
        old = self.thread_mode()
        self._thread.mode = self.modes(int(mode))
        return old

    def prohibited(self, what: str) -> int | None:
        """Check a potentially unsafe call against ongoing captures; invalidate those that prohibit it."""
        relaxed = self.modes.cudaStreamCaptureModeRelaxed
        tid = threading.get_ident()
        mode = self.thread_mode()
        if mode == relaxed:
            return None
        offending = [
            c for c in self.captures.values()
            if c.mode != relaxed and (c.thread == tid or (mode == self.modes.cudaStreamCaptureModeGlobal and c.mode == self.modes.cudaStreamCaptureModeGlobal))
        ]
        for c in offending:
            c.invalidated = c.invalidated or f"{what} during the capture (thread {tid}, interaction mode {self.modes(mode).name})"
        return self.err.cudaErrorStreamCaptureUnsupported if offending else None

    # --- memory -----------------------------------------------------------------------------

    def malloc(self, nbytes: int, label: str = "cudaMalloc", runtime_major: int | None = None) -> tuple[int, int]:
        """``(err, address)``; TensorRT's own allocations come through here too."""
        with self.lock:
            if (bad := self.context_error(runtime_major)) is not None:
                return bad, 0
            if (bad := self.prohibited(label)) is not None:
                return bad, 0
            used = sum(a.nbytes for a in self.allocations.values())
            if nbytes <= 0 or used + nbytes > self.machine.memory_bytes:
                return (self.err.cudaErrorMemoryAllocation if nbytes > 0 else self.err.cudaErrorInvalidValue), 0
            base = self._next
            self._next += -(-nbytes // ALIGNMENT) * ALIGNMENT + ALIGNMENT  # a guard gap: overruns land nowhere
            self.allocations[base] = Allocation(base, nbytes, np.zeros(nbytes, dtype=np.uint8), _caller(), label)
            bisect.insort(self._bases, base)
            self.counts["malloc"] += 1
            return self.err.cudaSuccess, base

    def free(self, base: int, label: str = "cudaFree") -> int:
        with self.lock:
            if (bad := self.context_error()) is not None:
                return bad
            if (bad := self.prohibited(label)) is not None:
                return bad
            if base not in self.allocations:
                return self.err.cudaErrorInvalidValue
            self.synchronize_all()  # cudaFree waits for the device; nothing pending may still use the block
            self.freed[base] = self.allocations.pop(base).nbytes
            self._bases.remove(base)
            self.counts["free"] += 1
            return self.err.cudaSuccess

    def owner(self, addr: int) -> Allocation | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        a = self.allocations[self._bases[i]]
        return a if a.base <= addr < a.base + a.nbytes else None

    def is_device(self, addr: int) -> bool:
        return DEVICE_BASE <= addr < self._next

    def span(self, addr: int, nbytes: int, write: bool, what: str) -> Span:
        """The allocation bytes ``[addr, addr + nbytes)`` lie in, or a :class:`Hazard` naming the bad access."""
        a = self.owner(addr)
        if a is None or addr + nbytes > a.base + a.nbytes:
            state = "freed" if any(b <= addr < b + n for b, n in self.freed.items()) else "not allocated"
            raise Hazard(f"{what}: device bytes [{addr:#x}, +{nbytes}) are outside every live allocation ({state})")
        return Span(a.base, addr - a.base, addr - a.base + nbytes, write)

    def view(self, span: Span) -> np.ndarray:
        a = self.allocations.get(span.base)
        if a is None:
            raise Hazard(f"device block {span.base:#x} was freed while work using it was still queued")
        return a.array[span.start : span.end]

    def live(self) -> list[Allocation]:
        return [*self.allocations.values(), *self.pinned.values()]

    # --- streams ----------------------------------------------------------------------------

    def new_handle(self) -> int:
        return next(self._handles)

    def stream_error(self, stream: int) -> int | None:
        if stream not in self.queues:
            return self.err.cudaErrorInvalidResourceHandle
        return None

    def enqueue(self, stream: int, op: Op) -> int:
        """Queue ``op`` on ``stream`` (or record it into the stream's capture)."""
        with self.lock:
            if (bad := self.stream_error(stream)) is not None:
                return bad
            capture = self.captures.get(stream)
            if capture is not None:
                if capture.invalidated:
                    return self.err.cudaErrorStreamCaptureInvalidated
                capture.ops.append(op)
        if capture is not None:
            for hook in list(self.during_capture):  # outside the lock: a hook may run CUDA calls in another thread
                hook(stream, op)
            return self.err.cudaSuccess
        with self.lock:
            if stream == 0:  # the legacy default stream orders itself after every blocking stream
                self.synchronize_all()
                self._check_hazards(stream, op)
                self._run(0, op)
                return self.err.cudaSuccess
            self._check_hazards(stream, op)
            self.queues[stream].append(op)
            self.enqueued[stream] += 1
            return self.err.cudaSuccess

    def _check_hazards(self, stream: int, op: Op) -> None:
        for other, queue in self.queues.items():
            if other == stream:
                continue
            for pending in queue:
                for a in op.spans:
                    for b in pending.spans:
                        if (a.write or b.write) and a.overlaps(b):
                            raise Hazard(
                                f"{op.label} on stream {stream:#x} touches device bytes that {pending.label} on stream {other:#x} "
                                f"{'writes' if b.write else 'reads'} with no ordering between the streams (synchronize or wait on an event)"
                            )

    def _run(self, stream: int, op: Op) -> None:
        op.run()
        self.executed[stream] += 1

    def flush(self, stream: int, upto: int | None = None) -> None:
        """Run the stream's queued work (all of it, or until ``upto`` ops have run in total)."""
        with self.lock:
            queue = self.queues[stream]
            while queue and (upto is None or self.executed[stream] < upto):
                self._run(stream, queue.pop(0))

    def synchronize_all(self) -> None:
        for stream in list(self.queues):
            self.flush(stream)

    # --- capture and graphs -------------------------------------------------------------------

    def begin_capture(self, stream: int, mode: int) -> int:
        with self.lock:
            if (bad := self.stream_error(stream)) is not None:
                return bad
            if stream == 0:
                return self.err.cudaErrorStreamCaptureUnsupported  # "Capture may not be initiated if stream is cudaStreamLegacy"
            if stream in self.captures:
                return self.err.cudaErrorIllegalState
            self.captures[stream] = Capture(stream, self.modes(int(mode)), threading.get_ident())
            self.counts["captures"] += 1
            return self.err.cudaSuccess

    def end_capture(self, stream: int) -> tuple[int, int | None]:
        with self.lock:
            capture = self.captures.get(stream)
            if capture is None:
                return self.err.cudaErrorIllegalState, None
            if capture.mode != self.modes.cudaStreamCaptureModeRelaxed and capture.thread != threading.get_ident():
                return self.err.cudaErrorStreamCaptureWrongThread, None
            del self.captures[stream]
            if capture.invalidated:
                self.counts["invalidated captures"] += 1
                return self.err.cudaErrorStreamCaptureInvalidated, None
            handle = self.new_handle()
            self.graphs[handle] = Graph(tuple(capture.ops), executable=False)
            return self.err.cudaSuccess, handle

    def instantiate(self, graph: int) -> tuple[int, int | None]:
        g = self.graphs.get(graph)
        if g is None or g.executable:
            return self.err.cudaErrorInvalidValue, None
        handle = self.new_handle()
        self.graphs[handle] = Graph(g.ops, executable=True)
        return self.err.cudaSuccess, handle

    def launch(self, graph: int, stream: int) -> int:
        g = self.graphs.get(graph)
        if g is None or not g.executable:
            return self.err.cudaErrorInvalidValue
        ops = g.ops

        def replay() -> None:
            self.counts["graph launches"] += 1
            for op in ops:
                op.run()

        spans = tuple(s for op in ops for s in op.spans)
        return self.enqueue(stream, Op("cudaGraphLaunch", replay, spans))

    def destroy_graph(self, graph: int, executable: bool) -> int:
        g = self.graphs.get(graph)
        if g is None or g.executable != executable:
            return self.err.cudaErrorInvalidValue
        del self.graphs[graph]
        return self.err.cudaSuccess

    def report(self) -> list[str]:
        """Every resource still alive: device blocks, pinned blocks, graphs, streams, captures."""
        out = [f"{a.label} of {a.nbytes} bytes at {a.base:#x} from {a.where}" for a in self.live()]
        out += [f"{'executable ' if g.executable else ''}CUDA graph {h:#x}" for h, g in self.graphs.items()]
        out += [f"stream {s:#x}" for s in self.queues if s != 0]
        out += [f"capture on stream {s:#x} never ended" for s in self.captures]
        return out


# --- the cuda.bindings.runtime module -------------------------------------------------------------


class _Handle:
    """cuda-python's opaque handle types (``cudaStream_t``, ``cudaGraph_t``, ...): an address inside."""

    device: Device | None = None

    def __init__(self, init_value: int = 0) -> None:
        self._value = int(init_value) if not isinstance(init_value, _Handle) else init_value._value

    def getPtr(self) -> int:  # noqa: N802 - cuda-python's name
        return id(self)

    def __int__(self) -> int:
        # Deprecated since cuda-bindings 12.9.1 / 13.0.0 ("Using int(cuda_obj) ... is deprecated and subject to
        # future removal; use cuda.bindings.utils.get_cuda_native_handle"); the real 13.5.0 still returns it silently.
        if self.device is not None:
            self.device.counts["int()"] += 1
            if self.device.strict_handles:
                raise TypeError(f"int({type(self).__name__}) was removed: use cuda.bindings.utils.get_cuda_native_handle (emulated future release)")
        return self._value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Handle) and type(other) is type(self) and other._value == self._value

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._value))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._value:#x}>"


@dataclass
class cudaDeviceProp:  # noqa: N801 - cuda-python's name
    name: bytes
    major: int
    minor: int
    totalGlobalMem: int  # noqa: N815


def _raw(device: Device, value: Any) -> int:
    """A stream/graph/event argument as cuda-python accepts it: None, a handle object or an int."""
    if value is None:
        return 0
    if isinstance(value, _Handle):
        return value._value
    if isinstance(value, (int, np.integer)):
        return int(value)
    raise TypeError(f"Argument must be a cuda-python handle or an int, got {type(value).__name__}")


def _pointer(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return int(value.ctypes.data)
    if isinstance(value, (int, np.integer)):
        return int(value)
    raise TypeError(f"expected an address (int) or a numpy array, got {type(value).__name__}")


def _host_bytes(addr: int, nbytes: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(addr)) if nbytes else np.zeros(0, np.uint8)


def runtime_module(device: Device, version: str, name: str = "cuda.bindings.runtime") -> types.ModuleType:
    """``cuda.bindings.runtime`` of cuda-bindings ``version``, bound to ``device``."""
    api = cuda_releases()[version]
    mod = types.ModuleType(name, f"Emulated cuda.bindings.runtime of cuda-bindings {version} ({api['source']})")
    enums = {n: int_enum(n, members, name) for n, members in api["enums"].items()}
    err = enums["cudaError_t"]
    kinds = enums["cudaMemcpyKind"]
    if device.err is None:  # the first module bound to the device gives it its error and mode enums
        device.err, device.modes = err, enums["cudaStreamCaptureMode"]
    handle_types = {n: type(n, (_Handle,), {"device": device, "__module__": name}) for n in ("cudaStream_t", "cudaGraph_t", "cudaGraphExec_t", "cudaEvent_t")}
    stream_t, graph_t, exec_t, event_t = (handle_types[n] for n in ("cudaStream_t", "cudaGraph_t", "cudaGraphExec_t", "cudaEvent_t"))

    def arity(fn: str) -> int:
        return max(1, len(api["functions"][fn]["returns"]))

    def fail(fn: str, code: int) -> tuple:
        return (err(int(code)), *([None] * (arity(fn) - 1)))

    def ok(*values: Any) -> tuple:
        return (err.cudaSuccess, *values)

    def needs_context(fn: Callable[..., tuple]) -> Callable[..., tuple]:
        def wrapper(*args: Any) -> tuple:
            if (bad := device.context_error()) is not None:
                return fail(fn.__name__, bad)
            return fn(*args)

        wrapper.__name__ = fn.__name__
        wrapper.__doc__ = api["functions"][fn.__name__]["signature"]
        return wrapper

    # errors and versions: no context needed
    def cudaGetErrorName(error: Any) -> tuple:  # noqa: N802
        return ok(err(int(error)).name.encode())

    def cudaGetErrorString(error: Any) -> tuple:  # noqa: N802
        texts = {
            err.cudaErrorInsufficientDriver: "CUDA driver version is insufficient for CUDA runtime version",
            err.cudaErrorNoDevice: "no CUDA-capable device is detected",
            err.cudaErrorStreamCaptureUnsupported: "operation not permitted when stream is capturing",
            err.cudaErrorStreamCaptureInvalidated: "operation failed due to a previous error during capture",
            err.cudaErrorStreamCaptureWrongThread: "attempt to terminate a thread-local capture sequence from another thread",
        }
        return ok(texts.get(err(int(error)), err(int(error)).name).encode())

    def cudaDriverGetVersion() -> tuple:  # noqa: N802
        return ok(device.machine.driver_version)

    def cudaRuntimeGetVersion() -> tuple:  # noqa: N802
        return ok(device.runtime_version)

    def cudaThreadExchangeStreamCaptureMode(mode: Any) -> tuple:  # noqa: N802
        return ok(enums["cudaStreamCaptureMode"](int(device.set_thread_mode(int(mode)))))

    def cudaGetLastError() -> tuple:  # noqa: N802
        return ok()

    # device
    @needs_context
    def cudaGetDeviceCount() -> tuple:  # noqa: N802
        return ok(device.machine.devices)

    @needs_context
    def cudaSetDevice(dev: int) -> tuple:  # noqa: N802
        return ok() if 0 <= dev < device.machine.devices else fail("cudaSetDevice", err.cudaErrorInvalidDevice)

    @needs_context
    def cudaGetDevice() -> tuple:  # noqa: N802
        return ok(0)

    @needs_context
    def cudaGetDeviceProperties(dev: int) -> tuple:  # noqa: N802
        if not 0 <= dev < device.machine.devices:
            return fail("cudaGetDeviceProperties", err.cudaErrorInvalidDevice)
        major, minor = device.machine.compute_capability
        return ok(cudaDeviceProp(device.machine.name.encode(), major, minor, device.machine.memory_bytes))

    @needs_context
    def cudaMemGetInfo() -> tuple:  # noqa: N802
        used = sum(a.nbytes for a in device.allocations.values())
        return ok(device.machine.memory_bytes - used, device.machine.memory_bytes)

    @needs_context
    def cudaDeviceSynchronize() -> tuple:  # noqa: N802
        if (bad := device.prohibited("cudaDeviceSynchronize")) is not None:
            return fail("cudaDeviceSynchronize", bad)
        device.synchronize_all()
        return ok()

    # memory
    def cudaMalloc(size: int) -> tuple:  # noqa: N802
        code, addr = device.malloc(int(size))
        return ok(addr) if code == err.cudaSuccess else fail("cudaMalloc", code)

    def cudaFree(ptr: Any) -> tuple:  # noqa: N802
        code = device.free(_pointer(ptr))
        return ok() if code == err.cudaSuccess else fail("cudaFree", code)

    def _pinned(size: int, fn: str) -> tuple:
        if (bad := device.context_error()) is not None or (bad := device.prohibited(fn)) is not None:
            return fail(fn, bad)
        array = np.zeros(int(size) + ALIGNMENT, dtype=np.uint8)
        addr = -(-array.ctypes.data // ALIGNMENT) * ALIGNMENT
        device.pinned[addr] = Allocation(addr, int(size), array, _caller(), fn)
        return ok(addr)

    def cudaMallocHost(size: int) -> tuple:  # noqa: N802
        return _pinned(size, "cudaMallocHost")

    def cudaHostAlloc(size: int, flags: int) -> tuple:  # noqa: N802
        return _pinned(size, "cudaHostAlloc")

    @needs_context
    def cudaFreeHost(ptr: Any) -> tuple:  # noqa: N802
        if (bad := device.prohibited("cudaFreeHost")) is not None:
            return fail("cudaFreeHost", bad)
        addr = _pointer(ptr)
        if addr not in device.pinned:
            return fail("cudaFreeHost", err.cudaErrorInvalidValue)
        device.synchronize_all()
        del device.pinned[addr]
        return ok()

    def _is_pinned(addr: int, nbytes: int) -> bool:
        return any(a.base <= addr and addr + nbytes <= a.base + a.nbytes for a in device.pinned.values())

    def _copy_op(dst: int, src: int, count: int, kind: int, label: str) -> Op:
        """The copy as stream work; direction mismatches are undefined behaviour in CUDA, so they raise."""
        kind = kinds(int(kind))
        if kind == kinds.cudaMemcpyDefault or kind == kinds.cudaMemcpyHostToHost:
            raise NotEmulated(f"{label} with {kind.name} is not emulated")
        d_dev, s_dev = kind in (kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToDevice), kind in (kinds.cudaMemcpyDeviceToHost, kinds.cudaMemcpyDeviceToDevice)
        for addr, on_device, role in ((dst, d_dev, "destination"), (src, s_dev, "source")):
            if device.is_device(addr) != on_device:
                raise EmulationError(f"{label} {kind.name}: the {role} {addr:#x} is {'a device' if device.is_device(addr) else 'a host'} address (undefined behaviour in CUDA)")
        spans = []
        if d_dev:
            spans.append(device.span(dst, count, True, label))
        if s_dev:
            spans.append(device.span(src, count, False, label))
        name = {kinds.cudaMemcpyHostToDevice: "HtoD", kinds.cudaMemcpyDeviceToHost: "DtoH", kinds.cudaMemcpyDeviceToDevice: "DtoD"}[kind]
        staged = None
        if kind == kinds.cudaMemcpyHostToDevice and not _is_pinned(src, count):
            staged = _host_bytes(src, count).copy()  # pageable source: staged at the call
            device.counts["HtoD pageable bytes"] += count

        def run() -> None:
            device.counts[name] += 1
            data = staged if staged is not None else (device.view(spans[-1]) if s_dev else _host_bytes(src, count))
            target = device.view(spans[0]) if d_dev else _host_bytes(dst, count)
            target[:] = data

        return Op(f"{label} {name} of {count} bytes", run, tuple(spans))

    def cudaMemcpyAsync(dst: Any, src: Any, count: int, kind: Any, stream: Any) -> tuple:  # noqa: N802
        if (bad := device.context_error()) is not None:
            return fail("cudaMemcpyAsync", bad)
        s = _raw(device, stream)
        op = _copy_op(_pointer(dst), _pointer(src), int(count), kind, "cudaMemcpyAsync")
        if s in device.captures and any(not device.is_device(a) and not _is_pinned(a, int(count)) for a in (_pointer(dst), _pointer(src))):
            raise UndocumentedBehaviour("cudaMemcpyAsync with pageable host memory inside a stream capture: what CUDA records is not documented; use pinned memory (cudaMallocHost)")
        return (err(int(device.enqueue(s, op))),)

    @needs_context
    def cudaMemcpy(dst: Any, src: Any, count: int, kind: Any) -> tuple:  # noqa: N802
        if (bad := device.prohibited("cudaMemcpy")) is not None:
            return fail("cudaMemcpy", bad)
        op = _copy_op(_pointer(dst), _pointer(src), int(count), kind, "cudaMemcpy")
        return (err(int(device.enqueue(0, op))),)  # the legacy stream: ordered after all work, synchronous

    def cudaMemsetAsync(ptr: Any, value: int, count: int, stream: Any) -> tuple:  # noqa: N802
        if (bad := device.context_error()) is not None:
            return fail("cudaMemsetAsync", bad)
        span = device.span(_pointer(ptr), int(count), True, "cudaMemsetAsync")

        def run() -> None:
            device.view(span)[:] = np.uint8(value & 0xFF)

        return (err(int(device.enqueue(_raw(device, stream), Op("cudaMemsetAsync", run, (span,))))),)

    # streams
    @needs_context
    def cudaStreamCreate() -> tuple:  # noqa: N802
        handle = device.new_handle()
        device.queues[handle] = []
        return ok(stream_t(handle))

    @needs_context
    def cudaStreamCreateWithFlags(flags: int) -> tuple:  # noqa: N802
        return cudaStreamCreate()

    @needs_context
    def cudaStreamDestroy(stream: Any) -> tuple:  # noqa: N802
        s = _raw(device, stream)
        if s == 0 or s not in device.queues:
            return fail("cudaStreamDestroy", err.cudaErrorInvalidResourceHandle)
        if s in device.captures:
            return fail("cudaStreamDestroy", err.cudaErrorStreamCaptureUnsupported)
        device.flush(s)  # destroying a stream lets its queued work finish
        del device.queues[s]
        return ok()

    @needs_context
    def cudaStreamSynchronize(stream: Any) -> tuple:  # noqa: N802
        s = _raw(device, stream)
        if (bad := device.stream_error(s)) is not None:
            return fail("cudaStreamSynchronize", bad)
        if s in device.captures:  # "It is invalid to synchronize ... a stream which is being captured"
            device.captures[s].invalidated = device.captures[s].invalidated or "cudaStreamSynchronize on the capturing stream"
            return fail("cudaStreamSynchronize", err.cudaErrorStreamCaptureUnsupported)
        device.flush(s) if s else device.synchronize_all()
        return ok()

    @needs_context
    def cudaStreamQuery(stream: Any) -> tuple:  # noqa: N802
        s = _raw(device, stream)
        return ok() if not device.queues.get(s) else fail("cudaStreamQuery", err.cudaErrorNotReady)

    @needs_context
    def cudaEventCreate() -> tuple:  # noqa: N802
        handle = device.new_handle()
        device.events[handle] = None
        return ok(event_t(handle))

    @needs_context
    def cudaEventCreateWithFlags(flags: int) -> tuple:  # noqa: N802
        return cudaEventCreate()

    @needs_context
    def cudaEventRecord(event: Any, stream: Any) -> tuple:  # noqa: N802
        e, s = _raw(device, event), _raw(device, stream)
        if e not in device.events or s not in device.queues:
            return fail("cudaEventRecord", err.cudaErrorInvalidResourceHandle)
        if s in device.captures:
            raise NotEmulated("cudaEventRecord inside a stream capture is not emulated")
        device.events[e] = (s, device.enqueued[s])
        return ok()

    def _complete(fn: str, e: int, valid: bool) -> tuple:
        """Run the work recorded before event ``e`` (what waiting on it orders); the event must exist."""
        if e not in device.events or not valid:
            return fail(fn, err.cudaErrorInvalidResourceHandle)
        if device.events[e] is not None:
            recorded, position = device.events[e]
            device.flush(recorded, upto=position)
        return ok()

    @needs_context
    def cudaStreamWaitEvent(stream: Any, event: Any, flags: int = 0) -> tuple:  # noqa: N802
        # later work on `stream` is ordered after the recorded work: the emulation runs that work now
        return _complete("cudaStreamWaitEvent", _raw(device, event), _raw(device, stream) in device.queues)

    @needs_context
    def cudaEventSynchronize(event: Any) -> tuple:  # noqa: N802
        return _complete("cudaEventSynchronize", _raw(device, event), True)

    @needs_context
    def cudaEventDestroy(event: Any) -> tuple:  # noqa: N802
        e = _raw(device, event)
        if device.events.pop(e, "missing") == "missing":
            return fail("cudaEventDestroy", err.cudaErrorInvalidResourceHandle)
        return ok()

    # capture and graphs
    @needs_context
    def cudaStreamBeginCapture(stream: Any, mode: Any) -> tuple:  # noqa: N802
        code = device.begin_capture(_raw(device, stream), int(mode))
        return ok() if code == err.cudaSuccess else fail("cudaStreamBeginCapture", code)

    @needs_context
    def cudaStreamEndCapture(stream: Any) -> tuple:  # noqa: N802
        code, handle = device.end_capture(_raw(device, stream))
        return ok(graph_t(handle)) if code == err.cudaSuccess else fail("cudaStreamEndCapture", code)

    @needs_context
    def cudaStreamIsCapturing(stream: Any) -> tuple:  # noqa: N802
        status = enums["cudaStreamCaptureStatus"]
        c = device.captures.get(_raw(device, stream))
        if c is None:
            return ok(status.cudaStreamCaptureStatusNone)
        return ok(status.cudaStreamCaptureStatusInvalidated if c.invalidated else status.cudaStreamCaptureStatusActive)

    @needs_context
    def cudaStreamGetCaptureInfo(stream: Any) -> tuple:  # noqa: N802
        """(status, id, graph, dependencies, [edge data in 13.x,] count): the emulation fills status and id."""
        _, state = cudaStreamIsCapturing(stream)
        c = device.captures.get(_raw(device, stream))
        values = [state, id(c) if c is not None else 0, None, []]
        values += [[]] * (arity("cudaStreamGetCaptureInfo") - 1 - len(values) - 1) + [0]
        return ok(*values)

    @needs_context
    def cudaGraphInstantiate(graph: Any, flags: int) -> tuple:  # noqa: N802
        code, handle = device.instantiate(_raw(device, graph))
        return ok(exec_t(handle)) if code == err.cudaSuccess else fail("cudaGraphInstantiate", code)

    @needs_context
    def cudaGraphLaunch(graph_exec: Any, stream: Any) -> tuple:  # noqa: N802
        return (err(int(device.launch(_raw(device, graph_exec), _raw(device, stream)))),)

    @needs_context
    def cudaGraphExecDestroy(graph_exec: Any) -> tuple:  # noqa: N802
        return (err(int(device.destroy_graph(_raw(device, graph_exec), executable=True))),)

    @needs_context
    def cudaGraphDestroy(graph: Any) -> tuple:  # noqa: N802
        return (err(int(device.destroy_graph(_raw(device, graph), executable=False))),)

    implemented = {n: f for n, f in locals().items() if n.startswith("cuda") and callable(f)}
    missing = set(implemented) - set(api["functions"]) - set(handle_types) - {"cudaDeviceProp"}
    assert not missing, f"the emulation implements {sorted(missing)}, which cuda-bindings {version} does not have"
    for n, f in implemented.items():
        if n in api["functions"]:
            f.__doc__ = api["functions"][n]["signature"]
            setattr(mod, n, f)
    for n, cls in {**enums, **handle_types, "cudaDeviceProp": cudaDeviceProp}.items():
        setattr(mod, n, cls)

    def __getattr__(attr: str) -> Any:  # noqa: N807 - PEP 562
        if attr in api["functions"] or attr in api["classes"]:
            raise NotEmulated(f"{name}.{attr} exists in cuda-bindings {version} but is not emulated")
        raise AttributeError(f"module '{name}' has no attribute '{attr}' (cuda-bindings {version})")

    mod.__getattr__ = __getattr__  # type: ignore[method-assign]
    return mod


def utils_module(device: Device, version: str) -> types.ModuleType:
    """``cuda.bindings.utils``: ``get_cuda_native_handle`` (12.9.1+/13.0+) and, from 13.2, the driver-major check."""
    api = cuda_releases()[version]
    mod = types.ModuleType("cuda.bindings.utils")

    def get_cuda_native_handle(obj: Any) -> int:
        if not isinstance(obj, _Handle):
            raise TypeError("Unknown type: " + str(type(obj)))
        return obj._value

    def warn_if_cuda_major_version_mismatch() -> None:
        built, driver = device.runtime_version // 1000, device.machine.driver_version // 1000
        if built > driver:
            warnings.warn(f"cuda-bindings was built for CUDA major version {built}, but the NVIDIA driver only supports up to CUDA {driver}.", UserWarning, stacklevel=2)

    for n, f in (("get_cuda_native_handle", get_cuda_native_handle), ("warn_if_cuda_major_version_mismatch", warn_if_cuda_major_version_mismatch)):
        if n in api["utils"]:
            setattr(mod, n, f)
    return mod
