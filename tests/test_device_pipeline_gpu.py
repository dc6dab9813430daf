"""runtime/device_pipeline.py: the generation chain kept on the device, and the pipeline's device-graph mode.

On CPU:

- the plan (which models are opened, each engine's dims, what chains into what, the copy
  counts of a generation) as plain functions;
- ``export_models(device_graphs=True)`` writes the three graphs into the manifest, and
  ``build_engines`` gives ``rmbg_full`` its photo-size profile;
- ``Pipeline.load(..., device_graphs=True)`` on ONNX Runtime runs the same graph chain
  end to end: equal to the host pipeline (same photo, prompt and noise) on the generated
  image (within the host pipeline's rounding noise, :mod:`tolerance`) and the alpha (one
  8-bit step: the two resample with different implementations);
- the orchestration: :class:`DeviceChain`, ``mask_with`` and a whole ``Pipeline.replace``
  run their TensorRT/CUDA code against the emulation of TensorRT and cuda-python from
  tests/test_trt_loop_gpu.py (device memory as bounds-checked host blocks, ONNX Runtime
  executing the bound addresses). This tests the chaining and the copy counts (one
  download per generated image), **not TensorRT**.

On a GPU (``@pytest.mark.gpu``, skipped with the reason otherwise): TensorRT plans of the
tiny export, ``Pipeline.load(provider="trt")`` picks the device chain, and its output is
compared with the host pipeline on ONNX Runtime per output.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import test_trt_loop_gpu as emulation  # the TensorRT / cuda-python emulation (a test module; not collected again)
from skimage import data
from tolerance import EIGHT_BIT_STEP, NOISE_SAMPLES, assert_within, graph_tolerances, network_tolerance, noisy_engine, noisy_pipeline

from trt_bgswap.engines.build import PHOTO_SIDE, build_engines
from trt_bgswap.engines.profiles import DimRange, profile_from_ranges
from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.manifest import Manifest
from trt_bgswap.runtime.device_pipeline import (
    DECODER,
    DEVICE_GRAPHS,
    DTOD,
    DTOH,
    ENCODER,
    HTOD,
    RMBG,
    ChainedStepLoop,
    DeviceChain,
    Endpoint,
    GenerationInputs,
    chain_plan,
    device_graphs_in,
    mask_plan,
    mask_with,
    models_to_open,
)
from trt_bgswap.runtime.ort_backend import OrtEngine
from trt_bgswap.runtime.pipeline import GenerationOptions, Noise, Pipeline
from trt_bgswap.runtime.scheduler import LCMScheduler
from trt_bgswap.runtime.step_loop import STEP_MODEL, DenoiseInputs, denoise
from trt_bgswap.specs import pipeline_dims, rmbg_full_spec, vae_decoder_image_spec

WIDTH, HEIGHT = 192, 128  # a multiple of the tiny model's size multiple (64), non-square
# The alpha becomes an 8-bit mask; the device graph resamples with ONNX Runtime's (or TensorRT's)
# Resize where the masker uses numpy: parity is asked to one 8-bit step, as in test_masker.
ALPHA_TOL = EIGHT_BIT_STEP
PROMPT = "a sunny beach with palm trees, photograph"


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def host_rounding(folder: Path, noisy_dir: Path, clean: np.ndarray, run: Callable[[Pipeline], np.ndarray], float16: bool = False) -> Callable[[], float]:
    """The host pipeline's rounding noise on ``run`` (every graph node carrying its noise), computed when asked for.

    ``float16``: any layer of the engine judged may have run in float16 (TensorRT fp16 plans).
    """

    def tolerance() -> float:
        noisy = noisy_pipeline(folder, noisy_dir, float16)
        return network_tolerance(clean, [run(noisy) for _ in range(NOISE_SAMPLES)])

    return tolerance


@pytest.fixture(scope="module")
def device_export(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models exported with the fused step and the device graphs (once for this module)."""
    from trt_bgswap.export.exporter import export_models

    out = tmp_path_factory.mktemp("device-export") / "export"
    export_models(
        tiny_models_dir / "sd-inpainting",
        tiny_models_dir / "lcm-lora",
        tiny_models_dir / "rmbg",
        out,
        precision="fp32",
        fused_step=True,
        device_graphs=True,
    )
    return out


@pytest.fixture(scope="module")
def manifest(device_export: Path) -> Manifest:
    return Manifest.load(device_export)


@pytest.fixture(scope="module")
def host(device_export: Path) -> Pipeline:
    return Pipeline.load(device_export, provider="cpu")


@pytest.fixture(scope="module")
def graphs(device_export: Path) -> Pipeline:
    return Pipeline.load(device_export, provider="cpu", device_graphs=True)


# --- the plan ----------------------------------------------------------------------------------


def test_export_writes_the_device_graphs_into_the_manifest(device_export: Path, manifest: Manifest) -> None:
    assert manifest.inpaint is not None
    for name in DEVICE_GRAPHS:
        assert name in manifest.models, f"{name} missing from {sorted(manifest.models)}"
        assert (device_export / manifest.models[name].file).is_file(), f"{name}: {manifest.models[name].file} not written"
    assert manifest.models[DECODER].spec == vae_decoder_image_spec(3, manifest.inpaint.latent_channels)
    assert manifest.models[RMBG].spec == rmbg_full_spec("B")
    assert device_graphs_in(manifest) == list(DEVICE_GRAPHS)


def test_models_to_open_swaps_host_models_for_device_graphs(manifest: Manifest, exported_dir: Path) -> None:
    on = models_to_open(manifest, True)
    off = models_to_open(manifest, False)
    assert not {"vae_encoder", "vae_decoder", "rmbg"} & set(on) and set(DEVICE_GRAPHS) <= set(on), on
    assert not set(DEVICE_GRAPHS) & set(off) and {"vae_encoder", "vae_decoder", "rmbg"} <= set(off), off
    plain = Manifest.load(exported_dir)
    with pytest.raises(UsageError, match="--device-graphs"):
        models_to_open(plain, True)
    assert models_to_open(plain, False) == list(plain.models)
    half = Manifest.load(exported_dir)
    half.models[ENCODER] = manifest.models[ENCODER]
    with pytest.raises(ModelError, match="VAE device graphs"):
        device_graphs_in(half)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("size", [(WIDTH, HEIGHT), (512, 512)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_chain_plan_dims_links_and_copies(manifest: Manifest, size: tuple[int, int], guided: bool) -> None:
    cfg = manifest.inpaint
    assert cfg is not None
    specs = {name: manifest.models[name].spec for name in (ENCODER, STEP_MODEL, DECODER)}
    plan = chain_plan(specs, cfg, size[1], size[0], guided)
    dims = pipeline_dims(1, size[1], size[0], cfg.vae_scale_factor)
    assert plan.dims[ENCODER] == dims and plan.dims[DECODER] == dims
    assert plan.dims[STEP_MODEL] == {"B": 2 if guided else 1, "h": dims["h"], "w": dims["w"]}
    latent_bytes = 4 * cfg.latent_channels * dims["h"] * dims["w"]
    assert [(l.src, l.dst, l.nbytes) for l in plan.links] == [
        (Endpoint(ENCODER, "masked_image_latents"), Endpoint(STEP_MODEL, "masked_image_latents"), latent_bytes),
        (Endpoint(STEP_MODEL, "prev_latents"), Endpoint(DECODER, "latents"), latent_bytes),
    ]
    assert Endpoint(STEP_MODEL, "masked_image_latents") not in plan.uploads, "the encoder's latents must not come from the host"
    assert plan.downloads == (Endpoint(DECODER, "image"),)
    assert plan.copies(schedule_changed=True) == {HTOD: 7, DTOD: 2, DTOH: 1}
    assert plan.copies(schedule_changed=False) == {HTOD: 6, DTOD: 2, DTOH: 1}


def test_chain_plan_refuses_graphs_that_do_not_fit(manifest: Manifest) -> None:
    cfg = manifest.inpaint
    assert cfg is not None
    specs = {name: manifest.models[name].spec for name in (ENCODER, STEP_MODEL, DECODER)}
    wrong = dict(specs, **{DECODER: vae_decoder_image_spec(3, cfg.latent_channels + 1)})
    with pytest.raises(ModelError, match="latents"):
        chain_plan(wrong, cfg, HEIGHT, WIDTH, False)
    with pytest.raises(ModelError, match="unet_step"):
        chain_plan({k: v for k, v in specs.items() if k != STEP_MODEL}, cfg, HEIGHT, WIDTH, False)


@pytest.mark.parametrize("batch", ["B", 1])
def test_mask_plan(batch: str | int) -> None:
    plan = mask_plan(rmbg_full_spec(batch), 300, 451)
    assert plan.dims[RMBG] == {"PH": 300, "PW": 451, **({"B": 1} if batch == "B" else {})}
    assert plan.copies(schedule_changed=False) == {HTOD: 1, DTOD: 0, DTOH: 1}


def test_build_gives_rmbg_full_a_photo_size_profile(device_export: Path, tmp_path: Path) -> None:
    report = build_engines(device_export, backend="ort", provider="cpu", out_dir=tmp_path / "engines", sizes=[(WIDTH, HEIGHT)])
    assert set(DEVICE_GRAPHS) <= set(report.models), sorted(report.models)
    (profile,) = report.models[RMBG].profiles
    assert profile.tensor("image").min == (1, PHOTO_SIDE.min, PHOTO_SIDE.min, 3)
    assert profile.tensor("image").max == (1, PHOTO_SIDE.max, PHOTO_SIDE.max, 3)
    assert profile.tensor("image").contains((1, 300, 451, 3))


# --- the graph chain on ONNX Runtime, end to end -----------------------------------------------


def photo_and_mask(name: str) -> tuple[np.ndarray, np.ndarray]:
    rgb = getattr(data, name)()
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    subject = ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2 < 1.0
    return rgb, np.where(subject, 0, 255).astype(np.uint8)


def test_device_graph_pipeline_opens_the_device_graphs_only(graphs: Pipeline, host: Pipeline) -> None:
    assert set(DEVICE_GRAPHS) <= set(graphs.engines) and graphs.masker is None
    assert not {"vae_encoder", "vae_decoder", "rmbg"} & set(graphs.engines)
    assert not set(DEVICE_GRAPHS) & set(host.engines), "the host path (the default on ONNX Runtime) must not open them"
    assert host.device_chain is None and graphs.device_chain is None  # the device chain is TensorRT's


@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_device_graph_pipeline_equals_host_pipeline(
    host: Pipeline, graphs: Pipeline, device_export: Path, tmp_path: Path, name: str, guidance: float
) -> None:
    rgb, _ = photo_and_mask(name)
    options = GenerationOptions(prompt=PROMPT, negative_prompt="blurry", steps=3, guidance=guidance, seed=11, size=(WIDTH, HEIGHT))
    want, got = host.replace(rgb, options), graphs.replace(rgb, options)
    alpha_err = max_err(got.alpha, want.alpha)
    assert_within(alpha_err, ALPHA_TOL, f"{name}: alpha")
    assert want.generated is not None and got.generated is not None
    image_err = max_err(got.generated, want.generated)
    assert got.generated.shape == want.generated.shape
    noise = host_rounding(device_export, tmp_path, want.generated, lambda p: p.replace(rgb, options).generated)
    assert_within(image_err, noise, f"{name}, guidance {guidance}: generated image")
    # rounded to uint8 on both sides: float differences below a level may still round apart by one
    assert max_err(got.image, want.image) <= 1, f"{name}: composited uint8 image differs by more than one level"
    print(f"device graphs vs host, {name}, guidance {guidance}: generated {image_err:.3g}, alpha {alpha_err:.3g}")


@pytest.mark.parametrize("name", ["astronaut", "rocket"])
def test_device_graph_inpaint_equals_host_with_given_mask_and_noise(host: Pipeline, graphs: Pipeline, device_export: Path, tmp_path: Path, name: str) -> None:
    rgb, mask = photo_and_mask(name)
    cfg = host.config
    assert cfg is not None
    shape = (1, cfg.latent_channels, HEIGHT // cfg.vae_scale_factor, WIDTH // cfg.vae_scale_factor)
    noise = Noise.from_seed(5, shape, 4)
    options = GenerationOptions(prompt=PROMPT, steps=4, guidance=1.5, size=(WIDTH, HEIGHT))
    want = host.inpaint(rgb, mask, options, noise)
    err = max_err(graphs.inpaint(rgb, mask, options, noise), want)
    assert_within(err, host_rounding(device_export, tmp_path, want, lambda p: p.inpaint(rgb, mask, options, noise)), f"{name}: generated image")


# --- the TensorRT orchestration on an emulated device (CPU) --------------------------------------


@pytest.fixture()
def emulated_device(monkeypatch: pytest.MonkeyPatch) -> "emulation.EmulatedCudart":
    """tests/test_trt_loop_gpu.py's emulation, with output-only dims (the decoder's H, W) derived as a plan records them.

    ``derived`` maps an output-only symbol to ``[source symbol, mul, div]``: the value TensorRT would report.
    """
    from trt_bgswap.runtime import cuda_device

    cuda = emulation.EmulatedCudart()
    trt = emulation.emulated_tensorrt(cuda)
    base = trt.Runtime

    class Runtime(base):  # type: ignore[misc, valid-type]
        def deserialize_cuda_engine(self, plan: bytes):  # noqa: ANN202
            engine = super().deserialize_cuda_engine(plan)
            derived = json.loads(plan).get("derived", {})
            make = engine.create_execution_context

            def create(strategy: str | None = None):  # noqa: ANN202
                ctx = make(strategy)
                from_inputs = ctx._dims

                def dims(shapes: dict) -> dict:
                    d = from_inputs(shapes)
                    return {**d, **{k: d[src] * mul // div for k, (src, mul, div) in derived.items()}}

                ctx._dims = dims
                ctx.get_tensor_shape = lambda name: engine.spec.tensor(name).resolve(dims({t.name: ctx.shapes[t.name] for t in engine.spec.inputs}))
                return ctx

            engine.create_execution_context = create
            return engine

    trt.Runtime = Runtime
    monkeypatch.setattr(cuda_device, "_cudart_module", cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return cuda


@pytest.fixture(scope="module")
def emulated_plans(device_export: Path, manifest: Manifest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Emulated "plans" of the real tiny graphs: static profiles at WIDTH x HEIGHT (B 1 and 2 for the step), photo range for RMBG."""
    from trt_bgswap.engines.build import photo_profiles

    cfg = manifest.inpaint
    assert cfg is not None
    folder = tmp_path_factory.mktemp("emulated-plans")
    size = pipeline_dims(1, HEIGHT, WIDTH, cfg.vae_scale_factor)
    plans = {}
    for name in ("text_encoder", STEP_MODEL, *DEVICE_GRAPHS):
        spec = manifest.models[name].spec
        if name == RMBG:
            profiles = photo_profiles(spec)
        else:
            batches = (1, 2) if name == STEP_MODEL else (1,)
            profiles = [profile_from_ranges(spec, {s: DimRange.fixed(v) for s, v in {**size, "B": b}.items()}) for b in batches]
        plan = {
            "onnx": str(device_export / manifest.models[name].file),
            "spec": spec.to_json(),
            "profiles": [p.to_json() for p in profiles],
            "derived": {"H": ["h", cfg.vae_scale_factor, 1], "W": ["w", cfg.vae_scale_factor, 1]} if name == DECODER else {},
        }
        plans[name] = folder / f"{name}.plan"
        plans[name].write_text(json.dumps(plan))
    return plans


def emulated_chain(plans: dict[str, Path], manifest: Manifest, use_cuda_graph: bool) -> DeviceChain:
    from trt_bgswap.runtime.cuda_device import Stream
    from trt_bgswap.runtime.trt_backend import TrtEngine

    assert manifest.inpaint is not None
    stream = Stream()
    spec = lambda name: manifest.models[name].spec  # noqa: E731
    loop = ChainedStepLoop(spec(STEP_MODEL), plans[STEP_MODEL], stream=stream, use_cuda_graph=use_cuda_graph)
    return DeviceChain(TrtEngine(spec(ENCODER), plans[ENCODER], stream=stream), loop, TrtEngine(spec(DECODER), plans[DECODER], stream=stream), manifest.inpaint)


def chain_inputs(host: Pipeline, steps: int, guidance: float, seed: int) -> GenerationInputs:
    cfg = host.config
    assert cfg is not None
    f = cfg.vae_scale_factor
    rng = np.random.default_rng(seed)
    latent = (1, cfg.latent_channels, HEIGHT // f, WIDTH // f)
    draw = lambda: rng.standard_normal(latent).astype(np.float32)  # noqa: E731
    cond = host.text_embeddings(PROMPT)
    embeddings = np.concatenate([host.text_embeddings(""), cond]) if guidance > 1 else cond
    image = data.coffee()[:HEIGHT, :WIDTH].transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1.0
    mask = (rng.random((1, 1, HEIGHT // f, WIDTH // f)) < 0.5).astype(np.float32)
    masked = image * (1.0 - np.kron(mask, np.ones((f, f), np.float32)))
    return GenerationInputs(masked.astype(np.float32), draw(), draw(), tuple(draw() for _ in range(steps - 1)), mask, embeddings, guidance)


def coefficients(steps: int):  # noqa: ANN201 - LCMCoefficients
    sched = LCMScheduler()
    sched.set_timesteps(steps)
    assert sched.coefficients is not None
    return sched.coefficients


def graph_chain_reference(
    device_export: Path, manifest: Manifest, coeff, inputs: GenerationInputs, masked_latents: bool = True, engine: Callable[[str], OrtEngine] | None = None  # noqa: ANN001
) -> np.ndarray:
    """The same three graphs chained through host arrays on ONNX Runtime (``engine(name)`` opens each; default: the graphs as exported)."""
    if engine is None:
        engine = lambda name: OrtEngine(manifest.models[name].spec, device_export / manifest.models[name].file, provider="cpu")  # noqa: E731
    latents = engine(ENCODER)(sample=inputs.masked_image, eps=inputs.eps)["masked_image_latents"]
    if not masked_latents:
        latents = np.zeros_like(latents)
    final = denoise(engine(STEP_MODEL), coeff, DenoiseInputs(inputs.latents, inputs.step_noise, inputs.latent_mask, latents, inputs.embeddings, inputs.guidance))
    return engine(DECODER)(latents=final)["image"]


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_emulated_device_chain_equals_graph_chain_with_one_download(
    emulated_device, emulated_plans: dict[str, Path], device_export: Path, manifest: Manifest, host: Pipeline, guidance: float, tmp_path: Path  # noqa: ANN001
) -> None:
    chain = emulated_chain(emulated_plans, manifest, use_cuda_graph=True)
    counts = emulated_device.counts
    try:
        for run, (steps, seed) in enumerate(((3, 1), (3, 2), (2, 3))):
            inputs, coeff = chain_inputs(host, steps, guidance, seed), coefficients(steps)
            before = dict(counts)
            got = chain.generate(coeff, inputs)
            delta = {k: counts[k] - before[k] for k in (HTOD, DTOD, DTOH)}
            assert chain.last_plan is not None
            expected = chain.last_plan.copies(schedule_changed=run != 1)  # run 1 repeats run 0's schedule
            assert delta == expected, f"run {run}: copies {delta}, the plan says {expected}"
            want = graph_chain_reference(device_export, manifest, coeff, inputs)
            assert got.shape == (1, 3, HEIGHT, WIDTH)

            def chain_noise(coeff=coeff, inputs=inputs, want=want) -> float:  # noqa: ANN001 - the graph chain's rounding noise
                noisy = functools.cache(lambda name: noisy_engine(manifest.models[name].spec, device_export / manifest.models[name].file, tmp_path / f"{name}.onnx"))
                return network_tolerance(want, [graph_chain_reference(device_export, manifest, coeff, inputs, engine=noisy) for _ in range(NOISE_SAMPLES)])

            assert_within(max_err(got, want), chain_noise, f"run {run} ({chain.loop.last_action}): image vs the ONNX Runtime graph chain")
            # the encoder's latents reached the loop on the device (the host placeholder is zeros)
            assert max_err(graph_chain_reference(device_export, manifest, coeff, inputs, masked_latents=False), want) > 1e-4
    finally:
        chain.close()
        for engine in (chain.encoder, chain.decoder):
            engine.close()
    assert emulated_device.counts["execute"] > 0


def test_emulated_mask_is_one_upload_and_one_download(emulated_device, emulated_plans: dict[str, Path], device_export: Path, manifest: Manifest) -> None:  # noqa: ANN001
    from trt_bgswap.runtime.trt_backend import TrtEngine

    engine = TrtEngine(manifest.models[RMBG].spec, emulated_plans[RMBG])
    reference = OrtEngine(manifest.models[RMBG].spec, device_export / manifest.models[RMBG].file, provider="cpu")
    counts = emulated_device.counts
    try:
        mallocs = []
        for name in ("coffee", "chelsea"):  # 400x600, then a smaller photo in the same buffers
            rgb = getattr(data, name)()
            before = dict(counts)
            got = mask_with(engine, rgb)
            delta = {k: counts[k] - before[k] for k in counts}
            assert (delta[HTOD], delta[DTOD], delta[DTOH]) == (1, 0, 1), f"{name}: copies {delta}"
            mallocs.append(delta["malloc"])
            want = reference(image=rgb[None])["alpha"]
            assert got.shape == rgb.shape[:2]
            # the same graph through the emulated device: at most its rounding noise apart (exact, in fact)
            noise = lambda rgb=rgb, want=want: graph_tolerances(reference.path, {"image": rgb[None]}, {"alpha": want})["alpha"]  # noqa: E731
            assert_within(max_err(got, want[0, 0]), noise, f"{name}: alpha vs ONNX Runtime")
        assert mallocs[0] > 0 and mallocs[1] == 0, f"buffers were reallocated for a smaller photo: {mallocs}"
    finally:
        engine.close()


@pytest.fixture(scope="module")
def emulated_trt_folder(device_export: Path, manifest: Manifest, emulated_plans: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export folder as `trt-bgswap build --backend trt` leaves it: manifest, tokenizer, engines/index-trt.json -> (emulated) plans."""
    import shutil

    cfg = manifest.inpaint
    assert cfg is not None
    folder = tmp_path_factory.mktemp("emulated-trt") / "export"
    (folder / "engines").mkdir(parents=True)
    shutil.copy(device_export / "manifest.json", folder / "manifest.json")
    shutil.copytree(device_export / cfg.tokenizer_dir, folder / cfg.tokenizer_dir)
    size = pipeline_dims(1, HEIGHT, WIDTH, cfg.vae_scale_factor)
    index = {}
    for name, entry in manifest.models.items():
        plan = folder / "engines" / f"{name}.plan"
        if name in emulated_plans:
            shutil.copy(emulated_plans[name], plan)
        else:  # the host-path models, for device_graphs=False
            batches = (1, 2) if name == "unet" else (1,)
            extra = {"S": manifest.rmbg.input_size[0]} if name == "rmbg" and manifest.rmbg else {}
            profiles = [profile_from_ranges(entry.spec, {s: DimRange.fixed(v) for s, v in {**size, **extra, "B": b}.items()}) for b in batches]
            f = cfg.vae_scale_factor
            derived = {"H": ["h", f, 1], "W": ["w", f, 1]} if name == "vae_decoder" else {}
            derived.update({"h": ["H", 1, f], "w": ["W", 1, f]} if name == "vae_encoder" else {})
            plan.write_text(json.dumps({"onnx": str(device_export / entry.file), "spec": entry.spec.to_json(), "profiles": [p.to_json() for p in profiles], "derived": derived}))
        index[name] = {"path": plan.name}
    (folder / "engines" / "index-trt.json").write_text(json.dumps(index))
    return folder


@pytest.fixture()
def trt_machine(monkeypatch: pytest.MonkeyPatch, emulated_device) -> "emulation.EmulatedCudart":  # noqa: ANN001
    """A machine that reports a CUDA device and tensorrt (the emulation), so `auto` and `trt` pick TensorRT."""
    from trt_bgswap.runtime.backends import Availability

    monkeypatch.setattr(Availability, "probe", classmethod(lambda cls: cls(cuda_devices=1, tensorrt=True, ort_providers=("CPUExecutionProvider",))))
    return emulated_device


def test_emulated_trt_load_picks_the_device_chain_and_replace_downloads_only_alpha_and_image(
    trt_machine, emulated_trt_folder: Path, host: Pipeline, device_export: Path, tmp_path: Path  # noqa: ANN001
) -> None:
    from trt_bgswap.runtime.device_pipeline import same_stream

    pipe = Pipeline.load(emulated_trt_folder, provider="auto")
    chain = pipe.device_chain
    assert chain is not None and pipe.step_loop is chain.loop, "TensorRT + device graphs must run the device chain"
    # the fused step loop stands in for the UNet, so the plain UNet engine is not opened (no second copy in memory)
    assert set(pipe.engines) == {"text_encoder", *DEVICE_GRAPHS}, sorted(pipe.engines)
    assert same_stream(*(e.stream for e in pipe.engines.values() if hasattr(e, "stream")), chain.loop.stream)
    rgb = data.chelsea()
    options = GenerationOptions(prompt=PROMPT, negative_prompt="blurry", steps=3, guidance=2.0, seed=4, size=(WIDTH, HEIGHT))
    counts = trt_machine.counts
    try:
        pipe.text_embeddings(PROMPT), pipe.text_embeddings("blurry")  # prompts encoded (and cached) beforehand
        before = dict(counts)
        got = pipe.replace(rgb, options)
        delta = {k: counts[k] - before[k] for k in (HTOD, DTOD, DTOH)}
        assert delta[DTOH] == 2, f"a replace must download the alpha and the generated image only: {delta}"
        assert delta[DTOD] == 2, f"encoder -> loop and loop -> decoder stay on the device: {delta}"
        assert delta[HTOD] == 1 + 7, f"the photo once, then the generation's seven uploads: {delta}"
        want = host.replace(rgb, options)
        assert want.generated is not None and got.generated is not None
        image_err, alpha_err = max_err(got.generated, want.generated), max_err(got.alpha, want.alpha)
        noise = host_rounding(device_export, tmp_path, want.generated, lambda p: p.replace(rgb, options).generated)
        assert_within(image_err, noise, "generated image vs the host pipeline on ONNX Runtime")
        assert_within(alpha_err, ALPHA_TOL, "alpha vs the host pipeline")
        assert "device chain" in pipe.backends()[STEP_MODEL]
    finally:
        chain.close()
        for engine in pipe.engines.values():
            engine.unload()


def test_emulated_trt_load_without_device_graphs_keeps_the_host_path(
    trt_machine, emulated_trt_folder: Path, host: Pipeline, device_export: Path, tmp_path: Path  # noqa: ANN001
) -> None:
    pipe = Pipeline.load(emulated_trt_folder, provider="trt", device_graphs=False)
    assert pipe.device_chain is None and pipe.step_loop is not None
    assert not set(DEVICE_GRAPHS) & set(pipe.engines) and pipe.masker is not None
    rgb = data.coffee()
    options = GenerationOptions(prompt=PROMPT, steps=2, guidance=1.0, seed=9, size=(WIDTH, HEIGHT))
    try:
        got, want = pipe.replace(rgb, options), host.replace(rgb, options)
        assert got.generated is not None and want.generated is not None
        err = max_err(got.generated, want.generated)
        noise = host_rounding(device_export, tmp_path, want.generated, lambda p: p.replace(rgb, options).generated)
        assert_within(err, noise, "host path on (emulated) TensorRT: generated image")
    finally:
        pipe.step_loop.close()
        for engine in pipe.engines.values():
            engine.unload()
        pipe.masker.engine.unload()


# --- on a GPU --------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def trt_gpu() -> None:
    """Skip (with the reason) unless tensorrt, cuda-python and a CUDA device are all present."""
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("needs TensorRT: the tensorrt package is not installed (pip install 'trt-bgswap[trt]' on a GPU machine)")
    if importlib.util.find_spec("cuda") is None:
        pytest.skip("needs cuda-python (pip install 'trt-bgswap[trt]')")
    from trt_bgswap.runtime.cuda_device import device_count_via_driver

    if device_count_via_driver() < 1:
        pytest.skip("needs an NVIDIA GPU: no CUDA device visible to the driver")


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_tensorrt_device_chain_matches_host_pipeline(trt_gpu: None, device_export: Path, host: Pipeline, tmp_path: Path, precision: str, guidance: float) -> None:
    import shutil

    folder = tmp_path / "export"
    shutil.copytree(device_export, folder)  # the plans go into <export>/engines, where Pipeline.load looks
    build_engines(folder, backend="trt", precision=precision, sizes=[(WIDTH, HEIGHT)], batches=(1, 2), tf32=False, opt_level=1)
    pipe = Pipeline.load(folder, provider="trt")
    assert pipe.device_chain is not None, "TensorRT with device graphs must run the device chain"
    rgb = data.chelsea()
    options = GenerationOptions(prompt=PROMPT, negative_prompt="blurry", steps=4, guidance=guidance, seed=3, size=(WIDTH, HEIGHT))
    got, want = pipe.replace(rgb, options), host.replace(rgb, options)
    assert got.generated is not None and want.generated is not None

    # the host pipeline's rounding noise, with any layer in float16 for fp16 plans (TensorRT chooses per layer)
    @functools.cache
    def noisy() -> list:  # noqa: ANN202 - Results
        pipeline = noisy_pipeline(device_export, tmp_path / "noisy", float16=precision == "fp16")
        return [pipeline.replace(rgb, options) for _ in range(NOISE_SAMPLES)]

    generated_noise = lambda: network_tolerance(want.generated, [r.generated for r in noisy()])  # noqa: E731
    # the alpha also resamples with TensorRT's Resize vs numpy: one 8-bit step on top of the rounding noise
    alpha_noise = lambda: ALPHA_TOL + network_tolerance(want.alpha, [r.alpha for r in noisy()])  # noqa: E731
    assert_within(max_err(got.generated, want.generated), generated_noise, f"generated ({precision}, guidance {guidance}): TensorRT device chain vs host ONNX Runtime")
    assert_within(max_err(got.alpha, want.alpha), alpha_noise, f"alpha ({precision}, guidance {guidance}): TensorRT device chain vs host ONNX Runtime")
    # the second generation replays the captured loop and still agrees
    again = pipe.replace(rgb, options)
    assert again.generated is not None and max_err(again.generated, got.generated) == 0.0, "replay differs from the first run"
