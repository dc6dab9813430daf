"""SDXL inpainting (issue 12): the whole loop vs diffusers' StableDiffusionXLInpaintPipeline + LCMScheduler.

Same tiny weights (:mod:`trt_bgswap.export.tiny_sdxl`: two text encoders, the ``text_time``
UNet, a VAE of factor 4), the SDXL LCM-LoRA fused on both sides, the same photo, mask, prompt
and noise (:mod:`family_parity`). The generated images (float [0, 1], before compositing) must
agree within the rounding noise of our whole loop on that very case (:mod:`tolerance`: every
graph replaced by its Monte Carlo arithmetic twin, :data:`tolerance.NOISE_SAMPLES` runs, times
:data:`tolerance.SAFETY`), and within the issue's 1e-3.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import family_parity as fp
from family_parity import ACCEPTANCE, CASES
from tolerance import assert_within
from trt_bgswap.families import SD1, SD2, SDXL, family_of
from trt_bgswap.manifest import Manifest
from trt_bgswap.runtime.pipeline import GenerationOptions, Noise, Pipeline
from trt_bgswap.specs import UnetIO

WIDTH, HEIGHT = 176, 112  # non-square, multiples of the tiny SDXL's size multiple (VAE 4 x UNet 4)
STEPS = 4


@pytest.fixture(scope="module")
def sdxl_exported(sdxl_export: tuple[Path, object]) -> Path:
    """The session's SDXL export (tests/conftest.py: `trt-bgswap export` with the SDXL LCM-LoRA and the tiny RMBG, fp32, opset 17)."""
    return sdxl_export[0]


@pytest.fixture(scope="module")
def runtime(sdxl_exported: Path) -> Pipeline:
    return Pipeline.load(sdxl_exported, provider="cpu")


@pytest.fixture(scope="module")
def photo_and_mask() -> tuple[np.ndarray, np.ndarray]:
    return fp.photo_and_mask()


@pytest.fixture(scope="module")
def reference(tiny_models_dir: Path, photo_and_mask) -> Callable[[fp.Case], tuple[np.ndarray, Noise]]:  # noqa: ANN001
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_models_dir / "sdxl-inpainting", add_watermarker=False)
    return fp.lcm_reference(pipe, tiny_models_dir / "lcm-lora-sdxl", *photo_and_mask, (WIDTH, HEIGHT), STEPS)


@pytest.fixture(scope="module")
def loop_tolerance(sdxl_exported: Path, runtime: Pipeline, photo_and_mask, tmp_path_factory: pytest.TempPathFactory) -> Callable[[fp.Case, Noise], float]:  # noqa: ANN001
    return fp.loop_tolerance(sdxl_exported, runtime, *photo_and_mask, tmp_path_factory.mktemp("noisy-sdxl"), (WIDTH, HEIGHT), STEPS)


def _options(guidance: float, negative: str | None) -> GenerationOptions:
    return fp.options((guidance, negative), (WIDTH, HEIGHT), STEPS)


def test_family_and_graphs_come_from_the_config(sdxl_exported: Path) -> None:
    manifest = Manifest.load(sdxl_exported)
    assert manifest.inpaint is not None and manifest.inpaint.family == SDXL
    assert manifest.inpaint.default_size == 128  # unet sample_size 32 x VAE factor 4: the native area follows the config
    assert manifest.inpaint.force_zeros_for_empty_prompt is True
    unet_inputs = manifest.models["unet"].spec.input_names
    assert UnetIO.TEXT_EMBEDS in unet_inputs and UnetIO.TIME_IDS in unet_inputs
    assert "text_encoder_2" in manifest.models and (sdxl_exported / manifest.inpaint.tokenizer_2_dir).is_dir()


@pytest.mark.numerics
@pytest.mark.parametrize(("guidance", "negative"), CASES)
def test_sdxl_loop_matches_diffusers(reference, runtime: Pipeline, loop_tolerance, photo_and_mask, guidance: float, negative: str | None) -> None:  # noqa: ANN001
    rgb, mask = photo_and_mask
    expected, noise = reference((guidance, negative))
    options = _options(guidance, negative)
    ours = runtime.inpaint(rgb, mask, options, noise)
    assert ours.shape == expected.shape == (HEIGHT, WIDTH, 3)
    err = float(np.abs(ours - expected).max())
    what = f"SDXL guidance={guidance} negative={negative!r}: generated image vs diffusers"
    assert_within(err, lambda: loop_tolerance((guidance, negative), noise), what)
    assert err <= ACCEPTANCE, f"{what}: max abs err {err:.3g} > {ACCEPTANCE}"
    assert float(expected.std()) > 1e-2  # the image is not flat: the comparison means something


SLIP = 1e-2  # a slip must move the image by far more than the tolerances above (1e-6 .. 1e-4 measured)


@pytest.mark.slow  # a fresh runtime per slip; run with -m slow
@pytest.mark.parametrize("slip", ["time ids (width, height)", "empty negative encoded, not zeros", "no text_embeds"])
def test_sdxl_slips_break_parity(reference, sdxl_exported: Path, photo_and_mask, monkeypatch, slip: str) -> None:  # noqa: ANN001
    """Porting mistakes specific to SDXL, injected into a fresh runtime, move the output by more than 1e-2."""
    from trt_bgswap.runtime.conditioning import SdxlConditioner

    rgb, mask = photo_and_mask
    guidance, negative = (2.0, None)
    expected, noise = reference((guidance, negative))
    rt = Pipeline.load(sdxl_exported, provider="cpu")
    conditioner = rt.stages.conditioner
    assert isinstance(conditioner, SdxlConditioner)
    if slip.startswith("time ids"):
        original = conditioner.time_ids
        monkeypatch.setattr(conditioner, "time_ids", lambda size, negative: original((size[1], size[0]), negative))
    elif slip.startswith("empty negative"):
        monkeypatch.setattr(conditioner, "cfg", type(conditioner.cfg)(**{**conditioner.cfg.to_json(), "force_zeros_for_empty_prompt": False}))
    else:
        encode = conditioner._encode
        monkeypatch.setattr(conditioner, "_encode", lambda text: (encode(text)[0], np.zeros_like(encode(text)[1])))
    err = float(np.abs(rt.inpaint(rgb, mask, _options(guidance, negative), noise) - expected).max())
    assert err > SLIP, f"slip '{slip}' moved the SDXL output by only {err:.3g}: the parity test could not tell"


def _configs(folder: Path) -> tuple[dict, dict, dict]:
    import json

    read = lambda p: json.loads((folder / p).read_text(encoding="utf-8"))  # noqa: E731
    return read("model_index.json"), read("unet/config.json"), read("text_encoder/config.json")


def test_family_is_read_from_configs_not_names(tiny_models_dir: Path, tmp_path: Path) -> None:
    """SDXL and SD1 folders are told apart by their configs, whatever the folder is called; SD2 by its encoder's activation."""
    sdxl = shutil.copytree(tiny_models_dir / "sdxl-inpainting", tmp_path / "stable-diffusion-v1-5-inpainting", ignore=shutil.ignore_patterns("*.safetensors"))
    sd1 = shutil.copytree(tiny_models_dir / "sd-inpainting", tmp_path / "sdxl-inpainting", ignore=shutil.ignore_patterns("*.safetensors"))
    assert family_of(*_configs(sdxl), str(sdxl)).name == SDXL
    index, unet, te = _configs(sd1)
    assert family_of(index, unet, te).name == SD1
    assert family_of(index, unet, {**te, "hidden_act": "gelu"}).name == SD2  # OpenCLIP ViT-H converted to CLIPTextModel
    with pytest.raises(Exception, match="text_encoder_2"):
        family_of({k: v for k, v in _configs(sdxl)[0].items() if k != "text_encoder_2"}, *_configs(sdxl)[1:])


def test_sdxl_build_profiles(sdxl_exported: Path) -> None:
    """`build --backend trt` derives every SDXL input's profile from the specs: the added conditions follow the guided batch."""
    from trt_bgswap.engines.profiles import GenerationShapes, model_profiles

    manifest = Manifest.load(sdxl_exported)
    shapes = GenerationShapes(sizes=((WIDTH, HEIGHT),), batches=(2, 1))
    unet = model_profiles(manifest.models["unet"].spec, shapes, manifest.inpaint.vae_scale_factor)
    f = manifest.inpaint.vae_scale_factor
    assert [p.tensor(UnetIO.SAMPLE).opt for p in unet] == [(2, 9, HEIGHT // f, WIDTH // f), (1, 9, HEIGHT // f, WIDTH // f)]
    assert [p.tensor(UnetIO.TEXT_EMBEDS).opt for p in unet] == [(2, 40), (1, 40)]  # text_encoder_2's projection_dim
    assert [p.tensor(UnetIO.TIME_IDS).opt for p in unet] == [(2, 6), (1, 6)]  # (projection input 88 - 40) / addition_time_embed_dim 8
    te2 = model_profiles(manifest.models["text_encoder_2"].spec, shapes, f)
    assert len(te2) == 1 and te2[0].tensor("input_ids").opt == (1, manifest.inpaint.max_length)


@pytest.mark.slow  # builds ORT engines for the whole export
@pytest.mark.numerics
def test_sdxl_ort_engines(sdxl_exported: Path, runtime: Pipeline, reference, loop_tolerance, photo_and_mask, tmp_path: Path) -> None:  # noqa: ANN001
    """ORT engines built for an SDXL export run the loop within its rounding noise."""
    from trt_bgswap.engines.build import build_engines

    manifest = Manifest.load(sdxl_exported)
    folder = shutil.copytree(sdxl_exported, tmp_path / "export")
    report = build_engines(folder, backend="ort", provider="cpu", sizes=[(WIDTH, HEIGHT)])
    assert set(report.models) == set(manifest.models)
    rgb, mask = photo_and_mask
    _, noise = reference((1.0, None))
    with Pipeline.load(folder, provider="cpu") as built:
        assert str(built.stages.engines["unet"].path).startswith(str(folder / "engines"))  # the built graph runs, not the export's
        ours = built.inpaint(rgb, mask, _options(1.0, None), noise)
    # ORT's offline optimizations only fuse and reorder float32 operations: the same loop, rounding apart
    err = float(np.abs(ours - runtime.inpaint(rgb, mask, _options(1.0, None), noise)).max())
    assert_within(err, lambda: loop_tolerance((1.0, None), noise), "SDXL: built ORT engines vs the exported graphs")


@pytest.mark.slow  # an fp16 export of the tiny SDXL (~35 s of CPU)
def test_fp16_safe_vae_is_chosen_explicitly(tiny_models_dir: Path, tmp_path: Path) -> None:
    """`export --precision fp16`: SDXL's own VAE stays fp32 (force_upcast); a VAE whose config says force_upcast false,
    given with --vae-src (as madebyollin/sdxl-vae-fp16-fix), is exported in fp16 and its constants go to the manifest."""
    import json

    from trt_bgswap.errors import UsageError
    from trt_bgswap.export.exporter import export_models

    vae = shutil.copytree(tiny_models_dir / "sdxl-inpainting" / "vae", tmp_path / "sdxl-vae-fp16-fix")
    config = json.loads((vae / "config.json").read_text(encoding="utf-8"))
    (vae / "config.json").write_text(json.dumps({**config, "force_upcast": False, "scaling_factor": 0.25}), encoding="utf-8")
    with pytest.raises(UsageError, match="--vae-src replaces"):
        export_models(None, None, tiny_models_dir / "rmbg", tmp_path / "x", vae_src=vae)
    out = tmp_path / "export"
    export_models(tiny_models_dir / "sdxl-inpainting", tiny_models_dir / "lcm-lora-sdxl", None, out, precision="fp16", vae_src=vae)
    manifest = Manifest.load(out)
    assert manifest.models["vae_decoder"].precision == "fp16" and manifest.models["unet"].precision == "fp16"
    assert manifest.inpaint is not None and manifest.inpaint.vae_scaling_factor == 0.25
    assert manifest.sources["vae"]["path"] == str(vae.resolve())
