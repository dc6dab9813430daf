"""TensorRT engines on a GPU: parity with ONNX Runtime per output, the whole pipeline, CUDA graphs, shared memory.

These need the ``tensorrt`` package, ``cuda-python`` and an NVIDIA GPU; the
``trt_gpu`` fixture skips them with the reason otherwise (pytest's ``-ra``
summary lists each as SKIPPED). They are written to run unchanged on a GPU
machine: ``pip install 'trt-bgswap[trt]' --extra-index-url https://pypi.nvidia.com``
then ``pytest -m gpu``.

References are ONNX Runtime CPU runs of the same exported graphs. fp32 plans
are built with TF32 off, so they agree to the graph's float32 rounding noise; fp16 plans
to its rounding noise with every layer possibly in float16 (:mod:`tolerance`). The same
plan run twice (CUDA-graph replay, shared activations, a reload, device chaining) runs the
same kernels: only a kernel's nondeterministic reduction order could separate the runs, so
they too are held to the float32 noise (computed only when they differ at all).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from engine_graphs import random_feeds, write_mini_export
from skimage import data
from tolerance import NOISE_SAMPLES, assert_within, graph_tolerances, network_tolerance, noisy_engine, noisy_pipeline

from trt_bgswap.engines.build import build_engines
from trt_bgswap.manifest import Manifest
from trt_bgswap.runtime.ort_backend import OrtEngine
from trt_bgswap.specs import pipeline_dims

pytestmark = [pytest.mark.gpu, pytest.mark.trt]

SIZE = (64, 48)  # mini export: (width, height), multiples of its size multiple 16


def assert_close(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], tolerances: Callable[[], Mapping[str, float]], label: str) -> None:
    """Each output within its tolerance; ``tolerances()`` is only computed if some output differs at all."""
    tols = functools.cache(tolerances)
    for name, r in ref.items():
        g = got[name].astype(np.float32)
        assert g.shape == r.shape, f"{label}.{name}: shape {g.shape} vs {r.shape}"
        assert_within(float(np.max(np.abs(g - r.astype(np.float32)))), lambda name=name: tols()[name], f"{label}.{name}")


def rounding(path: Path, feeds: dict[str, np.ndarray], float16: bool = False) -> Callable[[], Mapping[str, float]]:
    """The ONNX graph's rounding noise on ``feeds`` (float16: any layer may run in float16), when asked for."""
    return lambda: graph_tolerances(path, feeds, float16=float16)


def dims(manifest: Manifest, size: tuple[int, int] = SIZE, batch: int = 1) -> dict[str, int]:
    d = pipeline_dims(batch, size[1], size[0], manifest.inpaint.vae_scale_factor)
    d["S"] = manifest.rmbg.input_size[0]
    return d


@pytest.fixture(scope="module")
def mini_export(trt_gpu: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mini_export(tmp_path_factory.mktemp("trt") / "export")


@pytest.fixture(scope="module")
def fp32_plans(mini_export: Path):  # noqa: ANN201 - a BuildReport
    return build_engines(mini_export, backend="trt", precision="fp32", tf32=False, sizes=[SIZE], opt_level=1)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("model", ["text_encoder", "unet", "vae_encoder", "vae_decoder", "rmbg"])
def test_plan_matches_onnxruntime_per_output(mini_export: Path, model: str, precision: str) -> None:
    from trt_bgswap.runtime.trt_backend import TrtEngine

    report = build_engines(
        mini_export, backend="trt", precision=precision, tf32=False, sizes=[SIZE], models=[model], opt_level=1,
        out_dir=mini_export / f"engines-{precision}",
    )
    manifest = Manifest.load(mini_export)
    spec = manifest.models[model].spec
    feeds = random_feeds(spec, dims(manifest), seed=1)
    ref = OrtEngine(spec, manifest.model_path(mini_export, model), provider="cpu")(**feeds)
    engine = TrtEngine(spec, report.models[model].path)
    try:
        assert engine.backend == "tensorrt (not loaded)"
        got = engine(**feeds)
        assert engine.backend == "tensorrt"
    finally:
        engine.close()
    assert_close(got, ref, rounding(manifest.model_path(mini_export, model), feeds, precision == "fp16"), f"{model}[{precision}]")


def test_second_build_reuses_plans_and_option_change_rebuilds(mini_export: Path, fp32_plans) -> None:  # noqa: ANN001
    again = build_engines(mini_export, backend="trt", precision="fp32", tf32=False, sizes=[SIZE], opt_level=1)
    assert again.rebuilt == []
    timing = list((mini_export / "engines").glob("timing-trt*.cache"))
    assert len(timing) == 1 and timing[0].stat().st_size > 0, "the timing cache was not persisted"
    out = mini_export / "engines-options"  # keep fp32_plans' files untouched for the other tests
    build_engines(mini_export, backend="trt", precision="fp32", sizes=[SIZE], opt_level=1, models=["vae_decoder"], out_dir=out)
    changed = build_engines(mini_export, backend="trt", precision="fp32", sizes=[SIZE], opt_level=2, models=["vae_decoder"], out_dir=out)
    assert changed.rebuilt == ["vae_decoder"]
    assert any(r.startswith("builder changed") for r in changed.models["vae_decoder"].reasons)


def test_plans_load_in_plain_tensorrt(fp32_plans) -> None:  # noqa: ANN001
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for name, built in fp32_plans.models.items():
        engine = runtime.deserialize_cuda_engine(built.path.read_bytes())
        assert engine is not None, f"{name}: plain TensorRT cannot deserialize {built.path}"
        assert engine.num_optimization_profiles == len(built.profiles)


def test_dynamic_plan_serves_sizes_and_reuses_buffers(mini_export: Path) -> None:
    from trt_bgswap.runtime.trt_backend import TrtEngine

    report = build_engines(
        mini_export, backend="trt", precision="fp32", tf32=False, sizes=[SIZE], dynamic=((32, 32), (128, 96)), models=["unet"],
        out_dir=mini_export / "engines-dynamic",
    )
    manifest = Manifest.load(mini_export)
    spec = manifest.models["unet"].spec
    ort_engine = OrtEngine(spec, manifest.model_path(mini_export, "unet"), provider="cpu")
    engine = TrtEngine(spec, report.models["unet"].path, use_cuda_graph=True)  # dynamic: graphs must be declined
    try:
        ptrs = {}
        for size in [(128, 96), (64, 48), (32, 32)]:  # largest first: later sizes reuse its buffers
            feeds = random_feeds(spec, dims(manifest, size), seed=size[0])
            assert_close(engine(**feeds), ort_engine(**feeds), rounding(ort_engine.path, feeds), f"unet@{size}")
            ptrs[size] = engine.device_ptr("sample")
        assert len(set(ptrs.values())) == 1, f"buffers were reallocated for smaller shapes: {ptrs}"
    finally:
        engine.close()


def test_cuda_graph_replay_equals_eager(mini_export: Path, fp32_plans) -> None:  # noqa: ANN001
    from trt_bgswap.runtime.trt_backend import TrtEngine

    manifest = Manifest.load(mini_export)
    spec = manifest.models["unet"].spec
    path = fp32_plans.models["unet"].path
    eager, graphed = TrtEngine(spec, path), TrtEngine(spec, path, use_cuda_graph=True)
    try:
        for seed in (1, 2, 3):  # the first call captures; later calls replay with new inputs in the same buffers
            feeds = random_feeds(spec, dims(manifest), seed=seed)
            assert_close(graphed(**feeds), eager(**feeds), rounding(manifest.model_path(mini_export, "unet"), feeds), f"unet[graph replay, seed {seed}]")
        assert graphed._graph is not None and graphed._graph.captured
    finally:
        eager.close()
        graphed.close()


def test_shared_activation_memory_and_unload(mini_export: Path, fp32_plans) -> None:  # noqa: ANN001
    from trt_bgswap.runtime.trt_backend import SharedActivations, TrtEngine

    manifest = Manifest.load(mini_export)
    shared = SharedActivations()
    models = ["vae_encoder", "unet", "vae_decoder"]
    alone = {m: TrtEngine(manifest.models[m].spec, fp32_plans.models[m].path) for m in models}
    together = {m: TrtEngine(manifest.models[m].spec, fp32_plans.models[m].path, shared_activations=shared) for m in models}
    try:
        for m in models:
            together[m].load()
        import tensorrt as trt

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        needs = []
        for m in models:
            e = runtime.deserialize_cuda_engine(fp32_plans.models[m].path.read_bytes())
            needs.append(int(getattr(e, "device_memory_size_v2", None) or e.device_memory_size))
        assert shared.nbytes == max(needs)
        for m in models:
            feeds = random_feeds(manifest.models[m].spec, dims(manifest), seed=7)
            assert_close(together[m](**feeds), alone[m](**feeds), rounding(manifest.model_path(mini_export, m), feeds), f"{m}[shared]")
        # unload for a small GPU, reload, same answers
        feeds = random_feeds(manifest.models["unet"].spec, dims(manifest), seed=8)
        before = together["unet"](**feeds)
        together["unet"].unload()
        assert together["unet"].backend == "tensorrt (not loaded)"
        assert_close(together["unet"](**feeds), before, rounding(manifest.model_path(mini_export, "unet"), feeds), "unet[reloaded]")
    finally:
        for e in (*alone.values(), *together.values()):
            e.close()


def test_device_to_device_chaining_matches_host_round_trip(mini_export: Path, fp32_plans) -> None:  # noqa: ANN001
    from trt_bgswap.runtime.cuda_device import Stream
    from trt_bgswap.runtime.trt_backend import TrtEngine

    manifest = Manifest.load(mini_export)
    stream = Stream()
    enc = TrtEngine(manifest.models["vae_encoder"].spec, fp32_plans.models["vae_encoder"].path, stream=stream)
    dec = TrtEngine(manifest.models["vae_decoder"].spec, fp32_plans.models["vae_decoder"].path, stream=stream)
    try:
        feeds = random_feeds(enc.spec, dims(manifest), seed=4)
        via_host = dec(latent_sample=enc(**feeds)["latent_mean"])["sample"]
        enc.upload("sample", feeds["sample"])
        enc.run()
        dec.allocate(dims(manifest))
        dec.feed_from_device("latent_sample", enc.device_ptr("latent_mean"))
        dec.run()
        on_device = dec.download("sample")

        def chain_noise() -> dict[str, float]:  # the encoder -> decoder chain's float32 rounding noise
            engines = {m: noisy_engine(manifest.models[m].spec, manifest.model_path(mini_export, m), mini_export / "noisy" / f"{m}.onnx") for m in ("vae_encoder", "vae_decoder")}
            runs = [engines["vae_decoder"](latent_sample=engines["vae_encoder"](**feeds)["latent_mean"])["sample"] for _ in range(NOISE_SAMPLES)]
            return {"sample": network_tolerance(via_host, runs)}

        assert_close({"sample": on_device}, {"sample": via_host}, chain_noise, "vae_decoder[device chain]")
    finally:
        enc.close()
        dec.close()
        stream.close()


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_whole_pipeline_with_trt_engines_matches_onnxruntime(trt_gpu: None, exported_dir: Path, tmp_path: Path, guidance: float) -> None:
    """The inpainting loop with every model on TensorRT (fp32, TF32 off) vs the same loop on ONNX Runtime CPU."""
    from trt_bgswap.runtime.pipeline import GenerationOptions, Noise, Pipeline
    from trt_bgswap.runtime.trt_backend import TrtEngine

    manifest = Manifest.load(exported_dir)
    cfg = manifest.inpaint
    size = (cfg.size_multiple * 3, cfg.size_multiple * 2)
    report = build_engines(
        exported_dir, backend="trt", precision="fp32", tf32=False, sizes=[size], batches=(1, 2),
        models=["text_encoder", "unet", "vae_encoder", "vae_decoder"], out_dir=tmp_path / "engines",
    )
    engines = {name: TrtEngine(manifest.models[name].spec, built.path) for name, built in report.models.items()}
    trt_pipe = Pipeline.load(exported_dir, provider="cpu", engines=engines)
    ort_pipe = Pipeline.load(exported_dir, provider="cpu")
    assert set(trt_pipe.backends()[m] for m in engines) == {"tensorrt"}

    rgb = data.chelsea()[::2, ::2].copy()
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    mask = np.where(((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2 < 1.0, 0, 255).astype(np.uint8)
    options = GenerationOptions("a beach at sunset", steps=3, guidance=guidance, seed=0, size=size)
    d = pipeline_dims(1, size[1], size[0], cfg.vae_scale_factor)
    noise = Noise.from_seed(0, (1, cfg.latent_channels, d["h"], d["w"]), options.steps)
    try:
        got = trt_pipe.inpaint(rgb, mask, options, noise)
        want = ort_pipe.inpaint(rgb, mask, options, noise)

        def loop_noise() -> float:  # the whole float32 loop's rounding noise
            noisy = noisy_pipeline(exported_dir, tmp_path / "noisy")
            return network_tolerance(want, [noisy.inpaint(rgb, mask, options, noise) for _ in range(NOISE_SAMPLES)])

        assert_within(float(np.max(np.abs(got - want))), loop_noise, f"generated image (guidance {guidance}): TensorRT vs ONNX Runtime")
    finally:
        for e in engines.values():
            e.close()
