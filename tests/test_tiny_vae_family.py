"""``--vae tiny`` takes the tiny autoencoder of the inpainting model's family (issue 15: "the SDXL one where that family is exported").

TAESD and TAESDXL have one architecture and one config, so nothing in a TAESD folder says whose latents
it decodes; SD1's TAESD on SDXL latents runs and paints garbage. The default follows the family read from
the inpainting model's configs (like the LCM-LoRA's), a registry TAESD of another family is refused, and
the SDXL export made that way runs the loop at parity with diffusers' SDXL inpainting pipeline using the
same ``AutoencoderTiny`` (the tiny SDXL has a factor-4 VAE, so its TAESD has three blocks).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import family_parity as fp
from test_run_command import console_script
from test_sources import make_hub_cache
from tolerance import assert_within
from trt_bgswap.errors import UsageError
from trt_bgswap.families import FAMILIES, SD1, SDXL
from trt_bgswap.manifest import Manifest
from trt_bgswap.model_folders import FAMILY_TINY_VAE, family_tiny_vae
from trt_bgswap.registry import VARIANTS

WIDTH, HEIGHT = 176, 112  # non-square, multiples of the tiny SDXL's size multiple (VAE 4 x UNet 4)
STEPS = 3


@pytest.mark.parametrize("model,wanted", [("sd-inpainting", "taesd"), ("sd2-inpainting", "taesd"), ("sdxl-inpainting", "taesdxl")])
def test_the_default_follows_the_family(tiny_models_dir: Path, model: str, wanted: str) -> None:
    assert family_tiny_vae(tiny_models_dir / model, FAMILY_TINY_VAE) == wanted
    assert VARIANTS[wanted].family == "tiny-vae" and VARIANTS[wanted].files == ("config.json", "diffusion_pytorch_model.safetensors")
    for given in (wanted, VARIANTS[wanted].repo_id, f"{VARIANTS[wanted].repo_id}@0123abc"):  # the right one, however it is named, is kept
        assert family_tiny_vae(tiny_models_dir / model, given) == given


@pytest.mark.parametrize(
    "model,family,given,wanted",
    [("sdxl-inpainting", SDXL, "taesd", "taesdxl"), ("sdxl-inpainting", SDXL, "madebyollin/taesd@main", "taesdxl"), ("sd-inpainting", SD1, "taesdxl", "taesd")],
)
def test_another_familys_tiny_autoencoder_is_refused(tiny_models_dir: Path, model: str, family: str, given: str, wanted: str) -> None:
    with pytest.raises(UsageError) as info:
        family_tiny_vae(tiny_models_dir / model, given)
    message = str(info.value)
    assert f"--taesd {wanted} " in message and FAMILIES[family].description in message, message
    assert "\n" not in message


def test_a_folder_or_unknown_hub_id_is_taken_as_given(tiny_models_dir: Path) -> None:
    """Their latent API is checked against the model's VAE when exported (test_taesd.py); the family cannot be told from them."""
    for given in (str(tiny_models_dir / "taesd"), "someone/taesd-finetune"):
        assert family_tiny_vae(tiny_models_dir / "sdxl-inpainting", given) == given
    with pytest.raises(UsageError, match="give --inpaint SRC"):
        family_tiny_vae(None, FAMILY_TINY_VAE)


def _hub_snapshot(cache: Path, repo_id: str, src: Path) -> Path:
    """``src``'s files, with their real bytes, as huggingface_hub lays a downloaded snapshot out."""
    files = sorted(f for f in src.iterdir() if f.is_file())
    return make_hub_cache(cache, repo_id, [f.name for f in files], contents={f.name: f.read_bytes() for f in files})


@pytest.fixture(scope="module")
def sdxl_tiny_vae_export(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """`trt-bgswap export --vae tiny --offline` of the tiny SDXL, the hub cache holding a factor-4 TAESD as madebyollin/taesdxl
    and a factor-8 one as madebyollin/taesd (which the SDXL export must not take): (export, the taesdxl snapshot, home)."""
    from trt_bgswap.export.tiny_taesd import write_tiny_taesd

    root = tmp_path_factory.mktemp("sdxl-tiny-vae")
    vae = json.loads((tiny_models_dir / "sdxl-inpainting" / "vae" / "config.json").read_text())
    sdxl_taesd = write_tiny_taesd(root / "taesdxl-src", {"block_out_channels": vae["block_out_channels"], "latent_channels": vae["latent_channels"]}, seed=11)
    hub = root / "home" / "hub"
    snapshot = _hub_snapshot(hub, VARIANTS["taesdxl"].repo_id, sdxl_taesd)
    _hub_snapshot(hub, VARIANTS["taesd"].repo_id, tiny_models_dir / "taesd")
    out = root / "export"
    proc = _export(tiny_models_dir, root, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "so the tiny autoencoder is taesdxl" in proc.stderr
    return out, snapshot, root


def _export(tiny_models_dir: Path, root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The installed command with a private per-user cache and hub cache, offline."""
    cmd = [
        console_script(), "export", "--inpaint", str(tiny_models_dir / "sdxl-inpainting"), "--lcm-lora", str(tiny_models_dir / "lcm-lora-sdxl"),
        "--rmbg", "none", "--vae", "tiny", "--offline", "--out", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "TRT_BGSWAP_HOME": str(root / "home"), "HF_HUB_CACHE": str(root / "home" / "hub")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_sdxl_export_takes_taesdxl_and_refuses_taesd(sdxl_tiny_vae_export: tuple[Path, Path, Path], tiny_models_dir: Path) -> None:
    out, snapshot, root = sdxl_tiny_vae_export
    manifest = Manifest.load(out)
    assert manifest.extra["vae"] == "tiny" and manifest.inpaint.vae_scaling_factor == 1.0
    assert Path(manifest.sources["taesd"]["path"]) == snapshot.resolve()
    wrong = root / "wrong"
    proc = _export(tiny_models_dir, root, wrong, "--taesd", "taesd")
    assert proc.returncode != 0, proc.stderr[-1000:]
    assert "--taesd taesdxl " in proc.stderr.strip().splitlines()[-1], proc.stderr[-1000:]  # the error: one line, the last
    assert not wrong.exists(), "refused before anything was written"


def test_sdxl_loop_with_taesdxl_matches_diffusers(sdxl_tiny_vae_export: tuple[Path, Path, Path], tiny_models_dir: Path, tmp_path: Path) -> None:
    """Our loop on that export vs StableDiffusionXLInpaintPipeline with ``vae=AutoencoderTiny`` from the same snapshot, same noise."""
    from diffusers import AutoencoderTiny, StableDiffusionXLInpaintPipeline

    from trt_bgswap.runtime.pipeline import Pipeline

    out, snapshot, _ = sdxl_tiny_vae_export
    rgb, mask = fp.photo_and_mask()
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_models_dir / "sdxl-inpainting", add_watermarker=False)
    pipe.vae = AutoencoderTiny.from_pretrained(str(snapshot))
    case = (1.0, None)
    reference = fp.lcm_reference(pipe, tiny_models_dir / "lcm-lora-sdxl", rgb, mask, (WIDTH, HEIGHT), STEPS, posterior_draw=False)
    expected, noise = reference(case)
    with Pipeline.load(out, provider="cpu") as runtime:
        ours = runtime.inpaint(rgb, mask, fp.options(case, (WIDTH, HEIGHT), STEPS), noise)
        tolerance = fp.loop_tolerance(out, runtime, rgb, mask, tmp_path / "noisy", (WIDTH, HEIGHT), STEPS)(case, noise)
    assert ours.shape == expected.shape == (HEIGHT, WIDTH, 3)
    assert float(expected.std()) > 100 * tolerance, "the image must vary far more than the tolerance, or the comparison says nothing"
    assert_within(float(np.abs(ours - expected).max()), tolerance, "SDXL --vae tiny loop vs diffusers with AutoencoderTiny")
