"""runtime/device_chain.py: the generation chain kept on the device, and the pipeline's device-graph mode.

On CPU:

- the plan (which models are opened, each engine's dims, what chains into what, the copy
  counts of a generation) as plain functions;
- ``export_models(device_graphs=True)`` writes the three graphs into the manifest, and
  ``build_engines`` gives ``rmbg_full`` its photo-size profile;
- ``Pipeline.load(..., device_graphs=True)`` on ONNX Runtime runs the same graph chain
  end to end: equal to the host pipeline (same photo, prompt and noise) on the generated
  image (within the host pipeline's rounding noise, :mod:`tolerance`) and the alpha (one
  8-bit step: the two resample with different implementations);
- the orchestration: :class:`DeviceChain`, :class:`DeviceMasker` and a whole ``Pipeline.replace``
  run their TensorRT/CUDA code against the version-aware emulation of TensorRT and
  cuda-python in tests/emulation (plans built by each emulated release, device memory as
  bounds-checked blocks, asynchronous streams, ONNX Runtime executing the bound addresses).
  This tests the chaining and the copy counts (one download per generated image) on every
  emulated release, **not TensorRT**.

On a GPU (``@pytest.mark.gpu``, skipped with the reason otherwise): TensorRT plans of the
tiny export, ``Pipeline.load(provider="trt")`` picks the device chain, and its output is
compared with the host pipeline on ONNX Runtime per output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from emulation import STACKS, Emulation, StackSpec, emulate
from skimage import data
from tolerance import EIGHT_BIT_STEP, NOISE_SAMPLES, assert_within, graph_tolerances, network_tolerance, noisy_engine, noisy_pipeline

from trt_bgswap.build_index import TRT, IndexEntry, write_index
from trt_bgswap.engines.build import PHOTO_SIDE, build_engines
from trt_bgswap.engines.profiles import DimRange, profile_from_ranges
from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.manifest import Manifest
from trt_bgswap.runtime.assemble import device_graphs_in, models_to_open
from trt_bgswap.runtime.backends import Availability
from trt_bgswap.runtime.denoise import DenoiseInputs, fused_denoise
from trt_bgswap.runtime.device_chain import DECODER, DTOD, DTOH, ENCODER, HTOD, STEP_MODEL, ChainedStepLoop, DeviceChain, Endpoint, chain_plan, same_stream
from trt_bgswap.runtime.generator import GenerationInputs
from trt_bgswap.runtime.masker import DeviceMasker, Masker
from trt_bgswap.runtime.ort_backend import OrtEngine
from trt_bgswap.runtime.pipeline import GenerationOptions, Noise, Pipeline
from trt_bgswap.runtime.scheduler import LCMScheduler
from trt_bgswap.runtime.trt_loop import GRAPH_REPLAY, TrtStepLoop
from trt_bgswap.runtime.vae import image_hwc
from trt_bgswap.specs import DEVICE_GRAPHS, pipeline_dims, rmbg_full_spec, vae_decoder_image_spec
from trt_bgswap.specs import RMBG_FULL as RMBG

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
def device_export(device_export_dir: Path) -> Path:
    """The tiny models exported with the fused step and the device graphs (the session's, tests/conftest.py; read-only)."""
    return device_export_dir


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
    assert plan.copies(schedule_changed=True, steps=3) == {HTOD: 7, DTOD: 2 + 3 * 4, DTOH: 1}
    assert plan.copies(schedule_changed=False, steps=1) == {HTOD: 6, DTOD: 2 + 4, DTOH: 1}


def test_chain_plan_refuses_graphs_that_do_not_fit(manifest: Manifest) -> None:
    cfg = manifest.inpaint
    assert cfg is not None
    specs = {name: manifest.models[name].spec for name in (ENCODER, STEP_MODEL, DECODER)}
    wrong = dict(specs, **{DECODER: vae_decoder_image_spec(3, cfg.latent_channels + 1)})
    with pytest.raises(ModelError, match="latents"):
        chain_plan(wrong, cfg, HEIGHT, WIDTH, False)
    with pytest.raises(ModelError, match="unet_step"):
        chain_plan({k: v for k, v in specs.items() if k != STEP_MODEL}, cfg, HEIGHT, WIDTH, False)


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
    assert set(DEVICE_GRAPHS) <= set(graphs.engines) and isinstance(graphs.stages.masker, DeviceMasker)
    assert not {"vae_encoder", "vae_decoder", "rmbg"} & set(graphs.engines)
    assert not set(DEVICE_GRAPHS) & set(host.engines), "the host path (the default on ONNX Runtime) must not open them"
    # the device chain is TensorRT's: on ONNX Runtime the device graphs run as ordinary stages
    assert not isinstance(host.stages.generator, DeviceChain) and not isinstance(graphs.stages.generator, DeviceChain)


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




def plan_profiles(name: str, manifest: Manifest) -> list:
    """The profiles `trt-bgswap build` gives each graph, at WIDTH x HEIGHT (B 1 and 2 for the UNets), photo range for RMBG."""
    from trt_bgswap.engines.build import photo_profiles

    cfg = manifest.inpaint
    assert cfg is not None
    spec = manifest.models[name].spec
    if name == RMBG:
        return photo_profiles(spec)
    size = pipeline_dims(1, HEIGHT, WIDTH, cfg.vae_scale_factor)
    extra = {"S": manifest.rmbg.input_size[0]} if name == "rmbg" and manifest.rmbg else {}
    batches = (1, 2) if name in (STEP_MODEL, "unet") else (1,)
    dims_of = lambda b: {s: v for s, v in {**size, **extra, "B": b}.items() if s in {d for t in spec.inputs for d in t.shape if isinstance(d, str)}}  # noqa: E731
    return [profile_from_ranges(spec, {s: DimRange.fixed(v) for s, v in dims_of(b).items()}) for b in batches]


@pytest.fixture(scope="module")
def plan_store(device_export: Path, manifest: Manifest, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - (StackSpec) -> {name: Path}
    """Plans of every exported graph, built by each emulated TensorRT release (once per release for this module)."""
    built: dict[str, dict[str, Path]] = {}

    def plans(stack: StackSpec) -> dict[str, Path]:
        if stack.id not in built:
            folder = tmp_path_factory.mktemp(f"plans-{stack.tensorrt}")
            with emulate(stack) as em:
                built[stack.id] = {
                    name: em.build_plan(device_export / entry.file, folder / f"{name}.plan", plan_profiles(name, manifest))
                    for name, entry in manifest.models.items()
                }
        return built[stack.id]

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


def scheduler(steps: int) -> LCMScheduler:
    sched = LCMScheduler()
    sched.set_timesteps(steps)
    return sched


_REFERENCE_ENGINES: dict[tuple[Path, str], OrtEngine] = {}


def _reference_engine(device_export: Path, manifest: Manifest, name: str) -> OrtEngine:
    """One ONNX Runtime session per graph for the whole module (sessions take longer to make than to run here)."""
    key = (device_export, name)
    if key not in _REFERENCE_ENGINES:
        _REFERENCE_ENGINES[key] = OrtEngine(manifest.models[name].spec, device_export / manifest.models[name].file, provider="cpu")
    return _REFERENCE_ENGINES[key]


def graph_chain_reference(
    device_export: Path,
    manifest: Manifest,
    sched: LCMScheduler,
    inputs: GenerationInputs,
    masked_latents: bool = True,
    engine: Callable[[str], OrtEngine] | None = None,
) -> np.ndarray:
    """The same three graphs chained through host arrays on ONNX Runtime (HxWx3, as the chain returns it).

    ``engine(name)`` opens each graph; default: the graphs as exported, one session each for the module.
    """
    if engine is None:
        engine = lambda name: _reference_engine(device_export, manifest, name)  # noqa: E731
    latents = engine(ENCODER)(sample=inputs.masked_image, eps=inputs.eps)["masked_image_latents"]
    if not masked_latents:
        latents = np.zeros_like(latents)
    assert sched.coefficients is not None
    final = fused_denoise(engine(STEP_MODEL), sched.coefficients, DenoiseInputs(inputs.latents, inputs.step_noise, inputs.latent_mask, latents, inputs.embeddings, inputs.guidance))
    return image_hwc(engine(DECODER)(latents=final)["image"])


@pytest.mark.parametrize("stack, guidance", list(zip(STACKS, (1.0, 2.0, 2.0))), ids=lambda v: v.id if isinstance(v, StackSpec) else f"g{v}")
def test_emulated_device_chain_equals_graph_chain_with_one_download(
    plan_store, stack: StackSpec, device_export: Path, manifest: Manifest, host: Pipeline, guidance: float, tmp_path: Path  # noqa: ANN001
) -> None:
    plans = plan_store(stack)
    with emulate(stack) as em:
        _device_chain_runs(em, plans, device_export, manifest, host, guidance, tmp_path)
        assert not em.leaks(), f"left behind: {em.leaks()}"


def _device_chain_runs(em: Emulation, plans: dict[str, Path], device_export: Path, manifest: Manifest, host: Pipeline, guidance: float, tmp_path: Path) -> None:
    chain = emulated_chain(plans, manifest, use_cuda_graph=True)
    counts = em.counts
    chain.load()  # as Pipeline.load does: engines deserialized and step graphs captured before the first generation
    captures = counts["captures"]
    try:
        for run, (steps, seed) in enumerate(((3, 1), (3, 2), (2, 3))):
            inputs, coeff = chain_inputs(host, steps, guidance, seed), scheduler(steps)
            before = dict(counts)
            got = chain.generate(coeff, inputs)
            delta = {k: counts[k] - before.get(k, 0) for k in (HTOD, DTOD, DTOH)}
            assert chain.last_plan is not None
            expected = chain.last_plan.copies(schedule_changed=run != 1, steps=steps)  # run 1 repeats run 0's schedule
            assert delta == expected, f"run {run}: copies {delta}, the plan says {expected}"
            want = graph_chain_reference(device_export, manifest, coeff, inputs)
            assert got.shape == (1, HEIGHT, WIDTH, 3), f"image shape {got.shape}"

            def chain_noise(coeff: LCMScheduler = coeff, inputs: GenerationInputs = inputs, want: np.ndarray = want) -> float:  # the graph chain's rounding noise
                noisy = functools.cache(lambda name: noisy_engine(manifest.models[name].spec, device_export / manifest.models[name].file, tmp_path / f"{name}.onnx"))
                return network_tolerance(want, [graph_chain_reference(device_export, manifest, coeff, inputs, engine=noisy) for _ in range(NOISE_SAMPLES)])

            assert_within(max_err(got, want), chain_noise, f"run {run} ({chain.loop.last_action}): image vs the ONNX Runtime graph chain")
            # the encoder's latents reached the loop on the device (the host placeholder is zeros)
            assert max_err(graph_chain_reference(device_export, manifest, coeff, inputs, masked_latents=False), want) > 1e-4
            assert chain.loop.last_action == GRAPH_REPLAY and counts["captures"] == captures, "the step graph was captured at load"
    finally:
        chain.close()  # the loop, the encoder and the decoder
        chain.loop.stream.close()  # the chain's engines share a stream the test made
    assert counts["execute"] > 0


def test_emulated_mask_is_one_upload_and_one_download(emulated: Emulation, plan_store, device_export: Path, manifest: Manifest) -> None:  # noqa: ANN001
    from trt_bgswap.runtime.trt_backend import TrtEngine

    engine = TrtEngine(manifest.models[RMBG].spec, plan_store(emulated.spec)[RMBG])
    masker = DeviceMasker(engine)
    reference = OrtEngine(manifest.models[RMBG].spec, device_export / manifest.models[RMBG].file, provider="cpu")
    counts = emulated.counts
    try:
        mallocs = []
        for name in ("coffee", "chelsea"):  # 400x600, then a smaller photo in the same buffers
            rgb = getattr(data, name)()
            before = dict(counts)
            got = masker.predict(rgb)
            delta = {k: counts[k] - before.get(k, 0) for k in (HTOD, DTOD, DTOH, "malloc")}
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
    assert not emulated.leaks(), f"left behind: {emulated.leaks()}"


@pytest.fixture(scope="module")
def trt_folder_store(device_export: Path, manifest: Manifest, plan_store, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    """Export folders as `trt-bgswap build --backend trt` leaves them (manifest, tokenizer, engines/index-trt.json), one per release."""
    import shutil

    folders: dict[str, Path] = {}

    def folder_for(stack: StackSpec) -> Path:
        if stack.id not in folders:
            cfg = manifest.inpaint
            assert cfg is not None
            folder = tmp_path_factory.mktemp(f"emulated-trt-{stack.tensorrt}") / "export"
            (folder / "engines").mkdir(parents=True)
            shutil.copy(device_export / "manifest.json", folder / "manifest.json")
            shutil.copytree(device_export / cfg.tokenizer_dir, folder / cfg.tokenizer_dir)
            index = {}
            for name, plan in plan_store(stack).items():
                shutil.copy(plan, folder / "engines" / f"{name}.plan")
                index[name] = IndexEntry(Path(f"{name}.plan"), TRT)
            write_index(folder / "engines", TRT, None, index)
            folders[stack.id] = folder
        return folders[stack.id]

    return folder_for


# What the machine offers, as Pipeline.load(facts=...) takes it: a CUDA device and tensorrt, so `auto` and `trt` pick
# TensorRT (the real probe counts devices through libcuda, which no import can stand in for).
GPU_MACHINE = Availability(cuda_devices=1, tensorrt=True, ort_providers=("CPUExecutionProvider",))


@pytest.fixture()
def trt_machine(emulated_stack: StackSpec) -> Iterator[Emulation]:
    """The emulated TensorRT + cuda-python."""
    with emulate(emulated_stack) as emulation:
        yield emulation


def test_emulated_trt_load_picks_the_device_chain_and_replace_downloads_only_alpha_and_image(
    trt_machine: Emulation, trt_folder_store, host: Pipeline, device_export: Path, tmp_path: Path  # noqa: ANN001
) -> None:
    pipe = Pipeline.load(trt_folder_store(trt_machine.spec), provider="auto", facts=GPU_MACHINE)
    chain = pipe.stages.generator
    assert isinstance(chain, DeviceChain), "TensorRT + device graphs must run the device chain"
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
        delta = {k: counts[k] - before.get(k, 0) for k in (HTOD, DTOD, DTOH)}
        assert delta[DTOH] == 2, f"a replace must download the alpha and the generated image only: {delta}"
        assert delta[DTOD] == 2 + options.steps * 4, f"encoder -> loop and loop -> decoder stay on the device, plus the loop's 4 copies per step: {delta}"
        assert delta[HTOD] == 1 + 7, f"the photo once, then the generation's seven uploads: {delta}"
        want = host.replace(rgb, options)
        assert want.generated is not None and got.generated is not None
        image_err, alpha_err = max_err(got.generated, want.generated), max_err(got.alpha, want.alpha)
        noise = host_rounding(device_export, tmp_path, want.generated, lambda p: p.replace(rgb, options).generated)
        assert_within(image_err, noise, "generated image vs the host pipeline on ONNX Runtime")
        assert_within(alpha_err, ALPHA_TOL, "alpha vs the host pipeline")
        assert "device chain" in pipe.backends()["generator"]
    finally:
        pipe.close()


@pytest.mark.parametrize("emulated_stack", [STACKS[-1]], ids=lambda s: s.id)  # the host path's TensorRT calls are the device chain's: one release is enough
def test_emulated_trt_load_without_device_graphs_keeps_the_host_path(
    trt_machine: Emulation, trt_folder_store, host: Pipeline, device_export: Path, tmp_path: Path  # noqa: ANN001
) -> None:
    pipe = Pipeline.load(trt_folder_store(trt_machine.spec), provider="trt", device_graphs=False, facts=GPU_MACHINE)
    assert isinstance(pipe.stages.generator.denoiser, TrtStepLoop), "the fused step graph runs as TensorRT's device loop"
    assert not set(DEVICE_GRAPHS) & set(pipe.engines) and isinstance(pipe.stages.masker, Masker)
    rgb = data.coffee()
    options = GenerationOptions(prompt=PROMPT, steps=2, guidance=1.0, seed=9, size=(WIDTH, HEIGHT))
    try:
        got, want = pipe.replace(rgb, options), host.replace(rgb, options)
        assert got.generated is not None and want.generated is not None
        err = max_err(got.generated, want.generated)
        noise = host_rounding(device_export, tmp_path, want.generated, lambda p: p.replace(rgb, options).generated)
        assert_within(err, noise, "host path on (emulated) TensorRT: generated image")
    finally:
        pipe.close()


# --- on a GPU --------------------------------------------------------------------------------


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
    assert isinstance(pipe.stages.generator, DeviceChain), "TensorRT with device graphs must run the device chain"
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
