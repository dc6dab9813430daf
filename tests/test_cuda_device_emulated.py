"""runtime/cuda_device.py (and TrtEngine's CUDA graphs) against emulated cuda-bindings 12 and 13 (tests/emulation).

Streams, device buffers, the three copies and a captured graph work on both cuda-bindings
majors and leave nothing behind. Issue 10's items, pinned here as strict xfails until fixed: a
too-old driver's error names the driver needed, handles go through ``get_cuda_native_handle``
(not the deprecated ``int()``), captures are thread-local (another thread's allocation cannot
break them), a failed capture reports its cause and leaks no graph, TrtEngine falls back to eager;
``trt-bgswap info`` prints the versions and says when they do not fit.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from emulation import STACKS, Emulation, StackSpec, emulate
from trt_emulated_graphs import SPEC, matmul_graph, matmul_reference, profile

from trt_bgswap.errors import BackendUnavailable

BINDINGS = [pytest.param(STACKS[0], id="cuda-bindings-12.9"), pytest.param(STACKS[-1], id="cuda-bindings-13.5")]


@pytest.mark.parametrize("stack", BINDINGS)
def test_streams_buffers_copies_and_a_graph_on_both_binding_majors(stack: StackSpec) -> None:
    from trt_bgswap.runtime.cuda_device import CudaGraph, DeviceBuffer, Stream, compute_capability, copy_device, copy_to_device, copy_to_host

    with emulate(stack) as em:
        assert compute_capability() == "8.9"
        stream = Stream()
        a, b = DeviceBuffer(64), DeviceBuffer(64)
        src = np.arange(16, dtype=np.float32)
        out = np.zeros_like(src)
        copy_to_device(a.ptr, src, stream)
        graph = CudaGraph(stream)
        graph.capture(lambda: copy_device(b.ptr, a.ptr, 64, stream))
        copy_to_device(a.ptr, src * 2, stream)  # the graph copies whatever a holds when it runs
        graph.replay()
        copy_to_host(out, b.ptr, stream)
        stream.synchronize()
        np.testing.assert_array_equal(out, src * 2)
        graph.reset()
        a.free()
        b.free()
        stream.close()
        assert not em.leaks(), em.leaks()


def test_too_old_driver_error_names_the_driver_needed() -> None:
    from trt_bgswap.runtime.cuda_device import Stream

    with emulate(StackSpec("11.1.0", "13.5.0", 13, 12080)):  # an R570 driver (CUDA 12.8)
        with pytest.raises(BackendUnavailable) as info:
            Stream()
    assert "580" in str(info.value) and "driver" in str(info.value).lower(), str(info.value)


def test_stream_handle_without_the_deprecated_int_conversion() -> None:
    from trt_bgswap.runtime.cuda_device import Stream

    with emulate(STACKS[-1]) as em:
        em.device.strict_handles = True  # a cuda-bindings that has dropped __int__, as announced
        stream = Stream()
        try:
            assert isinstance(stream.handle, int)
        finally:
            em.device.strict_handles = False
            stream.close()


def allocate_in_another_thread_meanwhile(em: Emulation) -> dict:
    """While work is being captured, another thread loads something (a DeviceBuffer): its outcome is recorded."""
    from trt_bgswap.runtime.cuda_device import DeviceBuffer

    outcome: dict = {}

    def other() -> None:
        try:
            DeviceBuffer(4096).free()
            outcome["ok"] = True
        except BackendUnavailable as e:
            outcome["error"] = str(e)

    def hook(stream: int, op: object) -> None:
        em.device.during_capture.remove(hook)
        t = threading.Thread(target=other)
        t.start()
        t.join()

    em.device.during_capture.append(hook)
    return outcome


def test_another_threads_allocation_does_not_break_a_capture() -> None:
    from trt_bgswap.runtime.cuda_device import CudaGraph, DeviceBuffer, Stream, copy_device

    with emulate(STACKS[-1]) as em:
        stream, a, b = Stream(), DeviceBuffer(64), DeviceBuffer(64)
        graph = CudaGraph(stream)
        outcome = allocate_in_another_thread_meanwhile(em)
        try:
            graph.capture(lambda: copy_device(b.ptr, a.ptr, 64, stream))
            assert outcome == {"ok": True}, outcome
        finally:
            graph.reset()
            a.free()
            b.free()
            stream.close()


def test_a_failed_capture_leaks_no_graph() -> None:
    from trt_bgswap.runtime.cuda_device import CudaGraph, Stream

    def launch() -> None:
        raise ValueError("the launch failed")

    with emulate(STACKS[-1]) as em:
        stream = Stream()
        with pytest.raises(ValueError, match="the launch failed"):
            CudaGraph(stream).capture(launch)
        stream.close()
        assert not em.leaks(), em.leaks()


def test_a_failed_capture_reports_its_cause() -> None:
    from trt_bgswap.runtime.cuda_device import CudaGraph, DeviceBuffer, Stream

    with emulate(STACKS[-1]):
        stream = Stream()
        with pytest.raises(BackendUnavailable) as info:
            CudaGraph(stream).capture(lambda: DeviceBuffer(64))  # an allocation inside the capture: prohibited
        stream.close()
    assert "cudaErrorStreamCaptureUnsupported" in str(info.value), str(info.value)


def break_the_next_capture(em: Emulation) -> None:
    """The next captured work is followed by an allocation in the capturing thread itself: prohibited in any capture mode."""
    from trt_bgswap.runtime.cuda_device import DeviceBuffer

    def hook(stream: int, op: object) -> None:
        em.device.during_capture.remove(hook)
        with pytest.raises(BackendUnavailable, match="cudaErrorStreamCaptureUnsupported"):
            DeviceBuffer(64)

    em.device.during_capture.append(hook)


def test_trt_engine_falls_back_to_eager_when_its_capture_fails(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As trtexec (sampleInference.cpp@v11.1:1361-1369): a failed capture is logged with its cause, the engine runs eagerly from then on."""
    from trt_bgswap.runtime.trt_backend import TrtEngine

    with emulate(STACKS[-1]) as em:
        plan = em.build_plan(matmul_graph(tmp_path / "tiny.onnx"), tmp_path / "tiny.plan", [profile(2, 2, 2)])
        engine = TrtEngine(SPEC, plan, use_cuda_graph=True)
        x = np.array([[1, -2, 3, -4], [0.5, 0.25, -1, 2]], np.float32)
        break_the_next_capture(em)
        try:
            with caplog.at_level("WARNING", logger="trt_bgswap.runtime.trt_backend"):
                np.testing.assert_array_equal(engine(x=x)["y"], matmul_reference(x))
            assert "capture" in caplog.text and "cudaErrorStreamCaptureInvalidated" in caplog.text, caplog.text
            captures = em.counts["captures"]
            np.testing.assert_array_equal(engine(x=2 * x)["y"], matmul_reference(2 * x))
            assert em.counts["captures"] == captures and em.counts["graph launches"] == 0, "after a failed capture the engine stays eager"
        finally:
            engine.close()
        assert not em.leaks(), em.leaks()


@pytest.mark.parametrize(("stack", "fits"), [
    (StackSpec("10.0.1", "12.9.10", 12, 12040), True),  # a JetPack-era CUDA 12 pair on an R550 driver
    (StackSpec("11.1.0", "13.5.0", 13, 12080), False),  # CUDA 13 wheels on an R570 driver (CUDA 12.8)
], ids=["cu12-on-cuda12.4-driver", "cu13-on-cuda12.8-driver"])
def test_info_prints_the_versions_and_says_when_they_do_not_fit(stack: StackSpec, fits: bool) -> None:
    from trt_bgswap.info import cuda_lines

    with emulate(stack):
        lines = cuda_lines(tensorrt_cuda=stack.tensorrt_cuda)
    text = "\n".join(lines)
    assert f"driver supports CUDA {stack.driver // 1000}.{stack.driver % 1000 // 10}" in text and f"TensorRT built for CUDA {stack.tensorrt_cuda}" in text, text
    assert f"cuda-bindings {stack.cuda_bindings}" in text, text
    if fits:
        assert lines[-1] == "cuda fit: ok", text
    else:
        assert lines[-1].startswith("cuda fit: NO") and ">= 580" in lines[-1], text
