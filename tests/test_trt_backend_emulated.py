"""runtime/trt_backend.py (TrtEngine, SharedActivations) against every emulated TensorRT release (tests/emulation).

Passing: an engine runs with ONNX Runtime parity on each release, alone or on shared
activation memory, and frees everything. Issue 10's items: no ``device_memory_size`` (removed
in 11.x) when the v2 size is 0, shared scratch on one stream only (engines without a stream
take the block's; another stream is refused), shared scratch that shrinks when the biggest
engine unloads, and uploads from pinned memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from emulation import STACKS, Emulation, StackSpec, emulate
from trt_emulated_graphs import SPEC, add_graph, matmul_graph, matmul_reference, profile

X = np.array([[1, -2, 3, -4], [0.5, 0.25, -1, 2]], np.float32)  # quarters of small integers: exact in float32

@pytest.mark.parametrize("shared", [False, True], ids=["own-memory", "shared-activations"])
def test_engine_matches_onnx_runtime_and_frees_everything(emulated: Emulation, tmp_path: Path, shared: bool) -> None:
    from trt_bgswap.runtime.trt_backend import SharedActivations, TrtEngine

    plan = emulated.build_plan(matmul_graph(tmp_path / "tiny.onnx"), tmp_path / "tiny.plan", [profile(1, 2, 4)])
    activations = SharedActivations() if shared else None
    engine = TrtEngine(SPEC, plan, shared_activations=activations)
    try:
        np.testing.assert_array_equal(engine(x=X)["y"], matmul_reference(X))
        np.testing.assert_array_equal(engine(x=X[:1])["y"], matmul_reference(X[:1]))  # a smaller batch in the same buffers
        if activations is not None:
            assert activations.nbytes == emulated.read_plan(plan)["activation_bytes"][0] > 0
    finally:
        engine.close()
    assert not emulated.leaks(), emulated.leaks()


@pytest.mark.parametrize("stack", STACKS, ids=lambda s: s.id)
def test_engine_without_activation_memory_on_shared_activations(stack: StackSpec, tmp_path: Path) -> None:
    from trt_bgswap.runtime.trt_backend import SharedActivations, TrtEngine

    with emulate(stack) as em:
        plan = em.build_plan(add_graph(tmp_path / "add.onnx"), tmp_path / "add.plan", [profile(1, 2, 2)])
        assert em.read_plan(plan)["activation_bytes"] == [0], "a single node writing the network output needs no activation memory"
        engine = TrtEngine(SPEC, plan, shared_activations=SharedActivations())
        try:
            np.testing.assert_array_equal(engine(x=X)["y"], X + X)
        finally:
            engine.close()
        assert not em.leaks(), em.leaks()


def test_shared_activations_are_not_used_from_two_streams_at_once(tmp_path: Path) -> None:
    from trt_bgswap.runtime.trt_backend import SharedActivations, TrtEngine

    with emulate(STACKS[-1]) as emulated:  # not version-specific: one release is enough
        plan = emulated.build_plan(matmul_graph(tmp_path / "tiny.onnx"), tmp_path / "tiny.plan", [profile(1, 2, 2)])
        shared = SharedActivations()
        first, second = TrtEngine(SPEC, plan, shared_activations=shared), TrtEngine(SPEC, plan, shared_activations=shared)  # no stream given
        try:
            for engine in (first, second):
                engine.allocate({"B": 2})
                engine.upload("x", X)
                engine.run()  # asynchronous: the first engine's work is still queued when the second is enqueued
            assert first.stream is second.stream is shared.stream, "engines without a stream take the shared block's"
            np.testing.assert_array_equal(second.download("y"), matmul_reference(X))
        finally:
            first.close()
            second.close()
        assert not emulated.leaks(), emulated.leaks()


def test_shared_activations_refuse_an_engine_on_another_stream(tmp_path: Path) -> None:
    from trt_bgswap.errors import UsageError
    from trt_bgswap.runtime.cuda_device import Stream
    from trt_bgswap.runtime.trt_backend import SharedActivations, TrtEngine

    with emulate(STACKS[0]) as emulated:
        plan = emulated.build_plan(matmul_graph(tmp_path / "tiny.onnx"), tmp_path / "tiny.plan", [profile(1, 2, 2)])
        one, other = Stream(), Stream()
        shared = SharedActivations(one)
        first, second = TrtEngine(SPEC, plan, stream=one, shared_activations=shared), TrtEngine(SPEC, plan, stream=other, shared_activations=shared)
        try:
            first.load()
            with pytest.raises(UsageError, match="one CUDA stream"):
                second.load()
        finally:
            first.close()
            second.close()
            one.close()
            other.close()
        assert not emulated.leaks(), emulated.leaks()


def test_shared_activations_shrink_when_the_largest_engine_unloads(tmp_path: Path) -> None:
    from trt_bgswap.runtime.trt_backend import SharedActivations, TrtEngine

    with emulate(STACKS[-1]) as emulated:  # not version-specific: one release is enough
        onnx_path = matmul_graph(tmp_path / "tiny.onnx")
        small = emulated.build_plan(onnx_path, tmp_path / "small.plan", [profile(1, 2, 2)])
        large = emulated.build_plan(onnx_path, tmp_path / "large.plan", [profile(1, 64, 64)])
        need = {p: emulated.read_plan(p)["activation_bytes"][0] for p in (small, large)}
        shared = SharedActivations()
        engines = [TrtEngine(SPEC, small, shared_activations=shared), TrtEngine(SPEC, large, shared_activations=shared)]
        try:
            for engine in engines:
                engine.load()
            assert shared.nbytes == need[large] > need[small]
            engines[1].unload()
            assert shared.nbytes == need[small], f"{shared.nbytes} bytes kept for an unloaded engine (the small one needs {need[small]})"
            np.testing.assert_array_equal(engines[0](x=X)["y"], matmul_reference(X))  # the small engine runs on the re-pointed block
        finally:
            for engine in engines:
                engine.close()


def test_uploads_come_from_pinned_host_memory(tmp_path: Path) -> None:
    from trt_bgswap.runtime.trt_backend import TrtEngine

    with emulate(STACKS[-1]) as emulated:  # not version-specific: one release is enough
        plan = emulated.build_plan(matmul_graph(tmp_path / "tiny.onnx"), tmp_path / "tiny.plan", [profile(1, 2, 2)])
        engine = TrtEngine(SPEC, plan)
        try:
            engine(x=X)
            assert emulated.counts["HtoD pageable bytes"] == 0, f"{emulated.counts['HtoD pageable bytes']} bytes uploaded from pageable memory"
        finally:
            engine.close()
