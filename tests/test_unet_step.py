"""The fused "UNet + LCM step" graph: parity with the pipeline's numpy loop, with its PyTorch source, and its device plan.

- The fused graph on ONNX Runtime CPU, driven by :func:`runtime.denoise.fused_denoise`,
  reproduces the final latents of :meth:`runtime.pipeline.Pipeline.inpaint`'s loop
  (separate UNet graph + numpy ``lcm_step``) on the same photo, prompt and noise, for
  1, 2 and 4 steps without and with classifier-free guidance, within the loop's rounding
  noise (:mod:`tolerance`: the same loop on a graph carrying noise at every node).
  The pipeline's own loop is observed, not re-implemented: its UNet calls and the
  latents it decodes are recorded.
- The ONNX graph matches the PyTorch module it was traced from (within the graph's rounding
  noise), at a batch and latent size other than the traced ones, on a non-final and the final step.
- The device loop's plan (:mod:`runtime.trt_loop`: block layout, per-step bindings,
  packed schedule and noise) run on a host byte buffer gives exactly the step loop's result.

The fused graph is exported once for the module from the shared tiny models (same
LoRA, same scale as ``exported_dir``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from skimage import data
from tolerance import NOISE_SAMPLES, assert_within, graph_tolerances, network_tolerance, noisy_engine

from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.manifest import Manifest, ModelEntry
from trt_bgswap.runtime.ort_backend import OrtEngine
from trt_bgswap.runtime.pipeline import GenerationOptions, Noise, Pipeline
from trt_bgswap.runtime.scheduler import COEFFICIENT_NAMES, LCMConfig, LCMScheduler
from trt_bgswap.runtime.denoise import DenoiseInputs, check_step_scheduler
from trt_bgswap.runtime.denoise import fused_denoise as denoise
from trt_bgswap.specs import StepIO, pipeline_dims, unet_step_spec

WIDTH, HEIGHT = 192, 128  # non-square, multiples of the tiny model's size multiple
PROMPT = "a sunny beach with palm trees, photograph"


@pytest.fixture(scope="module")
def manifest(exported_dir: Path) -> Manifest:
    return Manifest.load(exported_dir)


@pytest.fixture(scope="module")
def step_graph(device_export_dir: Path) -> tuple[Path, ModelEntry]:
    """``unet_step/`` of the session's fused-step export (tests/conftest.py): the SD UNet with the LCM-LoRA fused at 1,
    fp32, opset 17 (``export_models(fused_step=True)`` and ``export_unet_step`` both write it with ``export_unet_step_module``)."""
    entry = Manifest.load(device_export_dir).models["unet_step"]
    return device_export_dir / entry.file, entry


@pytest.fixture(scope="module")
def step_engine(step_graph: tuple[Path, ModelEntry]) -> OrtEngine:
    path, entry = step_graph
    engine = OrtEngine(entry.spec, path, provider="cpu")
    engine.load()
    return engine


@pytest.fixture()
def noisy_step_engine(step_graph: tuple[Path, ModelEntry], tmp_path: Path) -> OrtEngine:
    """The step graph with rounding noise at every node (fresh per test: its draws then do not depend on test order)."""
    path, entry = step_graph
    return noisy_engine(entry.spec, path, tmp_path / "noisy_step.onnx")


def loop_tolerance(noisy_engine: OrtEngine, coefficients, inputs: DenoiseInputs, clean: np.ndarray) -> float:  # noqa: ANN001
    """The rounding noise of the whole denoising loop (UNet and LCM step arithmetic, every step) on these inputs."""
    return network_tolerance(clean, [denoise(noisy_engine, coefficients, inputs) for _ in range(NOISE_SAMPLES)])


@pytest.fixture(scope="module")
def pipe(exported_dir: Path) -> Pipeline:
    return Pipeline.load(exported_dir, provider="cpu")


@pytest.fixture(scope="module")
def photo_and_mask() -> tuple[np.ndarray, np.ndarray]:
    """A real photo and a repaint mask: everything but an ellipse around the cat's head."""
    rgb = data.chelsea()
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    subject = ((yy - 150) / 110.0) ** 2 + ((xx - 200) / 140.0) ** 2 < 1.0
    return rgb, np.where(subject, 0, 255).astype(np.uint8)


def _coefficients(manifest: Manifest, steps: int):  # noqa: ANN202 - LCMCoefficients
    sched = LCMScheduler.from_config(manifest.inpaint.scheduler)
    sched.set_timesteps(steps)
    assert sched.coefficients is not None
    return sched.coefficients


def _pipeline_loop(pipe: Pipeline, photo_and_mask, steps: int, guidance: float, monkeypatch: pytest.MonkeyPatch, seed: int = 5):  # noqa: ANN001, ANN202
    """Run the pipeline's own loop; return its final latents and the inputs its UNet saw, as DenoiseInputs."""
    rgb, mask = photo_and_mask
    cfg = pipe.config
    d = pipeline_dims(1, HEIGHT, WIDTH, cfg.vae_scale_factor)
    noise = Noise.from_seed(seed, (1, cfg.latent_channels, d["h"], d["w"]), steps)
    calls: list[tuple[np.ndarray, float, np.ndarray]] = []
    decoded: list[np.ndarray] = []
    stages = pipe.stages.generator
    real_unet, real_decode = stages.denoiser.unet, stages.decoder.decode

    def recording_unet(sample: np.ndarray, timestep: float, embeddings: np.ndarray, added: object = None) -> np.ndarray:
        calls.append((sample.copy(), timestep, embeddings.copy()))
        return real_unet(sample, timestep, embeddings, added)

    def recording_decode(latents: np.ndarray) -> np.ndarray:
        decoded.append(latents.copy())
        return real_decode(latents)

    monkeypatch.setattr(stages.denoiser, "unet", recording_unet)
    monkeypatch.setattr(stages.decoder, "decode", recording_decode)
    pipe.inpaint(rgb, mask, GenerationOptions(PROMPT, steps=steps, guidance=guidance, size=(WIDTH, HEIGHT)), noise)
    assert len(calls) == steps and len(decoded) == 1
    c = cfg.latent_channels
    sample, _, embeddings = calls[0]
    latents = noise.latents * np.float32(pipe.scheduler.init_noise_sigma)
    np.testing.assert_array_equal(sample[:1, :c], latents, err_msg="the pipeline's first UNet input is not the initial latents")
    inputs = DenoiseInputs(
        latents=latents,
        step_noise=noise.steps,
        mask=sample[:1, c : c + 1],
        masked_image_latents=sample[:1, c + 1 :],
        embeddings=embeddings,
        guidance=guidance,
    )
    return decoded[0], inputs, [t for _, t, _ in calls]


@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_fused_loop_matches_pipeline_numpy_loop(
    pipe: Pipeline,
    step_engine: OrtEngine,
    noisy_step_engine: OrtEngine,
    manifest: Manifest,
    photo_and_mask,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
    steps: int,
    guidance: float,
) -> None:
    expected, inputs, timesteps = _pipeline_loop(pipe, photo_and_mask, steps, guidance, monkeypatch)
    coefficients = _coefficients(manifest, steps)
    assert timesteps == [float(t) for t in coefficients.timesteps], "the pipeline ran another schedule"
    assert inputs.embeddings.shape[0] == (2 if guidance > 1 else 1)

    got = denoise(step_engine, coefficients, inputs)

    assert got.shape == expected.shape
    err = float(np.max(np.abs(got - expected)))
    # the same UNet and step arithmetic in two graphs: they differ by the loop's rounding noise
    assert_within(err, lambda: loop_tolerance(noisy_step_engine, coefficients, inputs, got), f"{steps} steps, guidance {guidance}: fused-graph loop vs pipeline loop")
    # meaningful: the loop moved the latents far from where they started
    assert float(np.max(np.abs(expected - inputs.latents))) > 0.1


SENSITIVITY_STEPS = 3


@pytest.fixture(scope="module")
def sensitivity_tolerance(pipe: Pipeline, step_engine: OrtEngine, step_graph: tuple[Path, ModelEntry], manifest: Manifest, photo_and_mask, tmp_path_factory: pytest.TempPathFactory) -> float:  # noqa: ANN001
    """The parity tolerance of the 3-step guided loop the slips below perturb."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _, inputs, _ = _pipeline_loop(pipe, photo_and_mask, SENSITIVITY_STEPS, 2.0, monkeypatch)
    coefficients = _coefficients(manifest, SENSITIVITY_STEPS)
    noisy = noisy_engine(step_graph[1].spec, step_graph[0], tmp_path_factory.mktemp("noisy") / "step.onnx")
    return loop_tolerance(noisy, coefficients, inputs, denoise(step_engine, coefficients, inputs))


@pytest.mark.parametrize("slip", ["guidance batch order", "noise of the next step", "coefficient rows reversed"])
def test_loop_parity_is_sensitive(
    pipe: Pipeline, step_engine: OrtEngine, sensitivity_tolerance: float, manifest: Manifest, photo_and_mask, monkeypatch, slip: str  # noqa: ANN001
) -> None:
    """Mistakes the parity test must catch each move the final latents by far more than its tolerance."""
    steps, tol = SENSITIVITY_STEPS, sensitivity_tolerance
    expected, inputs, _ = _pipeline_loop(pipe, photo_and_mask, steps, 2.0, monkeypatch)
    coefficients = _coefficients(manifest, steps)
    if slip == "guidance batch order":
        inputs = DenoiseInputs(inputs.latents, inputs.step_noise, inputs.mask, inputs.masked_image_latents, inputs.embeddings[::-1].copy(), 2.0)
    elif slip == "noise of the next step":
        inputs = DenoiseInputs(inputs.latents, inputs.step_noise[1:] + inputs.step_noise[:1], inputs.mask, inputs.masked_image_latents, inputs.embeddings, 2.0)
    else:
        reversed_rows = {name: getattr(coefficients, name)[::-1].copy() for name in ("timesteps", *COEFFICIENT_NAMES)}
        coefficients = type(coefficients)(**reversed_rows)
    err = float(np.max(np.abs(denoise(step_engine, coefficients, inputs) - expected)))
    assert err > 1e3 * tol, f"slip '{slip}' moved the final latents by only {err:.3g} (tolerance {tol:.3g})"


@pytest.fixture(scope="module")
def torch_step(tiny_models_dir: Path):  # noqa: ANN201 - a torch module
    from trt_bgswap.export.lora import lora_file
    from trt_bgswap.export.unet import load_unet
    from trt_bgswap.export.unet_step import wrap

    return wrap(load_unet(tiny_models_dir / "sd-inpainting", lora_file(tiny_models_dir / "lcm-lora"), 1.0)).eval()


@pytest.mark.numerics
@pytest.mark.parametrize("row", [0, 3], ids=["first-step", "final-step"])
@pytest.mark.parametrize("batch", [1, 2])
def test_graph_matches_pytorch_source(torch_step, step_engine: OrtEngine, manifest: Manifest, batch: int, row: int) -> None:  # noqa: ANN001
    import torch

    spec = step_engine.spec
    dims = {"B": batch, "h": 16, "w": 24}  # not the traced batch 2 / 8x16
    rng = np.random.default_rng(batch * 10 + row)
    feeds = {t.name: rng.standard_normal(t.resolve(dims)).astype(np.float32) for t in spec.inputs}
    coefficients = _coefficients(manifest, 4)
    feeds["coefficients"] = coefficients.table()[row]
    feeds["timestep"] = np.array([coefficients.timesteps[row]], dtype=np.float32)
    feeds["guidance"] = np.array([1.7], dtype=np.float32)
    feeds["mask"] = (feeds["mask"] > 0).astype(np.float32)
    with torch.no_grad():
        want = torch_step(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    got = step_engine(**feeds)
    tols = graph_tolerances(step_engine.path, feeds, got)  # same function traced to ONNX: rounding only
    for name, w in zip(spec.output_names, want):
        err = float(np.max(np.abs(got[name] - w.numpy())))
        assert_within(err, tols[name], f"{name} (B={batch}, step row {row}): ONNX vs PyTorch")
    if row == 3:  # the final step's coefficients make prev_latents == denoised without a branch
        np.testing.assert_array_equal(got["prev_latents"], got["denoised"])


def test_spec_and_tensorrt_parser_compatibility(step_graph: tuple[Path, ModelEntry], manifest: Manifest) -> None:
    from trt_bgswap.engines.onnx_check import check_onnx_for_tensorrt

    path, entry = step_graph
    hidden = manifest.models["unet"].spec.tensor("encoder_hidden_states").shape[2]
    assert entry.spec == unet_step_spec(manifest.inpaint.latent_channels, manifest.inpaint.max_length, hidden, len(COEFFICIENT_NAMES))
    assert entry.file == "unet_step/model.onnx"
    report = check_onnx_for_tensorrt(path, entry.spec)
    assert report.ok, f"TensorRT parser check: {[str(i) for i in report.errors]}"


@pytest.mark.parametrize(
    "config",
    [{"prediction_type": "v_prediction"}, {"prediction_type": "sample"}, {"clip_sample": True}, {"thresholding": True}],
    ids=["v_prediction", "sample", "clip_sample", "thresholding"],
)
def test_unsupported_scheduler_is_refused(config: dict, tiny_models_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="fused UNet-step graph"):
        check_step_scheduler(LCMConfig.from_dict(config))
    # the exporter refuses before loading any weights, and writes nothing
    from trt_bgswap.export.unet_step import export_unet_step

    src = tmp_path / "sd"
    shutil.copytree(tiny_models_dir / "sd-inpainting" / "scheduler", src / "scheduler")
    cfg_path = src / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **config}))
    with pytest.raises(ModelError, match="fused UNet-step graph"):
        export_unet_step(src, tmp_path / "out" / "unet_step", 77)
    assert not (tmp_path / "out").exists()


def test_tiny_scheduler_is_supported(manifest: Manifest) -> None:
    check_step_scheduler(LCMConfig.from_dict(manifest.inpaint.scheduler))


def _inputs(shape: tuple[int, ...], steps: int, batch: int = 1, seed: int = 0, hidden: tuple[int, int] = (77, 32)) -> DenoiseInputs:
    rng = np.random.default_rng(seed)
    draw = lambda s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return DenoiseInputs(
        latents=draw(shape),
        step_noise=tuple(draw(shape) for _ in range(steps - 1)),
        mask=(draw((1, 1, *shape[2:])) > 0).astype(np.float32),
        masked_image_latents=draw(shape),
        embeddings=draw((batch, *hidden)),
        guidance=1.5,
    )


@pytest.mark.parametrize(
    "bad",
    ["too few step noises", "step noise shape", "mask shape", "embeddings batch 3", "latents batch 2", "guidance nan"],
)
def test_denoise_inputs_are_checked(bad: str) -> None:
    shape = (1, 4, 8, 12)
    good = _inputs(shape, steps=3)
    fields = dict(good.__dict__)
    if bad == "too few step noises":
        fields["step_noise"] = good.step_noise[:1]
    elif bad == "step noise shape":
        fields["step_noise"] = (good.step_noise[0], good.step_noise[1][..., :-1])
    elif bad == "mask shape":
        fields["mask"] = good.mask[..., :-1]
    elif bad == "embeddings batch 3":
        fields["embeddings"] = np.concatenate([good.embeddings] * 3)
    elif bad == "latents batch 2":
        fields["latents"] = np.concatenate([good.latents] * 2)
    else:
        fields["guidance"] = float("nan")
    good.check(3)  # precondition: the unmodified inputs pass
    with pytest.raises(UsageError):
        DenoiseInputs(**fields).check(3)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("steps", [1, 4])
def test_device_plan_emulated_on_host_equals_step_loop(step_engine: OrtEngine, manifest: Manifest, steps: int, batch: int) -> None:
    """trt_loop's layout, packed uploads and per-step copies into the engine's fixed buffers, executed on host
    bytes, give the step loop's result exactly."""
    from trt_bgswap.runtime.trt_loop import loop_layout, pack_noise, pack_schedule, step_copies

    spec = step_engine.spec
    dims = {"B": batch, "h": 16, "w": 24}
    ehs = spec.tensor("encoder_hidden_states").resolve(dims)
    inputs = _inputs(spec.tensor("latents").resolve(dims), steps, batch, seed=steps, hidden=ehs[1:])
    coefficients = _coefficients(manifest, steps)
    want = denoise(step_engine, coefficients, inputs)

    layout = loop_layout(spec, dims, steps)
    block = np.full(layout.nbytes, 0xFF, dtype=np.uint8)  # NaN-filled: reading an unwritten byte poisons the result
    (s0, s1), (n0, n1) = layout.schedule_bytes, layout.noise_bytes
    block[s0:s1] = pack_schedule(layout, coefficients)
    block[n0:n1] = pack_noise(layout, inputs)
    # the engine's own fixed input and output buffers (NaN-filled too), as the device loop binds them once
    fixed = {n: np.full(spec.tensor(n).nbytes(dims), 0xFF, dtype=np.uint8) for n in (*spec.input_names, *spec.output_names)}

    def as_array(raw: np.ndarray, name: str) -> np.ndarray:
        return raw.view(np.float32).reshape(spec.tensor(name).resolve(dims))

    conditioning = {
        "mask": inputs.mask,
        "masked_image_latents": inputs.masked_image_latents,
        "encoder_hidden_states": inputs.embeddings,
        "guidance": np.array([inputs.guidance], dtype=np.float32),
    }
    assert set(conditioning) == set(StepIO.CONDITIONING)
    for i in range(steps):
        for c in step_copies(layout, i):
            source = block[c.src_offset : c.src_offset + c.nbytes] if c.src_offset is not None else fixed[c.src_output][: c.nbytes]
            fixed[c.dst][: c.nbytes] = source
        feeds = {**conditioning, **{n: as_array(fixed[n], n).copy() for n in spec.input_names if n not in conditioning}}
        out = step_engine(**feeds)
        for name in spec.output_names:
            fixed[name][...] = np.ascontiguousarray(out[name], dtype=np.float32).view(np.uint8).reshape(-1)
    got = as_array(fixed[StepIO.PREV_LATENTS], StepIO.PREV_LATENTS)
    err = float(np.max(np.abs(got - want)))
    # exact: the same engine on the same bytes, only moved through the loop's buffers
    assert err == 0.0, f"{steps} steps, B={batch}: host-emulated device plan differs from the step loop by {err:.3g}"


def test_fp16_graph_stays_close_to_fp32(tiny_models_dir: Path, step_engine: OrtEngine, manifest: Manifest, tmp_path: Path) -> None:
    """fp16 export (fp32 I/O; the step arithmetic then runs in fp16 too): the 4-step guided loop within its float16 rounding noise."""
    from trt_bgswap.export.lora import lora_file
    from trt_bgswap.export.unet_step import export_unet_step

    entry = export_unet_step(
        tiny_models_dir / "sd-inpainting", tmp_path / "unet_step", manifest.inpaint.max_length,
        lora=lora_file(tiny_models_dir / "lcm-lora"), precision="fp16",
    )
    assert entry.spec == step_engine.spec and entry.precision == "fp16"
    fp16 = OrtEngine(entry.spec, tmp_path / entry.file, provider="cpu")
    dims = {"B": 2, "h": 16, "w": 24}
    ehs = step_engine.spec.tensor("encoder_hidden_states").resolve(dims)
    inputs = _inputs(step_engine.spec.tensor("latents").resolve(dims), 4, batch=2, seed=1, hidden=ehs[1:])
    coefficients = _coefficients(manifest, 4)
    want = denoise(step_engine, coefficients, inputs)
    got = denoise(fp16, coefficients, inputs)
    noisy = noisy_engine(entry.spec, tmp_path / entry.file, tmp_path / "noisy_fp16.onnx")
    # the float16 graph's roundings (every node stores float16; weights rounded once), through all four steps
    assert_within(float(np.max(np.abs(got - want))), loop_tolerance(noisy, coefficients, inputs, got), "fp16 fused loop vs fp32")
