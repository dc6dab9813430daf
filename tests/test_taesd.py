"""``--vae tiny``: the tiny autoencoder (TAESD) export against diffusers' ``AutoencoderTiny``, and the VAE stages around it.

Unusual tiny configs so nothing passes by coincidence: a factor-4 autoencoder (three blocks) with
4 latent channels, and a factor-8 one with 16 (the FLUX-style ``taef1`` latent API); non-square
images. Tolerances: the graph's own rounding noise (tests/tolerance.py, Monte Carlo arithmetic),
since ONNX Runtime and PyTorch run the same convolutions in different orders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tolerance import assert_within, graph_tolerances, rounding_bound
from trt_bgswap.errors import ModelError
from trt_bgswap.export.exporter import with_tiny_vae
from trt_bgswap.export.taesd import check_matches_vae, downsampling, export_taesd, latent_api, latent_constants, read_taesd_config
from trt_bgswap.export.tiny_taesd import write_tiny_taesd
from trt_bgswap.manifest import InpaintConfig
from trt_bgswap.runtime.ort_backend import OrtEngine
from trt_bgswap.runtime.vae import HostVaeDecoder, HostVaeEncoder
from trt_bgswap.specs import VaeDecoderIO, VaeEncoderIO

pytestmark = pytest.mark.numerics

CONFIGS = {
    "factor4-4ch": {"block_out_channels": [8, 8, 8], "latent_channels": 4},
    "factor8-16ch": {"block_out_channels": [8, 8, 8, 8], "latent_channels": 16},
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict]:
    vae_config = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(f"taesd-{request.param}")
    src = write_tiny_taesd(root / "taesd", vae_config, seed=3)
    enc, dec = export_taesd(src, root / "vae_encoder", root / "vae_decoder")
    assert enc.spec.outputs[0].shape[1] == dec.spec.inputs[0].shape[1] == vae_config["latent_channels"]
    return src, root / "vae_encoder" / "model.onnx", root / "vae_decoder" / "model.onnx", vae_config


def _torch_model(src: Path):  # noqa: ANN202
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(str(src)).eval()


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_encoder_matches_autoencoder_tiny(exported: tuple) -> None:
    src, enc_path, _, vae_config = exported
    model = _torch_model(src)
    f = downsampling(read_taesd_config(src))
    image = np.random.default_rng(0).uniform(-1, 1, (2, 3, 3 * f, 5 * f)).astype(np.float32)  # non-square, batch 2
    with torch.no_grad():
        want = model.encode(torch.from_numpy(image)).latents.numpy()
    mean, std = _session(enc_path).run([VaeEncoderIO.MEAN, VaeEncoderIO.STD], {VaeEncoderIO.SAMPLE: image})
    assert mean.shape == (2, vae_config["latent_channels"], 3, 5)
    assert not std.any(), "the tiny encoder is deterministic: its std output is exactly 0"
    tol = lambda: graph_tolerances(enc_path, {VaeEncoderIO.SAMPLE: image}, {VaeEncoderIO.MEAN: mean})[VaeEncoderIO.MEAN]  # noqa: E731 - rounding only
    assert_within(float(np.abs(mean - want).max()), tol, "TAESD encoder latents vs AutoencoderTiny.encode")


def test_decoder_matches_autoencoder_tiny(exported: tuple) -> None:
    src, _, dec_path, vae_config = exported
    model = _torch_model(src)
    latents = np.random.default_rng(1).standard_normal((2, vae_config["latent_channels"], 3, 5)).astype(np.float32)
    with torch.no_grad():
        want = model.decode(torch.from_numpy(latents)).sample.numpy()
    (got,) = _session(dec_path).run([VaeDecoderIO.SAMPLE], {VaeDecoderIO.LATENTS: latents})
    f = downsampling(read_taesd_config(src))
    assert got.shape == (2, 3, 3 * f, 5 * f)
    tol = lambda: graph_tolerances(dec_path, {VaeDecoderIO.LATENTS: latents}, {VaeDecoderIO.SAMPLE: got})[VaeDecoderIO.SAMPLE]  # noqa: E731
    assert_within(float(np.abs(got - want).max()), tol, "TAESD decoder image vs AutoencoderTiny.decode")


def test_vae_stages_apply_the_configs_scaling_and_shift(exported: tuple) -> None:
    """The host VAE stages are generic: diffusers' (latents - shift) * scaling after encode, the inverse before decode."""
    src, enc_path, dec_path, vae_config = exported
    from trt_bgswap.specs import vae_decoder_spec, vae_encoder_spec

    c = vae_config["latent_channels"]
    cfg = InpaintConfig(
        vae_scaling_factor=0.75, vae_shift_factor=0.125, vae_scale_factor=downsampling(read_taesd_config(src)), latent_channels=c,
        unet_in_channels=2 * c + 1, size_multiple=8, default_size=64, max_length=8, scheduler={},
    )  # fmt: skip  # unusual constants: a stage that ignored either would fail
    encoder = HostVaeEncoder(OrtEngine(vae_encoder_spec(3, c), enc_path, provider="cpu"), cfg)
    decoder = HostVaeDecoder(OrtEngine(vae_decoder_spec(3, c), dec_path, provider="cpu"), cfg)
    f = cfg.vae_scale_factor
    image = np.random.default_rng(2).uniform(-1, 1, (1, 3, 2 * f, 3 * f)).astype(np.float32)
    eps = np.random.default_rng(3).standard_normal((1, c, 2, 3)).astype(np.float32)
    raw = _session(enc_path).run([VaeEncoderIO.MEAN], {VaeEncoderIO.SAMPLE: image})[0]
    got = encoder.encode(image, eps)
    want = (raw - np.float32(0.125)) * np.float32(0.75)  # eps does not enter: std is 0
    np.testing.assert_array_equal(got, want, err_msg="the same float32 operations in the same order: identical")
    img = decoder.decode(got)
    z = got / np.float32(0.75) + np.float32(0.125)
    ref = np.clip(_session(dec_path).run([VaeDecoderIO.SAMPLE], {VaeDecoderIO.LATENTS: z})[0] / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert_within(float(np.abs(img - ref).max()), float(rounding_bound(1.0, 4)), "decoder stage vs its definition")


def test_config_facts_and_a_mismatched_family_is_refused(exported: tuple, tmp_path: Path) -> None:
    src, _, _, vae_config = exported
    taesd = read_taesd_config(src)
    assert latent_constants(taesd) == (1.0, None)  # TAESD works in the family's scaled latents: diffusers' defaults 1.0 / 0.0
    channels, factor = latent_api(vae_config)
    check_matches_vae(src, taesd, channels, factor)
    for wrong in ((channels + 1, factor), (channels, factor * 2)):
        with pytest.raises(ModelError, match="latent channels"):
            check_matches_vae(src, taesd, *wrong)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}), encoding="utf-8")
    with pytest.raises(ModelError, match="not a tiny autoencoder"):
        read_taesd_config(tmp_path)


def test_the_whole_loop_with_the_tiny_autoencoder_matches_diffusers(tiny_models_dir: Path, exported_tiny_vae_dir: Path, tmp_path: Path) -> None:
    """Our loop on the ``--vae tiny`` export vs diffusers' inpainting pipeline with ``vae=AutoencoderTiny`` (same weights, noise)."""
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionInpaintPipeline
    from PIL import Image
    from skimage import data

    from tolerance import NOISE_SAMPLES, network_tolerance, noisy_pipeline
    from trt_bgswap.manifest import Manifest
    from trt_bgswap.runtime.pipeline import GenerationOptions, Noise, Pipeline

    manifest = Manifest.load(exported_tiny_vae_dir)
    assert manifest.extra["vae"] == "tiny" and "taesd" in manifest.sources and manifest.inpaint.vae_scaling_factor == 1.0
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_models_dir / "sd-inpainting", safety_checker=None, requires_safety_checker=False)
    pipe.vae = AutoencoderTiny.from_pretrained(str(tiny_models_dir / "taesd"))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(tiny_models_dir / "lcm-lora"))
    pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    width, height, steps, seed = 192, 128, 3, 5
    rgb = data.chelsea()
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    mask = np.where(((yy - 150) / 110.0) ** 2 + ((xx - 200) / 140.0) ** 2 < 1.0, 0, 255).astype(np.uint8)
    shape = (1, manifest.inpaint.latent_channels, height // manifest.inpaint.vae_scale_factor, width // manifest.inpaint.vae_scale_factor)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1000))
    twin = torch.Generator().manual_seed(seed)  # the tiny encoder draws nothing: diffusers' generator gives only the step noises
    noise = Noise(latents=latents.numpy(), posterior=np.zeros(shape, np.float32), steps=tuple(torch.randn(shape, generator=twin).numpy() for _ in range(steps - 1)))
    expected = pipe(
        prompt="a beach", image=Image.fromarray(rgb), mask_image=Image.fromarray(mask, "L"), height=height, width=width,
        num_inference_steps=steps, guidance_scale=1.0, latents=latents.clone(), generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images[0]  # fmt: skip
    options = GenerationOptions("a beach", steps=steps, guidance=1.0, size=(width, height))
    with Pipeline.load(exported_tiny_vae_dir, provider="cpu") as runtime:
        ours = runtime.inpaint(rgb, mask, options, noise)
    noisy = noisy_pipeline(exported_tiny_vae_dir, tmp_path / "noisy")
    tol = network_tolerance(ours, [noisy.inpaint(rgb, mask, options, noise) for _ in range(NOISE_SAMPLES)])
    # the image must vary far more than the tolerance, or the comparison says nothing (random tiny weights
    # can paint a nearly flat background)
    assert float(expected.std()) > 100 * tol, f"image spread {float(expected.std()):.3g} vs tolerance {tol:.3g}: the comparison would be vacuous"
    assert_within(float(np.abs(ours - expected).max()), tol, "--vae tiny loop vs diffusers with AutoencoderTiny")


def test_with_tiny_vae_swaps_only_the_vae(exported_dir: Path, exported_tiny_vae_dir: Path, tiny_models_dir: Path, tmp_path: Path) -> None:
    """The benchmark's shortcut (an export's other graphs copied, the VAE graphs the TAESD's) equals exporting with --vae tiny."""
    from trt_bgswap.manifest import Manifest

    made = with_tiny_vae(exported_dir, tiny_models_dir / "taesd", tmp_path / "swapped")
    full = Manifest.load(exported_tiny_vae_dir)
    assert made.inpaint == full.inpaint and made.extra["vae"] == "tiny"
    assert {n: e.sha256 for n, e in made.models.items()} == {n: e.sha256 for n, e in full.models.items()}, "same graphs, byte for byte"
    # copies, never hard links: onnx refuses external weights with several links ("potential hardlink attack"),
    # which broke `bench --mode full` when it counted the FLOPs of an export the --vae tiny rows had linked
    linked = [p for root in (tmp_path / "swapped", exported_dir) for p in root.rglob("*") if p.is_file() and p.stat().st_nlink > 1]
    assert not linked, f"hard-linked files: {linked[:3]}"
