"""`trt-bgswap run` as a new user runs it (issue 8): a real process, real files, the tiny exported models.

Each test is one item of the issue and failed before its fix: cut-out inputs, options that
used to be ignored, EXIF metadata, solid colours that needed diffusion models, verbosity
after the sub-command, colour profiles, log lines printed twice.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms
from skimage import data

from icc_profiles import display_p3_profile

SIDE = 160


def console_script() -> str:
    found = shutil.which("trt-bgswap", path=str(Path(sys.executable).parent))
    assert found, "the trt-bgswap console script is not installed next to this Python"
    return found


def trt_bgswap(*args: object, home: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """The installed command, with a private per-user cache (so nothing of the user's is read)."""
    env = {**os.environ, "TRT_BGSWAP_HOME": str(home)}
    return subprocess.run([console_script(), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def photo(name: str = "chelsea") -> np.ndarray:
    im = Image.fromarray(getattr(data, name)())
    im.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    return np.asarray(im.convert("RGB"))


def box(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    return m


# --- item 3: an RGBA input's transparency is its subject mask ---


def test_cut_out_input_is_its_own_mask(exported_dir: Path, tmp_path: Path) -> None:
    rgb = photo()
    alpha = box(*rgb.shape[:2])
    hidden = rgb.copy()
    hidden[alpha == 0] = [250, 3, 180]  # what lies under alpha 0 in a cut-out: anything
    src = tmp_path / "product.png"
    Image.fromarray(np.dstack([hidden, alpha]), "RGBA").save(src)
    out, cutout = tmp_path / "out.png", tmp_path / "cutout.png"
    proc = trt_bgswap("-v", "run", src, "--models", exported_dir, "--bg-color", "#00ff00", "-o", out, "--save-cutout", cutout, home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert "the input is a cut-out" in proc.stderr, proc.stderr
    got = np.asarray(Image.open(out))
    assert (got[alpha == 0] == [0, 255, 0]).all(), "pixels hidden by the input's alpha came back"
    np.testing.assert_array_equal(got[alpha == 255], hidden[alpha == 255], err_msg="subject pixels differ from the input")
    c = np.asarray(Image.open(cutout))
    np.testing.assert_array_equal(c[..., 3], alpha, err_msg="the cut-out does not keep the input's alpha")
    # asked otherwise: the masker runs and the input's alpha is not the mask
    proc = trt_bgswap("run", src, "--models", exported_dir, "--bg-color", "#00ff00", "-o", tmp_path / "masked.png", "--ignore-alpha", home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "masked.png")), got)


# --- item 7: options that had no effect are refused or warned about, never ignored ---


def test_negative_prompt_without_guidance_warns(exported_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "cat.png"
    Image.fromarray(photo()).save(src)
    proc = trt_bgswap("run", src, "--models", exported_dir, "--prompt", "a beach", "--negative-prompt", "blurry", "--seed", 1, "-o", tmp_path / "o.png", home=tmp_path / "h")
    assert proc.returncode == 0, proc.stderr
    assert "--negative-prompt has no effect at --guidance 1" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--prompt", "x", "-o", "{tmp}/f.jpg", "--format", "png"], "names a .jpg file but --format is png"),
        (["--bg-color", "red", "--seed", "3", "-o", "{tmp}/f.png"], "--seed only act on a generated background"),
        (["--bg-color", "red", "--num-results", "2", "-o", "{tmp}/f.png"], "--num-results only act on a generated background"),
    ],
)
def test_conflicting_options_are_refused_before_work(args: list[str], phrase: str, exported_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "cat.png"
    Image.fromarray(photo()).save(src)
    proc = trt_bgswap("run", src, "--models", exported_dir, *[a.format(tmp=tmp_path) for a in args], home=tmp_path / "h")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and phrase in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"], "nothing may be written"


# --- item 8: EXIF metadata is kept (minus orientation and, unless asked, GPS) ---


def _exif_photo(path: Path) -> None:
    exif = Image.Exif()
    exif[0x010F] = "Acme"  # Make
    exif[0x0110] = "Model 7"  # Model
    exif[0x0132] = "2026:11:30 12:00:00"  # DateTime
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)}  # GPS IFD
    Image.fromarray(photo()).save(path, exif=exif.tobytes(), quality=92)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_exif_is_kept_without_orientation_and_gps(ext: str, exported_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "camera.jpg"
    _exif_photo(src)
    runs = {"default": [], "strip": ["--strip-metadata"], "gps": ["--keep-gps"]}
    for name, extra in runs.items():
        out = tmp_path / f"{name}{ext}"
        proc = trt_bgswap("run", src, "--models", exported_dir, "--bg-color", "white", "-o", out, *extra, home=tmp_path / "h")
        assert proc.returncode == 0, proc.stderr
        with Image.open(out) as im:
            exif = im.getexif()
            assert im.size == (photo().shape[0], photo().shape[1]), "the orientation was not applied to the pixels"
        if name == "strip":
            assert len(exif) == 0, dict(exif)
            continue
        assert exif.get(0x010F) == "Acme" and exif.get(0x0132) == "2026:11:30 12:00:00", f"{ext}: camera/date lost: {dict(exif)}"
        assert 0x0112 not in exif, f"{ext}: the orientation tag would rotate the already upright output again"
        assert (0x8825 in exif) == (name == "gps"), f"{ext} {name}: GPS {'missing' if name == 'gps' else 'kept'}"


# --- item 9: a solid colour needs only the masker, or nothing with the user's mask ---


def test_solid_colour_opens_no_diffusion_model(exported_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "cat.png"
    Image.fromarray(photo()).save(src)
    proc = trt_bgswap("-v", "run", src, "--models", exported_dir, "--bg-color", "navy", "-o", tmp_path / "o.png", "--provider", "cpu", home=tmp_path / "h")
    assert proc.returncode == 0, proc.stderr
    loaded = [line for line in proc.stderr.splitlines() if "loaded " in line and "rmbg=" in line]
    assert len(loaded) == 1 and "unet" not in loaded[0] and "text_encoder" not in loaded[0], proc.stderr


def test_solid_colour_with_own_mask_needs_no_models(tmp_path: Path) -> None:
    rgb = photo()
    src, mask = tmp_path / "cat.png", tmp_path / "mask.png"
    Image.fromarray(rgb).save(src)
    Image.fromarray(box(*rgb.shape[:2])).save(mask)
    proc = trt_bgswap("run", src, "--bg-color", "#102030", "--mask", mask, "-o", tmp_path / "o.png", home=tmp_path / "empty-home")
    assert proc.returncode == 0, proc.stderr
    got = np.asarray(Image.open(tmp_path / "o.png"))
    assert (got[box(*rgb.shape[:2]) == 0] == [16, 32, 48]).all()


# --- item 11: the smaller ones ---


def test_quiet_after_the_sub_command_and_no_doubled_log_lines(exported_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "cat.png"
    Image.fromarray(photo()).save(src)
    quiet = trt_bgswap("run", src, "--models", exported_dir, "--bg-color", "red", "-o", tmp_path / "a.png", "-q", home=tmp_path / "h")
    assert quiet.returncode == 0 and quiet.stderr.splitlines() == [quiet.stderr.splitlines()[-1]], quiet.stderr  # the summary only
    loud = trt_bgswap("run", src, "--models", exported_dir, "--bg-color", "red", "-o", tmp_path / "b.png", home=tmp_path / "h")
    lines = [line for line in loud.stderr.splitlines() if line.strip()]
    assert not any(line.startswith(("INFO:", "WARNING:")) for line in lines), lines
    assert len(lines) == len(set(lines)), f"log lines printed twice: {lines}"


def test_models_pointing_at_a_file(tmp_path: Path) -> None:
    src = tmp_path / "cat.png"
    Image.fromarray(photo()).save(src)
    proc = trt_bgswap("run", src, "--models", src, "--prompt", "x", home=tmp_path / "h")
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr and "export --out" not in proc.stderr, proc.stderr


def test_help_shows_defaults() -> None:
    proc = subprocess.run([console_script(), "run", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for shown in ("(default: 4)", "(default: 1.0)", "(default: 95)", "(default: 8)", "(default: auto)"):
        assert shown in text, f"{shown} missing from run --help"


def test_wide_gamut_photo_gets_the_colour_asked_for(exported_dir: Path, tmp_path: Path) -> None:
    """A Display P3 photo with --bg-color '#1e90ff': the written pixels, read through the photo's profile, are #1e90ff."""
    rgb = photo()
    icc = display_p3_profile()
    src, mask = tmp_path / "p3.png", tmp_path / "mask.png"
    Image.fromarray(rgb).save(src, icc_profile=icc)
    Image.fromarray(box(*rgb.shape[:2])).save(mask)
    out = tmp_path / "o.png"
    proc = trt_bgswap("run", src, "--bg-color", "#1e90ff", "--mask", mask, "-o", out, home=tmp_path / "h")
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im:
        assert im.info.get("icc_profile") == icc, "the output lost the photo's profile"
        got = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(got[box(*rgb.shape[:2]) == 255], rgb[box(*rgb.shape[:2]) == 255], err_msg="subject pixels changed")
    bg = got[0, 0]
    shown = np.asarray(ImageCms.applyTransform(
        Image.fromarray(bg.reshape(1, 1, 3)),
        ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"), "RGB", "RGB"),
    ))[0, 0]
    # one 8-bit rounding each way through the profile: within 2 levels per channel
    assert np.abs(shown.astype(int) - [30, 144, 255]).max() <= 2, f"#1e90ff shows as {tuple(shown)} through the photo's profile (written {tuple(bg)})"
