"""An emulated ``tensorrt`` module of one TensorRT release, building and running "plans" on the emulated CUDA device.

The module offers exactly the classes, methods, properties and enum members that NVIDIA's
Python bindings of that release define (``data/tensorrt_api.json``, extracted from
``python/src/infer/py*.cpp`` and ``python/src/parsers/pyOnnx.cpp`` at the release's tag): a
name removed in that release (``BuilderFlag.FP16`` in 11.x, ``ICudaEngine.device_memory_size``
in 11.x, ``IExecutionContext.set_device_memory`` before 10.1) raises ``AttributeError``.

Behaviour, each point from NVIDIA's headers/docstrings of the same tag unless marked otherwise:

- **Build**: ``Builder.create_network(flags)`` is strongly typed when the
  ``STRONGLY_TYPED`` bit is set (10.x) and always in 11.x ("The network is always strongly
  typed ... The kSTRONGLY_TYPED flag is deprecated and ignored", NvInfer.h@v11.1:11567);
  ``OnnxParser`` reads the ONNX file (external data included); ``build_serialized_network``
  checks the optimization profiles against the network inputs, reports progress to an
  ``IProgressMonitor`` (returning False cancels), fills the timing cache, and returns a
  "plan": JSON naming the ONNX graph, its I/O, profiles, flags and typing. A precision
  builder flag on a strongly typed network is not documented in the headers: the emulation
  raises :class:`UndocumentedBehaviour` rather than guess.
- **Run**: ``Runtime.deserialize_cuda_engine`` accepts only plans of the same release (None
  and an error log otherwise, as TensorRT does for a foreign plan); an execution context
  executes the ONNX graph with ONNX Runtime on the bound device addresses, as stream work
  on the emulated device. Activation ("device") memory is allocated through the device by
  STATIC/ON_PROFILE_CHANGE contexts and must be given with ``set_device_memory`` /
  ``device_memory`` for USER_MANAGED ones; its size is the graph's intermediate tensors at
  the profile's largest shapes (0 when every node output is a network output).
- **Rules**: tensor addresses must be 256-byte aligned (NvInferRuntime.h@v11.1:4380);
  an output aliasing an input is undocumented (raises); enqueueing is refused (False) without
  shapes, addresses or user-managed memory; the first enqueue after a shape, profile or
  memory change does set-up work that must not be captured (trtexec runs one enqueue before
  capturing "to avoid capturing initialization calls", sampleInference.cpp@v11.1:1338, and
  notes that enqueue "may return false if the current CUDA graph capture fails", :1349):
  inside a capture it invalidates the capture and returns False; a second enqueue of one
  context inside one capture (with ``set_tensor_address`` in between) is documented nowhere
  and raises :class:`UndocumentedBehaviour` unless a test explicitly allows it;
  ``set_optimization_profile_async`` work not ordered before an enqueue on another stream is
  a :class:`Hazard` (NvInferRuntime.h@v11.1:4252).
- **Driver**: creating a ``Builder`` or ``Runtime`` when the emulated driver cannot run the
  release's CUDA major logs the CUDA error and raises pybind11's "factory function returned
  nullptr" TypeError (the factories are ``py::init`` lambdas, pyCore.cpp@v11.1:1785, 1836; when
  TensorRT's creation fails is not documented: this is the emulation's model).
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emulation.api_data import EmulationError, Hazard, NotEmulated, UndocumentedBehaviour, cite, int_enum, restrict, tensorrt_releases
from emulation.cuda_api import ALIGNMENT, Device, Op, Span

PLAN_MAGIC = "trt-bgswap-emulated-plan/1"
TIMING_MAGIC = b"EMULATED-TIMING-CACHE/1\n"
PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4")
NUMPY_OF = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}
_SESSIONS: dict[tuple, Any] = {}


def _session(path: str) -> Any:
    """One ONNX Runtime CPU session per graph file version (tests build many engines from few graphs)."""
    import onnxruntime as ort

    p = Path(path)
    key = (str(p), p.stat().st_mtime_ns, p.stat().st_size)
    if key not in _SESSIONS:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        _SESSIONS[key] = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def read_plan(data: bytes | str | Path) -> dict:
    """The JSON inside an emulated plan (tests inspect what was built: typing, flags, precision)."""
    raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else bytes(data)
    plan = json.loads(raw)
    if plan.get("format") != PLAN_MAGIC:
        raise ValueError("not an emulated TensorRT plan")
    return plan


# --- the ONNX side of a build ---------------------------------------------------------------------


def _onnx_io(model: Any) -> tuple[list[dict], list[dict]]:
    from onnx import helper

    def entry(v: Any) -> dict:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name, "shape": dims}

    inits = {i.name for i in model.graph.initializer}
    return [entry(v) for v in model.graph.input if v.name not in inits], [entry(v) for v in model.graph.output]


def _float_types(model: Any) -> list[str]:
    """Floating types the graph computes in (initializers, Cast targets, I/O): what a strongly typed build follows."""
    from onnx import TensorProto, helper

    seen = {helper.tensor_dtype_to_np_dtype(i.data_type).name for i in model.graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)}
    for node in model.graph.node:
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            if to in (TensorProto.FLOAT, TensorProto.FLOAT16):
                seen.add(helper.tensor_dtype_to_np_dtype(to).name)
    for v in [*model.graph.input, *model.graph.output]:
        if v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            seen.add(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name)
    return sorted(seen)


def _activation_bytes(path: str, shapes: Mapping[str, Sequence[int]]) -> int:
    """Bytes of every intermediate (non-I/O) tensor at ``shapes``: the emulated activation memory."""
    import onnx
    from onnx import helper, shape_inference

    model = onnx.load(path, load_external_data=False)
    for v in model.graph.input:
        if v.name in shapes:
            dims = v.type.tensor_type.shape.dim
            for d, n in zip(dims, shapes[v.name]):
                d.ClearField("dim_param")
                d.dim_value = int(n)
    io = {v.name for v in [*model.graph.input, *model.graph.output]}
    inferred = shape_inference.infer_shapes(model, strict_mode=False)
    total = 0
    for v in inferred.graph.value_info:
        if v.name in io:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).itemsize if v.type.tensor_type.elem_type else 4
        total += int(np.prod(dims, dtype=np.int64)) * itemsize if all(dims) else 1024
    produced = {o for n in model.graph.node for o in n.output}
    if produced and produced <= io:
        return 0
    return -(-total // ALIGNMENT) * ALIGNMENT


# --- implementation classes (the per-release classes restrict them to the release's names) ---------


class _Base:
    _trt: Any = None  # the emulated module this class belongs to
    _attrs: tuple[str, ...] = ()  # public instance attributes the implementation sets (part of the release's API)

    @property
    def _device(self) -> Device:
        return self._trt._device


class _Dims(tuple):
    def __new__(cls, values: Sequence[int] = ()) -> "_Dims":
        return super().__new__(cls, (int(v) for v in values))


class _HostMemory(bytes):
    @property
    def nbytes(self) -> int:
        return len(self)

    @property
    def dtype(self) -> Any:
        return _trt_of(self).DataType.UINT8


def _trt_of(obj: Any) -> Any:
    return type(obj)._trt


class _ILogger(_Base):
    def __init__(self) -> None:
        pass

    def log(self, severity: Any, msg: str) -> None:
        raise RuntimeError('Tried to call pure virtual function "ILogger::log"')


class _Logger(_ILogger):
    _attrs = ("min_severity",)

    def __init__(self, min_severity: Any = None) -> None:
        super().__init__()
        self.min_severity = min_severity if min_severity is not None else self._trt.ILogger.Severity.WARNING
        self._messages: list[tuple[Any, str]] = []

    def log(self, severity: Any, msg: str) -> None:
        self._messages.append((severity, msg))
        if int(severity) <= int(self.min_severity):
            print(f"[TRT] [{severity.name[0]}] {msg}", file=sys.stderr)


def _log(logger: Any, severity: str, msg: str) -> None:
    logger.log(type(logger)._trt.ILogger.Severity[severity], msg)


def _check_cuda(trt: Any, logger: Any) -> None:
    device = trt._device
    if device.machine.driver_version // 1000 < trt._cuda_major or device.machine.devices < 1:
        code = 35 if device.machine.devices else 100
        _log(logger, "ERROR", f"CUDA initialization failure with error: {code}. Please check your CUDA installation")
        raise TypeError("pybind11::init(): factory function returned nullptr")


class _ITensor(_Base):
    _attrs = ("is_network_input", "is_network_output")

    def __init__(self, entry: dict, is_input: bool) -> None:
        self._entry = entry
        self.is_network_input, self.is_network_output = is_input, not is_input

    @property
    def name(self) -> str:
        return self._entry["name"]

    @property
    def shape(self) -> Any:
        return self._trt.Dims(self._entry["shape"])

    @property
    def dtype(self) -> Any:
        return _datatype(self._trt, self._entry["dtype"])


def _datatype(trt: Any, numpy_name: str) -> Any:
    for member, np_type in NUMPY_OF.items():
        if np.dtype(np_type).name == numpy_name:
            return trt.DataType[member]
    raise NotEmulated(f"a tensor of numpy type {numpy_name} has no emulated TensorRT DataType")


class _INetworkDefinition(_Base):
    _attrs = ("flags", "name")

    def __init__(self, builder: Any, flags: int) -> None:
        self._builder = builder
        self.flags = flags
        self._onnx: str | None = None
        self._inputs: list[dict] = []
        self._outputs: list[dict] = []
        self._model: Any = None
        self.name = "Unnamed Network 0"

    @property
    def _strongly_typed(self) -> bool:
        trt = self._trt
        if trt._major >= 11:
            return True
        return bool(self.flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))

    def get_flag(self, flag: Any) -> bool:
        if self._trt._major >= 11 and flag == self._trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED:
            return True
        return bool(self.flags & (1 << int(flag)))

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    @property
    def num_layers(self) -> int:
        return len(self._model.graph.node) if self._model is not None else 0

    def get_input(self, index: int) -> Any:
        return self._trt.ITensor(self._inputs[index], True)

    def get_output(self, index: int) -> Any:
        return self._trt.ITensor(self._outputs[index], False)


class _IProgressMonitor(_Base):
    def __init__(self) -> None:
        pass

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::phaseStart"')

    def step_complete(self, phase_name: str, step: int) -> bool:
        raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::stepComplete"')

    def phase_finish(self, phase_name: str) -> None:
        raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::phaseFinish"')


class _ParserError(_Base):
    def __init__(self, desc: str) -> None:
        self._desc = desc

    def desc(self) -> str:
        return self._desc

    def code(self) -> Any:
        return self._trt.ErrorCode.MODEL_DESERIALIZE_FAILED

    def __str__(self) -> str:
        return f"In node -1 with name:  and operator:  (parse): MODEL_DESERIALIZE_FAILED: {self._desc}"


class _OnnxParser(_Base):
    def __init__(self, network: Any, logger: Any) -> None:
        self._network, self._logger = network, logger
        self._errors: list[str] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> Any:
        return self._trt.ParserError(self._errors[index])

    def clear_errors(self) -> None:
        self._errors.clear()

    def parse_from_file(self, model: str) -> bool:
        import onnx

        try:
            loaded = onnx.load(model)  # external data beside the file, as TensorRT's parser resolves it
        except Exception as e:  # noqa: BLE001 - the parser reports, it does not raise
            self._errors.append(f"Failed to load the ONNX model {model}: {e}")
            return False
        net = self._network
        net._onnx, net._model = str(Path(model).resolve()), loaded
        net._inputs, net._outputs = _onnx_io(loaded)
        return True


class _IOptimizationProfile(_Base):
    def __init__(self) -> None:
        self._shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input: str, min: Sequence[int], opt: Sequence[int], max: Sequence[int]) -> None:  # noqa: A002 - TensorRT's names
        lo, mid, hi = (tuple(int(v) for v in s) for s in (min, opt, max))
        if not len(lo) == len(mid) == len(hi) or any(not a <= b <= c for a, b, c in zip(lo, mid, hi)) or any(v < 0 for v in lo):
            raise RuntimeError("Shape provided for min is inconsistent with other shapes.")  # pyCore.cpp: PY_ASSERT_RUNTIME_ERROR
        self._shapes[input] = (lo, mid, hi)

    def get_shape(self, input: str) -> list:  # noqa: A002
        return [self._trt.Dims(s) for s in self._shapes.get(input, ())]

    def __bool__(self) -> bool:
        return True


class _ITimingCache(_Base):
    def __init__(self, entries: dict[str, str], origin: dict) -> None:
        self._entries, self._origin = dict(entries), origin

    def serialize(self) -> Any:
        body = json.dumps({"origin": self._origin, "entries": self._entries}, sort_keys=True).encode()
        return self._trt.IHostMemory(TIMING_MAGIC + body)

    def combine(self, input_cache: Any, ignore_mismatch: bool) -> bool:
        if input_cache._origin != self._origin and not ignore_mismatch:
            return False
        self._entries.update(input_cache._entries)
        return True

    def reset(self) -> bool:
        self._entries.clear()
        return True


class _IBuilderConfig(_Base):
    _attrs = ("flags", "builder_optimization_level", "progress_monitor", "profiling_verbosity")

    def __init__(self, builder: Any) -> None:
        self._builder = builder
        self.flags = 0
        self._pools: dict[int, int] = {}
        self.builder_optimization_level = 3
        self._profiles: list[Any] = []
        self._timing: Any = None
        self.progress_monitor: Any = None
        self.profiling_verbosity = None

    def set_flag(self, flag: Any) -> None:
        self.flags |= 1 << int(flag)

    def clear_flag(self, flag: Any) -> None:
        self.flags &= ~(1 << int(flag))

    def get_flag(self, flag: Any) -> bool:
        return bool(self.flags & (1 << int(flag)))

    def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
        self._pools[int(pool)] = int(pool_size)

    def get_memory_pool_limit(self, pool: Any) -> int:
        return self._pools.get(int(pool), self._trt._device.machine.memory_bytes)

    def add_optimization_profile(self, profile: Any) -> int:
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    def create_timing_cache(self, serialized_timing_cache: bytes) -> Any:
        blob = bytes(serialized_timing_cache)
        origin = self._trt._origin()
        if not blob:
            return self._trt.ITimingCache({}, origin)
        if not blob.startswith(TIMING_MAGIC):
            raise UndocumentedBehaviour("create_timing_cache with bytes that are no timing cache: what TensorRT does is not documented")
        body = json.loads(blob[len(TIMING_MAGIC) :])
        return self._trt.ITimingCache(body["entries"], body["origin"])

    def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
        # "A failure will be reported if the CUDA device property in the provided cache is different" (NvInfer.h@v11.1)
        if cache._origin != self._trt._origin() and not ignore_mismatch:
            _log(self._builder.logger, "WARNING", "Timing cache was created by another TensorRT version or device; not used")
            return False
        self._timing = cache
        return True

    def get_timing_cache(self) -> Any:
        return self._timing


class _Builder(_Base):
    _attrs = ("logger", "max_threads")

    def __init__(self, logger: Any) -> None:
        _check_cuda(self._trt, logger)
        self.logger = logger
        self.max_threads = 1

    def create_network(self, flags: int = 0) -> Any:
        return self._trt.INetworkDefinition(self, int(flags))

    def create_builder_config(self) -> Any:
        return self._trt.IBuilderConfig(self)

    def create_optimization_profile(self) -> Any:
        return self._trt.IOptimizationProfile()

    @property
    def platform_has_fast_fp16(self) -> bool:
        return self._trt._device.machine.compute_capability >= (5, 3)

    @property
    def platform_has_tf32(self) -> bool:
        return self._trt._device.machine.compute_capability >= (8, 0)

    def build_serialized_network(self, network: Any, config: Any) -> Any:
        trt = self._trt
        if network._model is None:
            _log(self.logger, "ERROR", "Network has no inputs; parse a model first")
            return None
        set_flags = [m.name for m in trt.BuilderFlag if config.get_flag(m)]
        precision = sorted(set(set_flags) & set(PRECISION_FLAGS))
        if network._strongly_typed and precision:
            raise UndocumentedBehaviour(f"precision builder flags {precision} on a strongly typed network: NVIDIA's headers do not say what TensorRT {trt.__version__} does")
        profiles = []
        for p in config._profiles:
            profiles.append([{"name": n, "min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in p._shapes.items()])
        problem = _profile_problem(network._inputs, profiles)
        if problem:
            _log(self.logger, "ERROR", problem)
            return None
        monitor = config.progress_monitor
        nodes = network._model.graph.node
        if monitor is not None:
            monitor.phase_start("Building engine", None, len(nodes))
            for i in range(len(nodes)):
                if not monitor.step_complete("Building engine", i):
                    monitor.phase_finish("Building engine")
                    _log(self.logger, "ERROR", "Build was cancelled by the progress monitor")
                    return None
            monitor.phase_finish("Building engine")
        hits = 0
        if config._timing is not None:
            for node in nodes:
                key = f"{node.op_type}:{','.join(node.input)}"
                hits += key in config._timing._entries
                config._timing._entries[key] = "emulated tactic"
        max_shapes = [{t["name"]: t["max"] for t in p} for p in profiles] or [{}]
        with_static = [{**{i["name"]: i["shape"] for i in network._inputs if -1 not in i["shape"]}, **m} for m in max_shapes]
        plan = {
            "format": PLAN_MAGIC,
            "tensorrt": trt.__version__,
            "onnx": network._onnx,
            "onnx_sha256": hashlib.sha256(Path(network._onnx).read_bytes()).hexdigest(),
            "inputs": network._inputs,
            "outputs": network._outputs,
            "profiles": profiles or [[]],
            "flags": set_flags,
            "strongly_typed": network._strongly_typed,
            "compute_types": _float_types(network._model) if network._strongly_typed else (["float16", "float32"] if "FP16" in set_flags else ["float32"]),
            "activation_bytes": [_activation_bytes(network._onnx, s) for s in with_static],
            "workspace": config._pools.get(int(trt.MemoryPoolType.WORKSPACE)),
            "opt_level": config.builder_optimization_level,
            "timing_cache_hits": hits,
        }
        return trt.IHostMemory(json.dumps(plan).encode())


def _profile_problem(inputs: list[dict], profiles: list[list[dict]]) -> str | None:
    dynamic = [i for i in inputs if -1 in i["shape"]]
    if dynamic and not profiles:
        return f"Network has dynamic or shape inputs, but no optimization profile has been defined ({dynamic[0]['name']})"
    for index, p in enumerate(profiles):
        given = {t["name"]: t for t in p}
        for i in inputs:
            t = given.get(i["name"])
            if t is None:
                if -1 in i["shape"]:
                    return f"Optimization profile {index} has no shape for dynamic input {i['name']}"
                continue
            for key in ("min", "opt", "max"):
                s = t[key]
                if len(s) != len(i["shape"]) or any(d != -1 and d != v for d, v in zip(i["shape"], s)):
                    return f"Optimization profile {index}: {key} shape {s} of {i['name']} does not fit the network input {i['shape']}"
    return None


class _IRuntimeConfig(_Base):
    def __init__(self) -> None:
        self._strategy = self._trt.ExecutionContextAllocationStrategy.STATIC

    def set_execution_context_allocation_strategy(self, strategy: Any = None) -> None:
        self._strategy = strategy if strategy is not None else self._trt.ExecutionContextAllocationStrategy.STATIC

    def get_execution_context_allocation_strategy(self) -> Any:
        return self._strategy


class _Runtime(_Base):
    _attrs = ("logger",)

    def __init__(self, logger: Any) -> None:
        _check_cuda(self._trt, logger)
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine: Any) -> Any:
        try:
            plan = read_plan(bytes(serialized_engine))
        except (ValueError, UnicodeDecodeError):
            _log(self.logger, "ERROR", "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization assertion failed: magic tag)")
            return None
        if plan["tensorrt"] != self._trt.__version__:
            _log(self.logger, "ERROR", f"IRuntime::deserializeCudaEngine: the plan was built by TensorRT {plan['tensorrt']}, this is {self._trt.__version__}")
            return None
        return self._trt.ICudaEngine(plan, self.logger)


class _ICudaEngine(_Base):
    _attrs = ("name",)

    def __init__(self, plan: dict, logger: Any) -> None:
        self._plan, self._logger = plan, logger
        self._io = [*((t, True) for t in plan["inputs"]), *((t, False) for t in plan["outputs"])]
        self._by_name = {t["name"]: (t, is_input) for t, is_input in self._io}
        self.name = Path(plan["onnx"]).stem

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    def get_tensor_name(self, index: int) -> str:
        return self._io[index][0]["name"]

    def _tensor(self, name: str) -> tuple[dict, bool]:
        if name not in self._by_name:
            raise EmulationError(f"engine {self.name} has no tensor {name!r}")
        return self._by_name[name]

    def get_tensor_mode(self, name: str) -> Any:
        mode = self._trt.TensorIOMode
        if name not in self._by_name:
            return mode.NONE
        return mode.INPUT if self._by_name[name][1] else mode.OUTPUT

    def get_tensor_dtype(self, name: str) -> Any:
        return _datatype(self._trt, self._tensor(name)[0]["dtype"])

    def get_tensor_shape(self, name: str) -> Any:
        return self._trt.Dims(self._tensor(name)[0]["shape"])

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._plan["profiles"])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list:
        t = next((t for t in self._plan["profiles"][profile_index] if t["name"] == name), None)
        if t is None:
            shape = self._tensor(name)[0]["shape"]
            return [self._trt.Dims(shape)] * 3
        return [self._trt.Dims(t[k]) for k in ("min", "opt", "max")]

    @property
    def device_memory_size(self) -> int:
        return max(self._plan["activation_bytes"])

    @property
    def device_memory_size_v2(self) -> int:
        return max(self._plan["activation_bytes"])

    def get_device_memory_size_for_profile(self, profile_index: int) -> int:
        return self._plan["activation_bytes"][profile_index]

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        return self._plan["activation_bytes"][profile_index]

    @property
    def streamable_weights_size(self) -> int:
        return 0

    def create_runtime_config(self) -> Any:
        return self._trt.IRuntimeConfig()

    def create_execution_context(self, strategy: Any = None) -> Any:
        trt = self._trt
        if isinstance(strategy, _IRuntimeConfig):
            strategy = strategy.get_execution_context_allocation_strategy()
        strategy = strategy if strategy is not None else trt.ExecutionContextAllocationStrategy.STATIC
        ctx = trt.IExecutionContext(self, strategy)
        if strategy == trt.ExecutionContextAllocationStrategy.STATIC and not ctx._own_memory():
            return None
        return ctx

    def create_execution_context_without_device_memory(self) -> Any:
        return self.create_execution_context(self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)

    def serialize(self) -> Any:
        return self._trt.IHostMemory(json.dumps(self._plan).encode())


class _IExecutionContext(_Base):
    _attrs = ("engine", "name", "debug_sync")

    def __init__(self, engine: Any, strategy: Any) -> None:
        self.engine = engine
        self._strategy = strategy
        self._profile = 0
        self._shapes: dict[str, tuple[int, ...]] = {t["name"]: tuple(t["shape"]) for t in engine._plan["inputs"] if -1 not in t["shape"]}
        self._addresses: dict[str, int] = {}
        self._memory: tuple[int, int] | None = None  # (address, size) of the activation memory
        self._owned: int | None = None
        self._dirty = True  # set-up pending (first enqueue after creation or a shape/profile/memory change)
        self._profile_switch: tuple[int, int] | None = None  # (stream, position) of the profile change work
        self._out_shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}
        self.name = ""
        self.debug_sync = False

    # memory
    def _needed(self) -> int:
        return self.engine._plan["activation_bytes"][self._profile]

    def _own_memory(self) -> bool:
        need = max(self.engine._plan["activation_bytes"])
        if need == 0:
            self._memory = (0, 0)
            return True
        code, addr = self._device.malloc(need, "TensorRT context activation memory", runtime_major=self._trt._cuda_major)
        if code != 0:
            _log(self.engine._logger, "ERROR", f"Requested amount of GPU memory ({need} bytes) could not be allocated: CUDA error {int(code)}")
            return False
        self._owned, self._memory = addr, (addr, need)
        weakref.finalize(self, _release, self._device, addr)
        return True

    def _set_memory(self, memory: int, size: int | None) -> None:
        device = self._device
        if memory == 0:
            if self._needed():
                raise EmulationError("set_device_memory(0): only allowed when the reported size is 0 (NvInferRuntime.h@v11.1:4043)")
            self._memory = (0, 0)
            return
        owner = device.owner(memory)
        if owner is None:
            raise Hazard(f"set_device_memory({memory:#x}): not a live device allocation")
        if memory % ALIGNMENT:
            raise EmulationError("set_device_memory: the memory must be aligned with CUDA's memory alignment")
        room = owner.base + owner.nbytes - memory
        size = room if size is None else int(size)
        if size > room:
            raise Hazard(f"set_device_memory: {size} bytes at {memory:#x} overrun the allocation ({room} bytes left)")
        if size < self._needed():
            raise EmulationError(f"set_device_memory: {size} bytes is less than the engine needs ({self._needed()})")
        self._memory = (memory, size)
        self._dirty = True

    def set_device_memory(self, memory: int, size: int) -> None:
        self._set_memory(int(memory), size)

    def _device_memory_setter(self, memory: int) -> None:
        self._set_memory(int(memory), None)

    device_memory = property(None, _device_memory_setter)

    # shapes and profiles
    @property
    def active_optimization_profile(self) -> int:
        return self._profile

    def set_optimization_profile_async(self, profile_index: int, stream_handle: Any) -> bool:
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            _log(self.engine._logger, "ERROR", f"setOptimizationProfileAsync: profile index {profile_index} out of range")
            return False
        stream = _stream(stream_handle)
        if profile_index != self._profile:  # dynamic input shapes must be set again for the new profile
            self._shapes = {t["name"]: tuple(t["shape"]) for t in self.engine._plan["inputs"] if -1 not in t["shape"]}
        self._profile = profile_index
        self._dirty = True
        code = self._device.enqueue(stream, Op(f"{self.engine.name}: optimization profile {profile_index} set-up", lambda: None))
        if code != 0:
            return False
        self._profile_switch = (stream, self._device.enqueued[stream])
        return True

    def _profile_range(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self._profile)
        return tuple(lo), tuple(hi)

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        t, is_input = self.engine._by_name.get(name, (None, False))
        shape = tuple(int(v) for v in shape)
        if t is None or not is_input:
            _log(self.engine._logger, "ERROR", f"setInputShape: {name!r} is not an input tensor")
            return False
        lo, hi = self._profile_range(name)
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            _log(self.engine._logger, "ERROR", f"setInputShape: {name} {shape} is outside profile {self._profile} [{lo}, {hi}]")
            return False
        if self._shapes.get(name) != shape:
            self._shapes[name] = shape
            self._dirty = True
        return True

    def _input_shapes(self) -> dict[str, tuple[int, ...]] | None:
        names = [t["name"] for t in self.engine._plan["inputs"]]
        return {n: self._shapes[n] for n in names} if all(n in self._shapes for n in names) else None

    def _output_shapes(self, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """What TensorRT's shape inference reports, obtained by running the graph once on zeros (cached)."""
        key = tuple(sorted(inputs.items()))
        if key not in self._out_shapes:
            plan = self.engine._plan
            feeds = {t["name"]: np.zeros(inputs[t["name"]], dtype=t["dtype"]) for t in plan["inputs"]}
            outs = _session(plan["onnx"]).run([t["name"] for t in plan["outputs"]], feeds)
            self._out_shapes[key] = {t["name"]: tuple(o.shape) for t, o in zip(plan["outputs"], outs)}
        return self._out_shapes[key]

    def get_tensor_shape(self, name: str) -> Any:
        t, is_input = self.engine._tensor(name)
        if is_input:
            return self._trt.Dims(self._shapes.get(name, t["shape"]))
        inputs = self._input_shapes()
        return self._trt.Dims(self._output_shapes(inputs)[name] if inputs is not None else t["shape"])

    @property
    def all_binding_shapes_specified(self) -> bool:
        return self._input_shapes() is not None

    # addresses
    def set_tensor_address(self, name: str, memory: int) -> bool:
        memory = int(memory)
        if name not in self.engine._by_name:
            _log(self.engine._logger, "ERROR", f"setTensorAddress: {name!r} is not an I/O tensor")
            return False
        if memory % ALIGNMENT:
            _log(self.engine._logger, "ERROR", f"setTensorAddress: {name} address {memory:#x} is not 256-byte aligned")
            return False
        self._addresses[name] = memory
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    # execution
    def execute_async_v3(self, stream_handle: Any) -> bool:
        device, plan, logger = self._device, self.engine._plan, self.engine._logger
        stream = _stream(stream_handle)
        inputs = self._input_shapes()
        if inputs is None:
            _log(logger, "ERROR", "enqueueV3: not all input shapes are specified")
            return False
        if self._memory is None and self._strategy == self._trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE and not self._own_memory():
            return False  # ON_PROFILE_CHANGE allocates at the first enqueue: a cudaMalloc, prohibited inside a capture
        if self._memory is None and self._needed() > 0:  # "Setting memory to nullptr is acceptable if the reported size is 0"
            _log(logger, "ERROR", "enqueueV3: the context has no device memory (USER_MANAGED: call set_device_memory first)")
            return False
        missing = [n for n in self.engine._by_name if not self._addresses.get(n)]
        if missing:
            _log(logger, "ERROR", f"enqueueV3: no address set for {missing}")
            return False
        if self._profile_switch is not None:
            switch_stream, position = self._profile_switch
            if switch_stream != stream and device.executed[switch_stream] < position:
                raise Hazard("set_optimization_profile_async work on another stream is not ordered before this enqueue (NvInferRuntime.h@v11.1:4252)")
        shapes = {**inputs, **self._output_shapes(inputs)}
        dtypes = {t["name"]: np.dtype(t["dtype"]) for t in [*plan["inputs"], *plan["outputs"]]}
        spans = {}
        for t, is_input in self.engine._io:
            n = t["name"]
            nbytes = int(np.prod(shapes[n], dtype=np.int64)) * dtypes[n].itemsize
            spans[n] = device.span(self._addresses[n], max(nbytes, 1), not is_input, f"{self.engine.name}.{n}")
        for i in (t["name"] for t in plan["inputs"]):
            for o in (t["name"] for t in plan["outputs"]):
                if spans[i].overlaps(Span(spans[o].base, spans[o].start, spans[o].end, True)):
                    raise UndocumentedBehaviour(f"{self.engine.name}: output {o} aliases input {i}; TensorRT documents no in-place execution")
        scratch = ()
        if self._memory is not None and self._memory[1]:
            scratch = (device.span(self._memory[0], self._needed(), True, f"{self.engine.name} activation memory"),)
        capture = device.captures.get(stream)
        if capture is not None:
            if self._dirty and device.prohibited(f"{self.engine.name}: TensorRT's set-up on the first enqueue after a shape, profile or memory change") is not None:
                return False
            if capture.invalidated:
                return False
            capture.enqueued_contexts[id(self)] += 1
            if capture.enqueued_contexts[id(self)] > 1 and "multiple enqueues per capture" not in self._trt._allowed:
                raise UndocumentedBehaviour(
                    f"{self.engine.name}: a second execute_async_v3 of one execution context inside one CUDA graph capture; "
                    "whether TensorRT bakes each enqueue's tensor addresses into the graph is not documented (NVIDIA's demo and trtexec "
                    "capture one enqueue per graph on fixed addresses)"
                )
        self._dirty = False
        names_out = [t["name"] for t in plan["outputs"]]
        in_spans = {t["name"]: spans[t["name"]] for t in plan["inputs"]}
        out_spans = {n: spans[n] for n in names_out}

        def run() -> None:
            feeds = {n: device.view(s).view(dtypes[n]).reshape(shapes[n]).copy() for n, s in in_spans.items()}
            for n, value in zip(names_out, _session(plan["onnx"]).run(names_out, feeds)):
                value = np.ascontiguousarray(value, dtype=dtypes[n])
                if value.shape != shapes[n]:
                    raise EmulationError(f"{self.engine.name}.{n}: ONNX Runtime produced {value.shape}, the context reported {shapes[n]}")
                device.view(out_spans[n])[: value.nbytes] = value.view(np.uint8).reshape(-1)
            device.counts["execute"] += 1

        code = device.enqueue(stream, Op(f"{self.engine.name}: execute_async_v3", run, (*spans.values(), *scratch), context=id(self)))
        return code == 0


def _release(device: Device, addr: int) -> None:
    """A context's own activation memory goes when the context does (errors can only be logged by TensorRT)."""
    if addr in device.allocations:
        device.free(addr, "TensorRT context destruction")


def _stream(handle: Any) -> int:
    """A stream argument as pybind11 converts it to ``size_t``: an int, or anything with ``__int__``."""
    if isinstance(handle, (int, np.integer)):
        return int(handle)
    return int(handle)  # pybind11's implicit conversion calls __int__ (a cuda-python handle's, counted by the emulation)


def _nptype(trt: Any) -> Any:
    def nptype(trt_type: Any) -> Any:
        name = trt.DataType(int(trt_type)).name
        if name not in NUMPY_OF:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return NUMPY_OF[name]

    return nptype


def _volume(iterable: Any) -> int:
    vol = 1
    for elem in iterable:
        vol *= elem
    return vol


IMPLEMENTATIONS: dict[str, type] = {
    "ILogger": _ILogger,
    "Logger": _Logger,
    "ITensor": _ITensor,
    "INetworkDefinition": _INetworkDefinition,
    "ParserError": _ParserError,
    "IProgressMonitor": _IProgressMonitor,
    "OnnxParser": _OnnxParser,
    "IOptimizationProfile": _IOptimizationProfile,
    "ITimingCache": _ITimingCache,
    "IBuilderConfig": _IBuilderConfig,
    "Builder": _Builder,
    "IRuntimeConfig": _IRuntimeConfig,
    "Runtime": _Runtime,
    "ICudaEngine": _ICudaEngine,
    "IExecutionContext": _IExecutionContext,
    "IHostMemory": _HostMemory,
    "Dims": _Dims,
}


class _Unmodelled:
    """A binding class the emulation does not model: constructing it raises :class:`NotEmulated`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotEmulated(f"tensorrt.{type(self).__name__} exists in this release but is not emulated")


def tensorrt_module(device: Device, version: str, cuda_major: int, allowed: frozenset[str] = frozenset()) -> types.ModuleType:
    """The ``tensorrt`` module of TensorRT ``version`` (built for CUDA ``cuda_major``), bound to ``device``.

    ``allowed`` lists undocumented behaviours a test opts into knowingly (see :class:`UndocumentedBehaviour`).
    """
    api = tensorrt_releases()[version]
    tag = api["tag"]
    mod = types.ModuleType("tensorrt", f"Emulated TensorRT {version} (names from NVIDIA/TensorRT@{tag})")
    mod.__version__ = version
    mod._device, mod._cuda_major, mod._major, mod._allowed = device, cuda_major, int(version.split(".")[0]), allowed
    mod._origin = lambda: {"tensorrt": version, "device": list(device.machine.compute_capability)}
    mod._api = api
    for name, entry in api["enums"].items():
        enum_cls = int_enum(name.split(".")[-1], {m: v["value"] for m, v in entry["members"].items()}, "tensorrt")
        if "." in name:
            continue  # nested: attached to its class below
        setattr(mod, name, enum_cls)
    for name, entry in api["classes"].items():
        where = cite(entry, tag)
        impl = IMPLEMENTATIONS.get(name)
        if impl is None:
            impl = type(f"_{name}", (_Unmodelled,), {})
        cls = restrict(impl, name, entry["members"], f"TensorRT {version}", where)
        cls._trt = mod
        setattr(mod, name, cls)
    severity = int_enum("Severity", {m: v["value"] for m, v in api["enums"]["ILogger.Severity"]["members"].items()}, "tensorrt")
    for owner in (mod.ILogger, mod.Logger):  # pyCore.cpp: .export_values(); __init__.py: Logger.Severity = ILogger.Severity
        owner.Severity = severity
        for member in severity:
            setattr(owner, member.name, member)
    for name, entry in api["module"].items():
        if entry.get("kind") == "attr" and "value" in entry:
            setattr(mod, name, mod.DataType[entry["value"].lstrip("k")])
    mod.nptype, mod.volume = _nptype(mod), _volume
    return mod


def emulated_plan(trt: Any, onnx_path: Path, profiles: Sequence[Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]], strongly_typed: bool = True) -> bytes:
    """Build a plan through the emulated builder API (what a correct TensorRT build of ``onnx_path`` would produce)."""
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and trt._major < 11:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EmulationError(f"{onnx_path}: {[str(parser.get_error(i)) for i in range(parser.num_errors)]}")
    config = builder.create_builder_config()
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EmulationError(f"{onnx_path}: emulated build failed: {[m for _, m in logger._messages]}")
    return bytes(serialized)
