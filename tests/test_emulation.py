"""tests/emulation: the stand-in for tensorrt and cuda-python has each release's names and NVIDIA's documented rules.

The TensorRT tests are only as good as this emulation, so it is checked here against the facts
read from NVIDIA's sources (tests/emulation/SOURCES.md): which names each release has, the
driver/runtime version rule, asynchronous streams, the stream-capture interaction modes, and
the TensorRT execution rules the emulation enforces. None of this touches the product.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from emulation import STACKS, Emulation, Hazard, NotEmulated, StackSpec, UndocumentedBehaviour, emulate
from emulation.api_data import cuda_releases, tensorrt_releases
from emulation.tensorrt_api import IMPLEMENTATIONS
from onnx import TensorProto, helper, numpy_helper

TRT = {s.tensorrt: s for s in STACKS}
CU12 = StackSpec("10.16.0", "12.9.10", 12, 12080)  # TensorRT 10.16 for CUDA 12 with cuda-bindings 12 on an R570 driver


def spec_for(trt: str = "11.1.0", bindings: str = "13.5.0", driver: int = 13000, trt_cuda: int = 13) -> StackSpec:
    return StackSpec(trt, bindings, trt_cuda, driver)


# --- names: exactly the release's -------------------------------------------------------------


@pytest.mark.parametrize(
    "version, present, absent",
    [
        ("10.0.1", ["BuilderFlag.FP16", "ICudaEngine.device_memory_size", "IExecutionContext.device_memory", "Builder.platform_has_fast_fp16"],
         ["ICudaEngine.device_memory_size_v2", "IExecutionContext.set_device_memory", "ICudaEngine.create_runtime_config"]),
        ("10.16.0", ["BuilderFlag.FP16", "ICudaEngine.device_memory_size", "ICudaEngine.device_memory_size_v2", "IExecutionContext.set_device_memory"],
         ["IBuilderConfig.build_route", "IBuilderConfig.all_build_routes"]),
        ("11.1.0", ["ICudaEngine.device_memory_size_v2", "IExecutionContext.set_device_memory", "BuilderFlag.TF32", "NetworkDefinitionCreationFlag.STRONGLY_TYPED"],
         ["BuilderFlag.FP16", "BuilderFlag.INT8", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "ICudaEngine.device_memory_size",
          "NetworkDefinitionCreationFlag.EXPLICIT_BATCH", "Builder.platform_has_fast_fp16", "IBuilderConfig.int8_calibrator"]),
    ],
)
def test_release_has_exactly_the_names_nvidia_binds(version: str, present: list[str], absent: list[str]) -> None:
    with emulate(TRT[version]) as em:
        import tensorrt as trt

        assert trt is em.trt and trt.__version__ == version
        for dotted in present:
            owner, name = dotted.split(".")
            assert name in dir(getattr(trt, owner)) or hasattr(getattr(trt, owner), name), f"{dotted} must exist in TensorRT {version}"
        for dotted in absent:
            owner, name = dotted.split(".")
            assert not hasattr(getattr(trt, owner), name), f"{dotted} must not exist in TensorRT {version}"


@pytest.mark.parametrize("version", sorted(tensorrt_releases()))
def test_every_bound_name_is_reachable_and_no_other(version: str) -> None:
    """Each class member NVIDIA binds is there (working or raising NotEmulated); implemented names of other releases are not."""
    api = tensorrt_releases()[version]
    spec = StackSpec(version, "13.5.0", 13, 13000)
    with emulate(spec) as em:
        trt = em.trt
        for cls_name, entry in api["classes"].items():
            cls = getattr(trt, cls_name)
            for member in (m for m in entry["members"] if not m.startswith("_")):
                try:
                    getattr(cls, member)
                except NotEmulated:
                    pass
                except AttributeError as e:  # an instance attribute of the implementation: reachable on instances only
                    assert member in getattr(cls, "_attrs", ()), f"{cls_name}.{member} bound in {version} but missing: {e}"
            impl = IMPLEMENTATIONS.get(cls_name)
            if impl is not None:
                for name in (n for n in dir(impl) if not n.startswith("_") and n not in entry["members"]):
                    assert not hasattr(cls, name), f"{cls_name}.{name} is not bound in TensorRT {version} but the emulation offers it"
        for enum_name, entry in api["enums"].items():
            if "." not in enum_name:
                assert sorted(m.name for m in getattr(trt, enum_name)) == sorted(k for k, v in entry["members"].items() if k not in _aliases(entry))


def _aliases(entry: dict) -> set[str]:
    """Enum members that share a value with an earlier-sorted one (an IntEnum keeps them as aliases, not members)."""
    seen: dict[int, str] = {}
    out = set()
    for key, info in sorted(entry["members"].items(), key=lambda kv: (kv[1]["value"] if kv[1]["value"] is not None else 10**6, kv[0])):
        if info["value"] is not None and info["value"] in seen:
            out.add(key)
        elif info["value"] is not None:
            seen[info["value"]] = key
    return out


def test_strongly_typed_flag_moved_and_network_creation_follows_it() -> None:
    """10.x: STRONGLY_TYPED is bit 1 and opt-in; 11.x: it is bit 0, deprecated, and every network is strongly typed."""
    for version, bit, default_typed in (("10.0.1", 1, False), ("10.16.0", 1, False), ("11.1.0", 0, True)):
        with emulate(TRT[version]) as em:
            trt = em.trt
            assert int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == bit
            builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
            assert builder.create_network(0).get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) is default_typed
            assert builder.create_network(1 << bit).get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) is True


def test_unmodelled_api_raises_not_emulated() -> None:
    with emulate(TRT["11.1.0"]) as em:
        with pytest.raises(NotEmulated, match="create_engine_inspector"):
            em.trt.ICudaEngine.create_engine_inspector(None)
        with pytest.raises(NotEmulated):
            em.runtime.cudaGraphAddKernelNode  # noqa: B018 - exists in cuda-bindings 13.5, not emulated
        with pytest.raises(AttributeError):
            em.runtime.cudaStreamGetCaptureInfo_v3  # noqa: B018 - removed in cuda-bindings 13


def test_cuda_bindings_layouts_and_return_tuples() -> None:
    """12.x keeps the deprecated cuda.cudart trampoline (FutureWarning), 13.0 removed it; tuples follow each release's docstrings."""
    with emulate(CU12) as em:
        with pytest.warns(FutureWarning, match="cuda.cudart module is deprecated"):
            from cuda import cudart
        assert cudart.cudaRuntimeGetVersion()[1] == cuda_releases()["12.9.10"]["runtime_version"]
        assert len(em.runtime.cudaStreamGetCaptureInfo(0)) == 6
    with emulate(spec_for()) as em:
        with pytest.raises(ImportError):
            from cuda import cudart  # noqa: F401, F811
        assert len(em.runtime.cudaStreamGetCaptureInfo(0)) == 7
        from cuda.bindings import utils

        err, stream = em.runtime.cudaStreamCreate()
        assert utils.get_cuda_native_handle(stream) == stream._value and em.counts["int()"] == 0
        assert int(stream) == stream._value and em.counts["int()"] == 1  # deprecated, still works, counted
        em.runtime.cudaStreamDestroy(stream)


# --- driver and runtime versions ----------------------------------------------------------------


@pytest.mark.parametrize("bindings, driver, ok", [("13.5.0", 12080, False), ("13.5.0", 13000, True), ("12.9.10", 12000, True), ("12.9.10", 11080, False), ("12.9.10", 13000, True)])
def test_runtime_needs_a_driver_of_its_cuda_major(bindings: str, driver: int, ok: bool) -> None:
    """Minor-version compatibility: a CUDA 12.x runtime runs on any R525+ driver, 13.x needs R580+ (NVIDIA's compatibility table)."""
    with emulate(spec_for("10.16.0", bindings, driver, 12)) as em:
        rt = em.runtime
        assert rt.cudaDriverGetVersion() == (rt.cudaError_t.cudaSuccess, driver)  # works whatever the driver
        err, ptr = rt.cudaMalloc(256)
        if ok:
            assert err == rt.cudaError_t.cudaSuccess and rt.cudaFree(ptr)[0] == 0
        else:
            assert (err, ptr) == (rt.cudaError_t.cudaErrorInsufficientDriver, None)
            assert rt.cudaStreamCreate() == (rt.cudaError_t.cudaErrorInsufficientDriver, None)
            assert rt.cudaGetErrorName(err) == (rt.cudaError_t.cudaSuccess, b"cudaErrorInsufficientDriver")


def test_tensorrt_for_cuda13_needs_an_r580_driver() -> None:
    with emulate(spec_for("11.1.0", "12.9.10", 12080, 13)) as em:
        trt = em.trt
        logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
        with pytest.raises(TypeError, match="factory function returned nullptr"):
            trt.Runtime(logger)
        assert "CUDA initialization failure with error: 35" in logger._messages[-1][1]
        assert em.runtime.cudaMalloc(16)[0] == 0  # cuda-bindings 12 itself runs on this driver


# --- streams are asynchronous ---------------------------------------------------------------------


def test_copies_complete_only_when_the_stream_is_synchronized(emulated: Emulation) -> None:
    rt = emulated.runtime
    kind = rt.cudaMemcpyKind
    _, stream = rt.cudaStreamCreate()
    src = np.arange(64, dtype=np.float32)
    _, dev = rt.cudaMalloc(src.nbytes)
    out = np.zeros_like(src)
    rt.cudaMemcpyAsync(dev, src.ctypes.data, src.nbytes, kind.cudaMemcpyHostToDevice, stream)
    src[:] = -1  # pageable source: staged at the call, so this does not reach the device
    rt.cudaMemcpyAsync(out.ctypes.data, dev, out.nbytes, kind.cudaMemcpyDeviceToHost, stream)
    assert not out.any(), "the copy back must not have happened before the stream is synchronized"
    rt.cudaStreamSynchronize(stream)
    np.testing.assert_array_equal(out, np.arange(64, dtype=np.float32))
    with pytest.raises(Exception, match="is a device address"):
        rt.cudaMemcpyAsync(dev, dev, 4, kind.cudaMemcpyHostToDevice, stream)
    rt.cudaFree(dev)
    rt.cudaStreamDestroy(stream)
    assert not emulated.leaks()


def test_unordered_streams_touching_the_same_bytes_are_a_hazard(emulated: Emulation) -> None:
    rt = emulated.runtime
    (_, a), (_, b) = rt.cudaStreamCreate(), rt.cudaStreamCreate()
    _, dev = rt.cudaMalloc(1024)
    rt.cudaMemsetAsync(dev, 1, 1024, a)
    with pytest.raises(Hazard, match="no ordering between the streams"):
        rt.cudaMemsetAsync(dev + 512, 2, 256, b)
    _, event = rt.cudaEventCreate()
    rt.cudaEventRecord(event, a)
    rt.cudaStreamWaitEvent(b, event, 0)  # now ordered
    rt.cudaMemsetAsync(dev + 512, 2, 256, b)
    rt.cudaDeviceSynchronize()
    for handle, destroy in ((event, rt.cudaEventDestroy), (a, rt.cudaStreamDestroy), (b, rt.cudaStreamDestroy), (dev, rt.cudaFree)):
        assert destroy(handle)[0] == 0
    assert not emulated.leaks()


# --- stream capture: the interaction modes --------------------------------------------------------


def _capture_with_other_thread_malloc(em: Emulation, mode_name: str) -> tuple[int, int]:
    """Begin a capture in ``mode_name``, cudaMalloc in another thread meanwhile; (that malloc's error, EndCapture's error)."""
    rt = em.runtime
    _, stream = rt.cudaStreamCreate()
    _, dev = rt.cudaMalloc(256)
    assert rt.cudaStreamBeginCapture(stream, getattr(rt.cudaStreamCaptureMode, mode_name))[0] == 0
    rt.cudaMemsetAsync(dev, 0, 256, stream)
    result = {}

    def other() -> None:
        err, ptr = rt.cudaMalloc(1024)
        result["err"] = err
        if err == 0:
            rt.cudaFree(ptr)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    err, graph = rt.cudaStreamEndCapture(stream)
    if err == 0:
        rt.cudaGraphDestroy(graph)
    rt.cudaFree(dev)
    rt.cudaStreamDestroy(stream)
    return int(result["err"]), int(err)


@pytest.mark.parametrize("stack", [STACKS[0], STACKS[-1]], ids=lambda s: s.id)
def test_another_threads_malloc_breaks_a_global_capture_but_not_a_thread_local_one(stack: StackSpec) -> None:
    """cudaThreadExchangeStreamCaptureMode docs: Global prohibits unsafe calls in other threads; ThreadLocal ignores them."""
    with emulate(stack) as em:
        err = em.runtime.cudaError_t
        assert _capture_with_other_thread_malloc(em, "cudaStreamCaptureModeGlobal") == (err.cudaErrorStreamCaptureUnsupported, err.cudaErrorStreamCaptureInvalidated)
        assert _capture_with_other_thread_malloc(em, "cudaStreamCaptureModeThreadLocal") == (0, 0)
        assert not em.leaks()


def test_capturing_thread_may_not_allocate_or_synchronize(emulated: Emulation) -> None:
    rt = emulated.runtime
    err = rt.cudaError_t
    _, stream = rt.cudaStreamCreate()
    for mode in (rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal):
        rt.cudaStreamBeginCapture(stream, mode)
        assert rt.cudaMalloc(64) == (err.cudaErrorStreamCaptureUnsupported, None)
        assert rt.cudaStreamEndCapture(stream) == (err.cudaErrorStreamCaptureInvalidated, None)
        rt.cudaStreamBeginCapture(stream, mode)
        assert rt.cudaStreamSynchronize(stream)[0] == err.cudaErrorStreamCaptureUnsupported
        assert rt.cudaStreamEndCapture(stream)[0] == err.cudaErrorStreamCaptureInvalidated
    rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed)
    e, ptr = rt.cudaMalloc(64)
    assert e == 0, "relaxed capture allows potentially unsafe calls"
    e, graph = rt.cudaStreamEndCapture(stream)
    assert e == 0
    for handle, destroy in ((graph, rt.cudaGraphDestroy), (ptr, rt.cudaFree), (stream, rt.cudaStreamDestroy)):
        assert destroy(handle)[0] == 0
    assert not emulated.leaks()


def test_graph_replays_recorded_pointers_and_leaked_graphs_show(emulated: Emulation) -> None:
    rt = emulated.runtime
    _, stream = rt.cudaStreamCreate()
    _, dev = rt.cudaMalloc(16)
    rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    rt.cudaMemsetAsync(dev, 7, 16, stream)
    _, graph = rt.cudaStreamEndCapture(stream)
    out = np.zeros(16, np.uint8)
    rt.cudaMemcpyAsync(out.ctypes.data, dev, 16, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)
    rt.cudaStreamSynchronize(stream)
    assert not out.any(), "capturing records the memset, it does not run it"
    _, exe = rt.cudaGraphInstantiate(graph, 0)
    rt.cudaGraphLaunch(exe, stream)
    rt.cudaMemcpyAsync(out.ctypes.data, dev, 16, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)
    rt.cudaStreamSynchronize(stream)
    assert (out == 7).all() and emulated.counts["graph launches"] == 1
    rt.cudaGraphExecDestroy(exe)
    assert any("CUDA graph" in r for r in emulated.leaks()), "an undestroyed graph must show as a leak"
    rt.cudaGraphDestroy(graph)
    rt.cudaFree(dev)
    rt.cudaStreamDestroy(stream)
    assert not emulated.leaks()


# --- TensorRT execution rules --------------------------------------------------------------------


def two_node_graph(path: Path) -> Path:
    import onnx

    w = numpy_helper.from_array((np.arange(16, dtype=np.float32).reshape(4, 4) - 8) / 4, "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


class Bound:
    """A context of the two-node graph with device buffers bound, on its own stream."""

    def __init__(self, em: Emulation, folder: Path, strategy: str = "STATIC") -> None:
        trt, rt = em.trt, em.runtime
        plan = em.build_plan(two_node_graph(folder / "g.onnx"), folder / "g.plan", [{"x": ((1, 4), (2, 4), (2, 4))}])
        self.rt, self.logger = rt, trt.Logger(trt.Logger.INTERNAL_ERROR)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan.read_bytes())
        self.ctx = self.engine.create_execution_context(getattr(trt.ExecutionContextAllocationStrategy, strategy))
        _, self.stream = rt.cudaStreamCreate()
        self.x, self.y = rt.cudaMalloc(32)[1], rt.cudaMalloc(32)[1]
        assert self.ctx.set_input_shape("x", (2, 4))
        assert self.ctx.set_tensor_address("x", self.x) and self.ctx.set_tensor_address("y", self.y)

    def close(self) -> None:
        self.rt.cudaStreamSynchronize(self.stream)
        for ptr in (self.x, self.y):
            self.rt.cudaFree(ptr)
        self.rt.cudaStreamDestroy(self.stream)
        self.ctx = self.engine = None


def test_first_enqueue_after_a_change_cannot_be_captured_and_a_second_enqueue_per_capture_is_undocumented(emulated: Emulation, tmp_path: Path) -> None:
    rt = emulated.runtime
    bound = Bound(emulated, tmp_path)
    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    try:
        rt.cudaStreamBeginCapture(bound.stream, mode)
        assert bound.ctx.execute_async_v3(bound.stream._value) is False, "set-up work inside a capture must fail the enqueue"
        assert rt.cudaStreamEndCapture(bound.stream)[0] == rt.cudaError_t.cudaErrorStreamCaptureInvalidated
        assert bound.ctx.execute_async_v3(bound.stream._value)  # warm-up, as trtexec does before capturing
        rt.cudaStreamBeginCapture(bound.stream, mode)
        assert bound.ctx.execute_async_v3(bound.stream._value)
        with pytest.raises(UndocumentedBehaviour, match="second execute_async_v3"):
            bound.ctx.execute_async_v3(bound.stream._value)
        err, graph = rt.cudaStreamEndCapture(bound.stream)
        rt.cudaGraphDestroy(graph)
    finally:
        bound.close()
    assert not emulated.leaks()


def test_execution_refuses_what_tensorrt_refuses(emulated: Emulation, tmp_path: Path) -> None:
    rt = emulated.runtime
    bound = Bound(emulated, tmp_path, "USER_MANAGED")
    try:
        assert bound.ctx.execute_async_v3(bound.stream._value) is False, "no device memory given to a USER_MANAGED context"
        need = bound.engine.device_memory_size_v2 if hasattr(bound.engine, "device_memory_size_v2") else bound.engine.device_memory_size
        _, scratch = rt.cudaMalloc(need)
        if hasattr(bound.ctx, "set_device_memory"):
            bound.ctx.set_device_memory(scratch, need)
        else:
            bound.ctx.device_memory = scratch
        assert bound.ctx.set_tensor_address("x", bound.x + 4) is False, "addresses must be 256-byte aligned"
        assert bound.ctx.set_input_shape("x", (3, 4)) is False, "outside the profile"
        assert bound.ctx.execute_async_v3(bound.stream._value)
        with pytest.raises(UndocumentedBehaviour, match="aliases input"):
            bound.ctx.set_tensor_address("y", bound.x)
            bound.ctx.execute_async_v3(bound.stream._value)
        bound.ctx.set_tensor_address("y", bound.y)
        _, other = rt.cudaStreamCreate()
        assert bound.ctx.set_optimization_profile_async(0, bound.stream._value)
        with pytest.raises(Hazard, match="set_optimization_profile_async"):
            bound.ctx.execute_async_v3(other._value)
        rt.cudaStreamDestroy(other)
        rt.cudaStreamSynchronize(bound.stream)
        rt.cudaFree(scratch)
    finally:
        bound.close()
    assert not emulated.leaks()


def test_plans_do_not_cross_releases(tmp_path: Path) -> None:
    with emulate(TRT["10.16.0"]) as em:
        plan = em.build_plan(two_node_graph(tmp_path / "g.onnx"), tmp_path / "g.plan", [{"x": ((1, 4), (1, 4), (2, 4))}])
    with emulate(TRT["11.1.0"]) as em:
        logger = em.trt.Logger(em.trt.Logger.INTERNAL_ERROR)
        assert em.trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes()) is None
        assert "built by TensorRT 10.16.0" in logger._messages[-1][1]


def test_emulated_plan_runs_the_onnx_graph(emulated: Emulation, tmp_path: Path) -> None:
    rt = emulated.runtime
    bound = Bound(emulated, tmp_path)
    x = np.array([[1, -2, 3, -4], [0.5, 0.25, -1, 2]], np.float32)
    y = np.zeros_like(x)
    kind = rt.cudaMemcpyKind
    rt.cudaMemcpyAsync(bound.x, x.ctypes.data, x.nbytes, kind.cudaMemcpyHostToDevice, bound.stream)
    assert bound.ctx.execute_async_v3(bound.stream._value)
    rt.cudaMemcpyAsync(y.ctypes.data, bound.y, y.nbytes, kind.cudaMemcpyDeviceToHost, bound.stream)
    rt.cudaStreamSynchronize(bound.stream)
    w = (np.arange(16, dtype=np.float32).reshape(4, 4) - 8) / 4
    np.testing.assert_array_equal(y, np.maximum(x @ w, 0))  # small integers and quarters: exact in float32
    bound.close()
    assert not emulated.leaks()
