"""A new user with an SDXL inpainting folder and the SDXL LCM-LoRA (issue 12): `export` then `run`, real processes.

No family, size, scheduler or precision flag: the family comes from the folder's configs, the
native area from its UNet and VAE configs, the LCM-LoRA default from the family.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from test_run_command import trt_bgswap


def test_sdxl_export_then_run_with_no_other_flag(tiny_models_dir: Path, sdxl_export: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    home = tmp_path / "home"
    sdxl, rmbg = tiny_models_dir / "sdxl-inpainting", tiny_models_dir / "rmbg"

    # without --lcm-lora the default follows the family: SDXL's LCM-LoRA, not SD1.5's (offline: the error names it)
    proc = trt_bgswap("export", "--inpaint", sdxl, "--rmbg", rmbg, "--out", tmp_path / "x", "--offline", home=home)
    assert proc.returncode != 0 and "lcm-lora-sdxl" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()

    # `trt-bgswap export --inpaint <sdxl> --lcm-lora <lcm-lora-sdxl> --rmbg <rmbg> --out <folder>`, run once per session
    # in its own process (tests/conftest.py: test_sdxl_pipeline.py checks the same folder's graphs against diffusers)
    out, proc = sdxl_export
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["inpaint"]["family"] == "sdxl"
    assert {"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder", "rmbg"} <= set(manifest["models"])

    rgb = data.astronaut()[40:340, 20:470]  # a real photo, 450x300: the generation size keeps its aspect
    src = tmp_path / "astronaut.png"
    Image.fromarray(rgb).save(src)
    result = tmp_path / "astronaut_bgswap.png"
    proc = trt_bgswap("run", src, "--models", out, "--prompt", "a sunny beach", "--seed", "3", "-o", result, home=home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    image = np.asarray(Image.open(result).convert("RGB"))
    assert image.shape == rgb.shape
    assert float(np.abs(image.astype(int) - rgb.astype(int)).mean()) > 1.0  # a background was generated
