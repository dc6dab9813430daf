"""engines/trt_build.py and engines/build.py against every emulated TensorRT release (tests/emulation).

The emulated ``tensorrt`` has exactly the names of TensorRT 10.0.1, 10.16 and 11.1 (from
NVIDIA's binding sources), so a build that touches a name a release removed fails here, on
CPU. Issue 10 found such bugs (``BuilderFlag.FP16`` removed in 11, an fp32 engine from an fp32
graph whatever ``--precision`` said, the VAE built fp16); these tests pinned them as strict xfails
and now hold the fix: every build is strongly typed, precision comes from the graph (an fp32 graph
is converted to fp16 with fp32 islands for an fp16 engine), weak FP16 is an explicit 10.x fallback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from emulation import STACKS, Emulation, StackSpec, emulate
from engine_graphs import write_mini_export
from trt_emulated_graphs import SPEC, matmul_graph, matmul_reference, profile

from trt_bgswap.engines.trt_build import TrtBuildOptions, build_plan

ON_EVERY_RELEASE = [pytest.param(s, id=s.id) for s in STACKS]


def product_build(em: Emulation, folder: Path, precision: str, tf32: bool = False, weak_fp16: bool = False) -> dict:
    onnx_path = folder / "tiny.onnx"
    if not onnx_path.exists():
        matmul_graph(onnx_path)
    plan = folder / f"tiny-{precision}.plan"
    options = TrtBuildOptions(precision=precision, opt_level=1, tf32=tf32, weak_fp16=weak_fp16)
    # the emulated engine runs the graph it was built from, so the fp16 conversion is kept (the cache does the same)
    build_plan(onnx_path, plan, [profile(1, 2, 4)], options, folder / "timing.cache", "tiny", fp16_graph=folder / "tiny.fp16.onnx")
    return em.read_plan(plan) | {"path": str(plan)}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("stack", ON_EVERY_RELEASE)
def test_build_uses_only_the_releases_api_and_the_plan_runs(stack: StackSpec, precision: str, tmp_path: Path) -> None:
    """A build on each release succeeds, sets the flags it asked for, reuses its timing cache, and its plan runs in TrtEngine."""
    from trt_bgswap.runtime.trt_backend import TrtEngine

    with emulate(stack) as em:
        plan = product_build(em, tmp_path, precision)
        assert plan["tensorrt"] == stack.tensorrt
        assert plan["strongly_typed"] and plan["flags"] == [], f"strongly typed, no precision flag, TF32 cleared: {plan['flags']}"
        assert ("float16" in plan["compute_types"]) is (precision == "fp16"), plan["compute_types"]
        assert (tmp_path / "timing.cache").stat().st_size > 0, "the timing cache is written after the build"
        again = product_build(em, tmp_path, precision)
        built_nodes = len(onnx.load(plan["onnx"]).graph.node)  # MatMul, Relu (+ the fp16 graph's boundary Casts)
        assert again["timing_cache_hits"] == built_nodes, "the second build reuses the persisted timing cache"
        engine = TrtEngine(SPEC, Path(plan["path"]))
        try:
            x = np.array([[1, -2, 3, -4], [0.5, 0.25, -1, 2], [4, 3, 2, 1]], np.float32)
            np.testing.assert_array_equal(engine(x=x)["y"], matmul_reference(x))  # quarters of small integers: exact
        finally:
            engine.close()
        assert not em.leaks(), em.leaks()


def test_fp16_requested_on_tensorrt11_gives_a_half_precision_engine(tmp_path: Path) -> None:
    with emulate(STACKS[-1]) as em:
        plan = product_build(em, tmp_path, "fp16")
        assert "float16" in plan["compute_types"], f"an fp16 build computes in {plan['compute_types']}"


@pytest.mark.parametrize("stack", ON_EVERY_RELEASE)
def test_fp16_build_keeps_the_vae_in_fp32(stack: StackSpec, tmp_path: Path) -> None:
    """`build --precision fp16` on every release: strongly typed, the UNet from its fp16 graph, the VAE as exported (fp32)."""
    from trt_bgswap.engines.build import build_engines

    export = write_mini_export(tmp_path / "export")
    with emulate(stack) as em:
        build_engines(export, backend="trt", precision="fp16", sizes=[(64, 48)], opt_level=1, tf32=False)
        plans = {Path(em.read_plan(p)["onnx"]).parent.name: em.read_plan(p) for p in (export / "engines").rglob("*.plan")}
        assert {"unet", "vae_encoder", "vae_decoder"} <= set(plans), sorted(plans)
        assert all(p["strongly_typed"] and "FP16" not in p["flags"] for p in plans.values()), {m: p["flags"] for m, p in plans.items()}
        assert "float16" in plans["unet"]["compute_types"], "the UNet is what --precision fp16 is for"
        vae = {model: p["compute_types"] for model, p in plans.items() if model.startswith("vae")}
        assert all(types == ["float32"] for types in vae.values()), f"VAE plans compute in {vae}"
        # the fp16 graph a plan was built from is kept beside it in the cache, so a rebuild reuses everything
        again = build_engines(export, backend="trt", precision="fp16", sizes=[(64, 48)], opt_level=1, tf32=False)
        assert again.rebuilt == [], again.rebuilt


@pytest.mark.parametrize("stack", ON_EVERY_RELEASE)
def test_weakly_typed_fp16_is_an_explicit_fallback_on_tensorrt10_only(stack: StackSpec, tmp_path: Path) -> None:
    """10.x: --weak-fp16 builds the fp32 graph weakly typed with BuilderFlag.FP16; 11.x (no FP16 flag, always strongly typed) refuses with the fix."""
    from trt_bgswap.errors import UsageError

    with emulate(stack) as em:
        if stack.tensorrt.startswith("11."):
            with pytest.raises(UsageError, match="--weak-fp16 needs TensorRT 10.x.*drop --weak-fp16"):
                product_build(em, tmp_path, "fp16", weak_fp16=True)
            return
        plan = product_build(em, tmp_path, "fp16", weak_fp16=True)
        assert not plan["strongly_typed"] and plan["flags"] == ["FP16"], plan
        assert not (tmp_path / "tiny.fp16.onnx").exists(), "a weakly typed build converts no graph"


def test_builder_and_runtime_share_one_logger_that_forwards_to_logging(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One trt.ILogger for the process (Polygraphy's get_trt_logger does the same); TensorRT's errors reach `logging`."""
    from trt_bgswap.errors import ModelError
    from trt_bgswap.runtime.trt_backend import TrtEngine

    with emulate(STACKS[-1]) as em:
        plan = product_build(em, tmp_path, "fp32")
        engine = TrtEngine(SPEC, Path(plan["path"]))
        try:
            engine.load()
            runtime_logger = engine._runtime.logger
        finally:
            engine.close()
        bad = tmp_path / "bad.plan"
        bad.write_bytes(b"not a plan")
        with caplog.at_level("ERROR", logger="tensorrt"), pytest.raises(ModelError):
            TrtEngine(SPEC, bad).load()
        assert "deserializeCudaEngine" in caplog.text, caplog.text
        from trt_bgswap.runtime.trt_backend import import_tensorrt, trt_logger

        assert runtime_logger is trt_logger(import_tensorrt()), "the runtime gets the process logger, the one build_plan gives the builder"
