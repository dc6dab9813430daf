"""write_image (runtime/image_write.py): photos round-trip through every format, inputs and existing outputs are
never overwritten, and no failure leaves a partial output file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tolerance import EIGHT_BIT_STEP, rounding_bound

from image_files import PHOTOS, encode, leftovers, photo, rng, run_unprivileged
from trt_bgswap.errors import OutputError, OutputExistsError, UsageError
from trt_bgswap.runtime.image_read import read_image
from trt_bgswap.runtime.image_write import to_pil, write_image


def test_unwritable_output_folder(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    out = run_unprivileged(
        f"""
        import numpy as np, os
        from trt_bgswap.errors import OutputError
        from trt_bgswap.runtime.image_write import write_image
        try:
            write_image({str(folder / "out.png")!r}, np.zeros((32, 32, 3), np.uint8)); result = {{"error": None}}
        except OutputError as e:
            result = {{"error": "OutputError", "message": str(e)}}
        result["left"] = sorted(os.listdir({str(folder)!r}))
        """
    )
    assert out["error"] == "OutputError"
    assert "not writable" in out["message"] and str(folder) in out["message"]
    assert out["left"] == []


# ---------------------------------------------------------------- round trips and writing


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("ext,min_psnr", [(".png", None), (".jpg", 36.0), (".webp", 30.0)])
def test_photo_round_trip(tmp_path: Path, name: str, ext: str, min_psnr: float | None) -> None:
    img = photo(name)
    rgb = img if img.ndim == 3 else np.stack([img] * 3, axis=2)
    out = write_image(tmp_path / f"{name}{ext}", rgb, quality=95)
    got = read_image(out)
    assert got.rgb.shape == rgb.shape and got.path == out
    diff = got.rgb.astype(np.float64) - rgb
    if min_psnr is None:
        assert np.abs(diff).max() == 0, f"{name}{ext}: PNG must be lossless"
    else:  # a lossy codec's quality at quality=95 (libjpeg's and libwebp's integer transforms), not float rounding
        psnr = 10 * np.log10(255.0**2 / max(np.mean(diff**2), 1e-12))
        assert psnr >= min_psnr, f"{name}{ext}: PSNR {psnr:.1f} dB < {min_psnr} (max abs error {np.abs(diff).max():.0f})"
    assert leftovers(tmp_path) == [out.name]


@pytest.mark.parametrize("ext", [".png", ".webp"])
def test_rgba_round_trip(tmp_path: Path, ext: str) -> None:
    rgb = photo("astronaut")
    a = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    out = write_image(tmp_path / f"cut{ext}", np.dstack([rgb, a]), quality=100)
    got = read_image(out)
    assert got.alpha is not None
    err = float(np.abs(got.alpha - a / 255.0).max())
    # PNG keeps the 8-bit alpha (one float32 division); WebP may re-quantise it by one step
    assert err <= (0.0 if ext == ".png" else EIGHT_BIT_STEP) + rounding_bound(1.0, 1), f"{ext}: alpha max abs error {err}"


def test_greyscale_mask_is_written_as_L(tmp_path: Path) -> None:
    mask = photo("camera")
    out = write_image(tmp_path / "m.png", mask)
    assert Image.open(out).mode == "L"
    assert np.array_equal(np.asarray(Image.open(out)), mask)


def test_rgba_to_jpeg_is_refused(tmp_path: Path) -> None:
    rgba = np.dstack([photo("astronaut"), np.full(photo("astronaut").shape[:2], 128, np.uint8)])
    with pytest.raises(UsageError, match="JPEG has no alpha channel; write .png or .webp"):
        write_image(tmp_path / "cut.jpg", rgba)
    assert leftovers(tmp_path) == []


def _inputs(tmp_path: Path) -> tuple[Path, bytes]:
    src = tmp_path / "in" / "photo.png"
    src.parent.mkdir()
    raw = encode(Image.fromarray(photo("astronaut", 4)), "PNG")
    src.write_bytes(raw)
    return src, raw


@pytest.mark.parametrize("alias", ["same", "relative", "symlink", "hardlink"])
def test_never_overwrites_an_input(tmp_path: Path, alias: str, monkeypatch: pytest.MonkeyPatch) -> None:
    src, raw = _inputs(tmp_path)
    if alias == "same":
        target = src
    elif alias == "relative":
        monkeypatch.chdir(tmp_path / "in")
        target = Path("..") / "in" / "photo.png"
    elif alias == "symlink":
        target = tmp_path / "link.png"
        target.symlink_to(src)
    else:
        target = tmp_path / "hard.png"
        os.link(src, target)
    with pytest.raises(OutputError, match="is an input file.*never overwritten"):
        write_image(target, np.zeros((32, 32, 3), np.uint8), overwrite=True, protected={src})
    assert src.read_bytes() == raw
    assert leftovers(tmp_path / "in") == ["photo.png"]


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        write_image(target, photo("astronaut", 4))
    assert target.read_bytes() == b"old"
    write_image(target, photo("astronaut", 4), overwrite=True)
    assert np.array_equal(read_image(target).rgb, photo("astronaut", 4))
    assert leftovers(tmp_path) == ["out.png"]


def test_output_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(OutputError, match="is not a folder"):
        write_image(tmp_path / "afile" / "out.png", photo("astronaut", 4))
    assert leftovers(tmp_path) == ["afile"]


def test_missing_output_folders_are_created(tmp_path: Path) -> None:
    out = write_image(tmp_path / "a" / "b" / "out.webp", photo("astronaut", 4))
    assert out.is_file() and leftovers(out.parent) == ["out.webp"]


class _DiskFull(OSError):
    pass


def test_failure_mid_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate ENOSPC halfway through encoding: the old output survives and no temp file is left."""
    target = tmp_path / "out.png"
    target.write_bytes(b"previous result")
    real_save = Image.Image.save

    def save_then_fail(self: Image.Image, fp: object, format: str | None = None, **params: object) -> None:  # noqa: A002
        real_save(self, fp, format=format, **params)
        with open(fp, "ab") as f:  # type: ignore[arg-type]
            f.write(b"partial")
        raise _DiskFull(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(OutputError, match=r"cannot write \(No space left on device\); check free space"):
        write_image(target, photo("astronaut", 4), overwrite=True)
    assert target.read_bytes() == b"previous result"
    assert leftovers(tmp_path) == ["out.png"]


@pytest.mark.parametrize(
    "path,array,quality,message",
    [
        ("o.gif", np.zeros((32, 32, 3), np.uint8), 95, "unsupported output extension '.gif'"),
        ("o", np.zeros((32, 32, 3), np.uint8), 95, "unsupported output extension '(none)'"),
        ("o.jpg", np.zeros((32, 32, 3), np.uint8), 0, "quality=0: give an integer from 1 to 100"),
        ("o.jpg", np.zeros((32, 32, 3), np.uint8), 101, "quality=101"),
        ("o.png", np.zeros((32, 32, 3), np.float32), 95, "dtype float32; give a uint8 array"),
        ("o.png", np.zeros((32, 32, 2), np.uint8), 95, "shape (32, 32, 2)"),
        ("o.webp", np.zeros((8, 16384, 3), np.uint8), 95, "exceeds the WEBP limit of 16383 px"),
    ],
)
def test_bad_write_arguments(tmp_path: Path, path: str, array: np.ndarray, quality: int, message: str) -> None:
    with pytest.raises(UsageError) as info:
        write_image(tmp_path / path, array, quality=quality)
    assert message in str(info.value)
    assert leftovers(tmp_path) == []


def test_jpeg_quality_is_used(tmp_path: Path) -> None:
    rgb = photo("coffee")
    low = write_image(tmp_path / "low.jpg", rgb, quality=20).stat().st_size
    high = write_image(tmp_path / "high.jpg", rgb, quality=95).stat().st_size
    assert low < high / 2, f"quality 20 gave {low} bytes, quality 95 gave {high}"


@pytest.mark.parametrize("shape,mode", [((20, 30), "L"), ((20, 30, 1), "L"), ((20, 30, 3), "RGB"), ((20, 30, 4), "RGBA")])
def test_to_pil(shape: tuple[int, ...], mode: str) -> None:
    arr = rng(12).integers(0, 256, shape, dtype=np.uint8)
    im = to_pil(arr)
    assert im.mode == mode and im.size == (30, 20)
    assert np.array_equal(np.asarray(im).reshape(shape), arr)
