"""The whole inpainting loop vs diffusers' StableDiffusionInpaintPipeline + LCMScheduler, LCM-LoRA fused.

Same tiny weights, same photo and mask, same prompt, same noise: the initial
latents are handed to both; the VAE posterior draw and the LCM step noise that
diffusers takes from its generator are replayed from a twin generator and
handed to our runtime. Generated images (float [0,1], before compositing) must
agree within the rounding noise of our whole loop on that case (:mod:`tolerance`: the same
loop with every graph node carrying its rounding noise); porting slips must move the image
far beyond it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from tolerance import NOISE_SAMPLES, assert_within, network_tolerance, noisy_pipeline

from trt_bgswap.runtime.pipeline import GenerationOptions, Noise, Pipeline

WIDTH, HEIGHT = 192, 128  # non-square, multiples of the tiny model's size multiple
STEPS = 4
PROMPT = "a sunny beach with palm trees, photograph"


@pytest.fixture(scope="module")
def reference_pipe(tiny_models_dir: Path):
    from diffusers import LCMScheduler, StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        tiny_models_dir / "sd-inpainting", safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(tiny_models_dir / "lcm-lora"))
    pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def runtime(exported_dir: Path) -> Pipeline:
    return Pipeline.load(exported_dir, provider="cpu")


@pytest.fixture(scope="module")
def built_runtime(built_cpu_dir: Path) -> Pipeline:
    """The export after `trt-bgswap build` for the CPU (attention tiled): what `run` opens once built."""
    return Pipeline.load(built_cpu_dir, provider="cpu")


@pytest.fixture(scope="module")
def loop_tolerance(runtime: Pipeline, exported_dir: Path, photo_and_mask, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., float]:  # noqa: ANN001
    """``loop_tolerance(case, options, noise)``: the rounding noise of our whole loop on that case, computed once per case."""
    rgb, mask = photo_and_mask
    cache: dict[tuple, float] = {}

    def tolerance(case: tuple, options: GenerationOptions, noise: Noise) -> float:
        if case not in cache:
            clean = runtime.inpaint(rgb, mask, options, noise)
            noisy = noisy_pipeline(exported_dir, tmp_path_factory.mktemp("noisy"))
            cache[case] = network_tolerance(clean, [noisy.inpaint(rgb, mask, options, noise) for _ in range(NOISE_SAMPLES)])
        return cache[case]

    return tolerance


@pytest.fixture(scope="module")
def photo_and_mask() -> tuple[np.ndarray, np.ndarray]:
    """A real photo (non-square) and a repaint mask: everything but an ellipse around the cat's head."""
    rgb = data.chelsea()  # 300x451
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    subject = ((yy - 150) / 110.0) ** 2 + ((xx - 200) / 140.0) ** 2 < 1.0
    return rgb, np.where(subject, 0, 255).astype(np.uint8)


def _reference(pipe, rgb: np.ndarray, mask: np.ndarray, guidance: float, seed: int, negative: str | None):
    """Run diffusers and return its image plus every random draw it made, in its order."""
    c = pipe.vae.config.latent_channels
    f = pipe.vae_scale_factor
    shape = (1, c, HEIGHT // f, WIDTH // f)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1000))
    # diffusers draws, from `generator`: the masked image's posterior sample, then one noise per non-final step
    twin = torch.Generator().manual_seed(seed)
    posterior = torch.randn(shape, generator=twin)
    steps = tuple(torch.randn(shape, generator=twin).numpy() for _ in range(STEPS - 1))
    image = pipe(
        prompt=PROMPT,
        negative_prompt=negative,
        image=Image.fromarray(rgb),
        mask_image=Image.fromarray(mask, "L"),
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=latents.clone(),
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]
    return image, Noise(latents=latents.numpy(), posterior=posterior.numpy(), steps=steps)


@pytest.mark.numerics
@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("graphs", ["exported", "built"])
def test_pipeline_matches_diffusers(reference_pipe, request: pytest.FixtureRequest, loop_tolerance, photo_and_mask, guidance: float, graphs: str) -> None:  # noqa: ANN001
    """The exported graphs and the built ones both match diffusers. The built graphs' tiled attention does the
    exported graphs' dot products and softmax sums in another order (same operations, same lengths), so the
    exported loop's rounding noise (``loop_tolerance``) bounds both."""
    runtime: Pipeline = request.getfixturevalue("runtime" if graphs == "exported" else "built_runtime")
    rgb, mask = photo_and_mask
    expected, noise = _reference(reference_pipe, rgb, mask, guidance, seed=7, negative=None)
    options = GenerationOptions(PROMPT, steps=STEPS, guidance=guidance, size=(WIDTH, HEIGHT))
    ours = runtime.inpaint(rgb, mask, options, noise)
    assert ours.shape == expected.shape == (HEIGHT, WIDTH, 3)
    err = float(np.abs(ours - expected).max())
    assert_within(err, loop_tolerance((guidance, 7, None), options, noise), f"guidance={guidance}: generated image vs diffusers")
    # the comparison is meaningful: the image is not flat and depends on the prompt
    assert float(expected.std()) > 1e-2


def test_negative_prompt_matches_diffusers(reference_pipe, runtime: Pipeline, loop_tolerance, photo_and_mask) -> None:  # noqa: ANN001
    rgb, mask = photo_and_mask
    expected, noise = _reference(reference_pipe, rgb, mask, 2.0, seed=3, negative="blurry, low quality")
    options = GenerationOptions(PROMPT, negative_prompt="blurry, low quality", steps=STEPS, guidance=2.0, size=(WIDTH, HEIGHT))
    err = float(np.abs(runtime.inpaint(rgb, mask, options, noise) - expected).max())
    assert_within(err, loop_tolerance((2.0, 3, "blurry, low quality"), options, noise), "negative prompt: generated image vs diffusers")


# A slip must move the image this many tolerances: far beyond anything rounding can do.
SLIP_FACTOR = 10.0


def test_parity_check_is_sensitive(reference_pipe, runtime: Pipeline, loop_tolerance, photo_and_mask) -> None:  # noqa: ANN001
    """Slips the parity test must catch (swapped guidance batch order, wrong prompt, other noise) move it far beyond its tolerance."""
    rgb, mask = photo_and_mask
    expected, noise = _reference(reference_pipe, rgb, mask, 2.0, seed=7, negative=None)
    tol = loop_tolerance((2.0, 7, None), GenerationOptions(PROMPT, steps=STEPS, guidance=2.0, size=(WIDTH, HEIGHT)), noise)
    swapped = GenerationOptions("", negative_prompt=PROMPT, steps=STEPS, guidance=2.0, size=(WIDTH, HEIGHT))
    other_prompt = GenerationOptions("a snowy forest", steps=STEPS, guidance=2.0, size=(WIDTH, HEIGHT))
    other_noise = Noise(noise.latents, noise.posterior * 0.0, noise.steps)
    base = GenerationOptions(PROMPT, steps=STEPS, guidance=2.0, size=(WIDTH, HEIGHT))
    for name, opts, nz in (
        ("guidance batch order", swapped, noise),
        ("prompt", other_prompt, noise),
        ("posterior mean instead of sample", base, other_noise),
    ):
        err = float(np.abs(runtime.inpaint(rgb, mask, opts, nz) - expected).max())
        assert err > SLIP_FACTOR * tol, f"{name}: a slip moved the output by only {err:.3g} (tolerance {tol:.3g}); the parity test would not notice it"


def test_same_seed_same_output(runtime: Pipeline, photo_and_mask) -> None:
    rgb, mask = photo_and_mask
    opts = GenerationOptions(PROMPT, steps=2, seed=11, size=(WIDTH, HEIGHT))
    a = runtime.inpaint(rgb, mask, opts)
    b = runtime.inpaint(rgb, mask, opts)
    c = runtime.inpaint(rgb, mask, GenerationOptions(PROMPT, steps=2, seed=12, size=(WIDTH, HEIGHT)))
    assert np.array_equal(a, b)
    assert float(np.abs(a - c).max()) > 1e-2


def test_replace_keeps_subject_and_size(runtime: Pipeline) -> None:
    rgb = data.astronaut()[:300, :420].copy()  # non-square real photo
    r = runtime.replace(rgb, GenerationOptions(PROMPT, steps=2, seed=5))
    assert r.image.shape == rgb.shape
    w, h = r.generation_size
    assert w % runtime.config.size_multiple == 0 and h % runtime.config.size_multiple == 0
    full = r.alpha >= 1.0
    assert np.array_equal(r.image[full], rgb[full])
    # the background changed where the subject is absent
    bg = r.alpha <= 0.0
    if bg.any():
        assert np.abs(r.image[bg].astype(int) - rgb[bg].astype(int)).mean() > 1.0


def _bilinear_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from trt_bgswap.runtime.resize import resize_bilinear

    return resize_bilinear(mask, size)


@pytest.mark.parametrize("slip", ["mask averaged, not nearest", "masked pixels -1, not 0", "padding token 0, not eos"])
def test_common_slips_break_parity(reference_pipe, exported_dir: Path, loop_tolerance, photo_and_mask, monkeypatch, slip: str) -> None:  # noqa: ANN001
    """Each classic porting mistake, injected into a fresh runtime, moves the output far beyond the parity tolerance."""
    import trt_bgswap.runtime.preprocess as preprocess_module

    rgb, mask = photo_and_mask
    expected, noise = _reference(reference_pipe, rgb, mask, 2.0, seed=7, negative=None)
    options = GenerationOptions(PROMPT, steps=STEPS, guidance=2.0, size=(WIDTH, HEIGHT))
    tol = loop_tolerance((2.0, 7, None), options, noise)  # before the slip is injected
    rt = Pipeline.load(exported_dir, provider="cpu")
    if slip.startswith("mask averaged"):
        monkeypatch.setattr(preprocess_module, "resize_nearest", _bilinear_mask)
    elif slip.startswith("masked pixels"):
        encoder = rt.stages.generator.encoder
        original = encoder.encode
        hole = preprocess_module.resize_mask_for_model(mask, WIDTH, HEIGHT) >= 0.5
        monkeypatch.setattr(encoder, "encode", lambda masked, eps: original(np.where(hole, -1.0, masked).astype(np.float32), eps))
    else:
        monkeypatch.setattr(rt.stages.text_encoder.tokenizer, "pad_id", 0)
    err = float(np.abs(rt.inpaint(rgb, mask, options, noise) - expected).max())
    assert err > SLIP_FACTOR * tol, f"slip '{slip}' moved the output by only {err:.3g} (tolerance {tol:.3g}): the parity test could not tell"
