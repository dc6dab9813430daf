"""read_image (runtime/image_read.py): every bad input is a one-line InputImageError, every mode converts as
specified, EXIF orientation is applied, and a failed read leaves no output behind.

Expected conversions are computed independently from the source data (palette look-ups,
v * 255 / 65535, the EXIF orientation table, Pillow 13's documented CMYK formula), never by
running the code under test a second way.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tolerance import EIGHT_BIT_STEP, rounding_bound

from image_files import encode, leftovers, photo, raw_png, rng, run_unprivileged
from trt_bgswap.errors import InputImageError, UsageError
from trt_bgswap.runtime.image_read import DEFAULT_MAX_PIXELS, MIN_SIDE, from_pil, read_image
from trt_bgswap.runtime.image_write import write_image


def read_then_write(src: object, out: Path) -> None:
    """What a batch does per image: read, then write; a read failure must leave nothing behind."""
    loaded = read_image(src)
    write_image(out, loaded.rgb)


# ---------------------------------------------------------------- bad inputs


def _bad_cases(tmp: Path) -> dict[str, tuple[object, list[str]]]:
    png = encode(Image.fromarray(photo("astronaut", 4)), "PNG")
    jpg = encode(Image.fromarray(photo("chelsea")), "JPEG", quality=90)
    corrupt_png = bytearray(png)
    corrupt_png[len(png) // 2 : len(png) // 2 + 64] = bytes(64)  # zeroed IDAT bytes: CRC / zlib failure
    files = {
        "empty.png": b"",
        "text.jpg": b"this is not an image at all, just some text\n" * 20,
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 3],
        "header_only.png": png[:40],
        "corrupt.png": bytes(corrupt_png),
        "tiny.png": encode(Image.fromarray(photo("astronaut")[:8, :8]), "PNG"),
        "thin.png": encode(Image.fromarray(photo("astronaut")[:MIN_SIDE - 1, :200]), "PNG"),
        "bomb.png": raw_png(40_000, 40_000, 8, 2, None),
    }
    for name, payload in files.items():
        (tmp / name).write_bytes(payload)
    (tmp / "a_folder.png").mkdir()
    return {
        "missing": (tmp / "nope.jpg", ["nope.jpg", "no such file", "check the path"]),
        "directory": (tmp / "a_folder.png", ["a_folder.png", "is a folder", "image file"]),
        "empty": (tmp / "empty.png", ["empty.png", "empty (0 bytes)", "re-download"]),
        "not_an_image": (tmp / "text.jpg", ["text.jpg", "not an image", "PNG, JPEG"]),
        "truncated_png": (tmp / "truncated.png", ["truncated.png", "corrupt or truncated", "re-download"]),
        "truncated_jpeg": (tmp / "truncated.jpg", ["truncated.jpg", "corrupt or truncated JPEG", "re-download"]),
        "header_only": (tmp / "header_only.png", ["header_only.png", "corrupt or truncated PNG", "re-download"]),
        "corrupt_png": (tmp / "corrupt.png", ["corrupt.png", "corrupt or truncated PNG", "re-download"]),
        "too_small": (tmp / "tiny.png", ["tiny.png", "8x8 is too small", f"minimum is {MIN_SIDE} px", "upscale"]),
        "too_thin": (tmp / "thin.png", ["thin.png", f"200x{MIN_SIDE - 1} is too small"]),
        "bomb": (tmp / "bomb.png", ["bomb.png", "1600.0 MP is above the 67.1 MP limit", "--max-pixels"]),
        "empty_bytes": (b"", ["<image bytes>", "empty"]),
        "random_bytes": (bytes(range(256)) * 4, ["<image bytes>", "not an image"]),
    }


BAD_NAMES = [
    "missing", "directory", "empty", "not_an_image", "truncated_png", "truncated_jpeg", "header_only",
    "corrupt_png", "too_small", "too_thin", "bomb", "empty_bytes", "random_bytes",
]


@pytest.mark.parametrize("case", BAD_NAMES)
def test_bad_input_is_one_clear_error(case: str, tmp_path: Path) -> None:
    src, expected = _bad_cases(tmp_path)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(InputImageError) as info:
        read_then_write(src, out_dir / "result.png")
    message = str(info.value)
    for part in expected:
        assert part in message, f"{case}: {part!r} not in {message!r}"
    assert "\n" not in message, f"{case}: message is not one line: {message!r}"
    assert leftovers(out_dir) == [], f"{case}: left {leftovers(out_dir)}"


@pytest.mark.parametrize("side", [9000, 40_000])  # below and above Pillow's own hard limit
def test_bomb_is_refused_before_decoding(side: int) -> None:
    """The bomb's IDAT is empty: reaching the decoder would say 'truncated', not name the pixel cap."""
    with pytest.raises(InputImageError, match=r"MP is above the 67\.1 MP limit \(decompression-bomb guard\)"):
        read_image(raw_png(side, side, 8, 2, None))


def test_pillow_bomb_warning_and_error_become_ours() -> None:
    """Between Pillow's warning (89 MP) and error (179 MP) thresholds, and beyond, only our error surfaces."""
    side_warn = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)  # PIL warns here
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any leaked DecompressionBombWarning fails the test
        with pytest.raises(InputImageError, match="above the .* limit"):
            read_image(raw_png(side_warn, side_warn, 8, 2, None))
    side_err = int((Image.MAX_IMAGE_PIXELS * 2.5) ** 0.5)  # PIL raises DecompressionBombError here
    with pytest.raises(InputImageError) as info:
        read_image(raw_png(side_err, side_err, 8, 2, None), max_pixels=10**12)
    assert "Pillow's decompression-bomb limit" in str(info.value)
    assert "MAX_IMAGE_PIXELS" in str(info.value)


@pytest.mark.parametrize("cap,ok", [(256 * 256, True), (256 * 256 - 1, False)])
def test_max_pixels_is_configurable(cap: int, ok: bool) -> None:
    raw = encode(Image.fromarray(photo("astronaut", 2)), "PNG")  # 256x256
    if ok:
        assert read_image(raw, max_pixels=cap).rgb.shape == (256, 256, 3)
    else:
        with pytest.raises(InputImageError, match=r"256x256 = 0\.1 MP is above the 0\.1 MP limit"):
            read_image(raw, max_pixels=cap)


@pytest.mark.parametrize("cap", [0, -5, 2.5, True])
def test_bad_max_pixels_value(cap: object) -> None:
    with pytest.raises(UsageError, match="max_pixels"):
        read_image(b"x", max_pixels=cap)  # type: ignore[arg-type]


def test_none_max_pixels_means_the_default() -> None:
    raw = encode(Image.fromarray(photo("chelsea")), "PNG")
    assert read_image(raw, max_pixels=None).rgb.shape == photo("chelsea").shape
    assert DEFAULT_MAX_PIXELS >= 50_000_000


def test_unreadable_file(tmp_path: Path) -> None:
    src = tmp_path / "secret.png"
    src.write_bytes(encode(Image.fromarray(photo("astronaut", 4)), "PNG"))
    src.chmod(0)
    out = run_unprivileged(
        f"""
        from trt_bgswap.errors import InputImageError
        from trt_bgswap.runtime.image_read import read_image
        try:
            read_image({str(src)!r}); result = {{"error": None}}
        except InputImageError as e:
            result = {{"error": "InputImageError", "message": str(e)}}
        """
    )
    assert out["error"] == "InputImageError"
    for part in ("secret.png", "permission denied", "readable"):
        assert part in out["message"]


# ---------------------------------------------------------------- EXIF orientation

# The EXIF orientation table: how to turn the stored pixels into the upright picture.
ORIENTATION = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),  # rotate 90 degrees clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, k=1),  # rotate 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATION))
def test_exif_orientation_is_applied(orientation: int) -> None:
    stored = photo("chelsea")  # 150x226: not square, not symmetric
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    decoded_as_stored = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    want = ORIENTATION[orientation](decoded_as_stored)
    got = read_image(raw)
    assert got.rgb.shape == want.shape, f"orientation {orientation}: {got.rgb.shape} vs {want.shape}"
    err = int(np.abs(got.rgb.astype(int) - want).max())
    assert err == 0, f"orientation {orientation}: max abs error {err}"
    if got.exif is not None:  # the tag was consumed: writing the EXIF back must not rotate twice
        assert Image.Exif().load(got.exif) is None or 0x0112 not in _exif_tags(got.exif)


def _exif_tags(raw: bytes) -> dict:
    e = Image.Exif()
    e.load(raw)
    return dict(e)


# ---------------------------------------------------------------- mode conversions

def test_mode_L() -> None:
    grey = photo("camera")
    got = read_image(encode(Image.fromarray(grey), "PNG"))
    assert got.mode == "L" and got.alpha is None
    assert np.array_equal(got.rgb, np.stack([grey] * 3, axis=2))


def test_mode_1_bilevel() -> None:
    bits = photo("camera") > 128
    got = read_image(encode(Image.fromarray(bits), "PNG"))
    assert got.mode == "1"
    assert np.array_equal(got.rgb, np.stack([bits.astype(np.uint8) * 255] * 3, axis=2))


def test_mode_LA_keeps_alpha_separately() -> None:
    grey = photo("camera")
    a = (np.arange(grey.size).reshape(grey.shape) % 256).astype(np.uint8)
    got = read_image(encode(Image.fromarray(np.dstack([grey, a]), "LA"), "PNG"))
    assert np.array_equal(got.rgb, np.stack([grey] * 3, axis=2)), "colour must not be composited onto anything"
    assert got.alpha is not None and got.alpha.dtype == np.float32
    assert np.abs(got.alpha - a / 255.0).max() <= rounding_bound(1.0, 1)  # one float32 division of a value <= 1


def test_mode_RGBA_keeps_colour_under_transparent_pixels() -> None:
    rgb = photo("astronaut")
    a = np.zeros(rgb.shape[:2], np.uint8)
    a[:, rgb.shape[1] // 2 :] = 200  # left half fully transparent, colour still there
    got = read_image(encode(Image.fromarray(np.dstack([rgb, a]), "RGBA"), "PNG"))
    assert np.array_equal(got.rgb, rgb)
    assert np.abs(got.alpha - a / 255.0).max() <= rounding_bound(1.0, 1)  # one float32 division of a value <= 1


def test_mode_P_palette_lookup() -> None:
    p = Image.fromarray(photo("coffee")).quantize(colors=64)
    indices = np.asarray(p)
    palette = np.array(p.getpalette()[: 3 * 256], np.uint8).reshape(-1, 3)
    got = read_image(encode(p, "PNG"))
    assert got.mode == "P" and got.alpha is None
    assert np.array_equal(got.rgb, palette[indices])


def test_mode_P_with_transparent_index() -> None:
    p = Image.fromarray(photo("coffee")).quantize(colors=32)
    indices = np.asarray(p)
    transparent = int(indices[0, 0])
    palette = np.array(p.getpalette()[: 3 * 256], np.uint8).reshape(-1, 3)
    got = read_image(encode(p, "GIF", transparency=transparent))
    assert np.array_equal(got.rgb[indices != transparent], palette[indices][indices != transparent])
    assert np.array_equal(got.alpha, (indices != transparent).astype(np.float32))


def test_mode_RGB_with_transparent_colour() -> None:
    rgb = photo("astronaut", 4).copy()
    key = (1, 2, 3)
    rgb[:10, :10] = key
    got = read_image(encode(Image.fromarray(rgb), "PNG", transparency=key))
    assert np.array_equal(got.rgb, rgb)
    want_alpha = np.ones(rgb.shape[:2], np.float32)
    want_alpha[np.all(rgb == key, axis=2)] = 0.0
    assert np.array_equal(got.alpha, want_alpha)


def test_mode_I16_png_scaled_not_clipped() -> None:
    v = rng().integers(0, 65536, (40, 60), dtype=np.uint16)
    raw = encode(Image.fromarray(v), "PNG")
    got = read_image(raw)
    assert got.mode.startswith("I;16"), got.mode
    want = np.rint(v * 255.0 / 65535.0).astype(np.uint8)
    assert np.array_equal(got.rgb[..., 0], want) and np.array_equal(got.rgb[..., 2], want)


def test_mode_I16_big_endian_pgm_like_tiff() -> None:
    tifffile = pytest.importorskip("tifffile")
    v = rng(1).integers(0, 65536, (32, 48), dtype=np.uint16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, v.astype(">u2"), byteorder=">")
    got = read_image(buf.getvalue())
    assert np.array_equal(got.rgb[..., 1], np.rint(v * 255.0 / 65535.0).astype(np.uint8)), got.mode


@pytest.mark.parametrize(
    "name,values",
    [
        ("int32_16bit_range", rng(2).integers(0, 65536, (24, 32)).astype(np.int32)),
        ("int32_signed", rng(3).integers(-70000, 90000, (24, 32)).astype(np.int32)),
    ],
)
def test_mode_I(name: str, values: np.ndarray) -> None:
    tifffile = pytest.importorskip("tifffile")
    buf = io.BytesIO()
    tifffile.imwrite(buf, values)
    got = read_image(buf.getvalue())
    assert got.mode == "I", got.mode
    if values.min() >= 0 and values.max() <= 65535:
        want = np.rint(values * 255.0 / 65535.0)
    else:
        want = np.rint((values - values.min()) / (values.max() - values.min()) * 255.0)
    err = int(np.abs(got.rgb[..., 0].astype(int) - want).max())
    assert err == 0, f"{name}: max abs error {err}"


@pytest.mark.parametrize(
    "name,values",
    [
        ("unit_range", rng(4).random((24, 32)).astype(np.float32)),
        ("hdr_range", (rng(5).random((24, 32)) * 25 - 5).astype(np.float32)),
    ],
)
def test_mode_F(name: str, values: np.ndarray) -> None:
    tifffile = pytest.importorskip("tifffile")
    buf = io.BytesIO()
    tifffile.imwrite(buf, values)
    got = read_image(buf.getvalue())
    assert got.mode == "F", got.mode
    v = values.astype(np.float64)
    want = np.rint(v * 255.0) if v.min() >= 0 and v.max() <= 1 else np.rint((v - v.min()) / (v.max() - v.min()) * 255.0)
    err = int(np.abs(got.rgb[..., 0].astype(int) - want).max())
    assert err == 0, f"{name}: max abs error {err}"


def test_mode_F_with_nan_is_not_a_crash() -> None:
    tifffile = pytest.importorskip("tifffile")
    v = (rng(6).random((24, 32)) * 3).astype(np.float32)
    v[0, :5] = np.nan
    buf = io.BytesIO()
    tifffile.imwrite(buf, v)
    got = read_image(buf.getvalue())
    assert np.all(got.rgb[0, :5] == 0)
    finite = np.isfinite(v)
    want = np.rint((v - np.nanmin(v)) / (np.nanmax(v) - np.nanmin(v)) * 255.0)
    assert np.abs(got.rgb[..., 0][finite].astype(int) - want[finite]).max() == 0


def test_mode_LAB_tiff_through_littlecms() -> None:
    """CIELab TIFFs: compare with littleCMS's Lab -> sRGB transform (and no alpha: 'LAB' has an A band name)."""
    from PIL import ImageCms

    lab = np.dstack([rng(13).integers(0, 256, (24, 32), dtype=np.uint8) for _ in range(3)])
    im = Image.fromarray(lab, "LAB")
    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    want = np.asarray(ImageCms.applyTransform(im, transform)).astype(int)
    got = read_image(encode(im, "TIFF"))
    assert got.mode == "LAB" and got.alpha is None
    err = int(np.abs(got.rgb.astype(int) - want).max())
    assert err <= 1, f"LAB->RGB max abs error {err}"  # two 8-bit roundings of the same transform: one step apart


def _cmyk_expected(cmyk: np.ndarray) -> np.ndarray:
    """Pillow 13's CMYK -> RGB: (255 - C) * (255 - K) / 255 per channel."""
    c = cmyk.astype(np.float64)
    return np.rint((255.0 - c[..., :3]) * (255.0 - c[..., 3:4]) / 255.0).astype(np.int64)


def test_mode_CMYK_tiff() -> None:
    cmyk = rng(7).integers(0, 256, (32, 48, 4), dtype=np.uint8)
    got = read_image(encode(Image.fromarray(cmyk, "CMYK"), "TIFF"))
    assert got.mode == "CMYK"
    err = int(np.abs(got.rgb.astype(np.int64) - _cmyk_expected(cmyk)).max())
    assert err <= 1, f"CMYK->RGB max abs error {err}"  # Pillow's integer rounding vs rint: one 8-bit step


def test_mode_CMYK_jpeg() -> None:
    cmyk = np.zeros((32, 48, 4), np.uint8)
    cmyk[..., 0], cmyk[..., 1], cmyk[..., 2], cmyk[..., 3] = 10, 200, 30, 40  # flat: JPEG is exact on it
    got = read_image(encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=100))
    err = int(np.abs(got.rgb.astype(np.int64) - _cmyk_expected(cmyk)).max())
    assert err <= 2, f"CMYK JPEG->RGB max abs error {err}"  # libjpeg's integer colour transform, then CMYK->RGB: a step each


def test_mode_CMYK_with_an_unusable_profile_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()  # an RGB profile on CMYK data
    cmyk = rng(8).integers(0, 256, (32, 48, 4), dtype=np.uint8)
    with caplog.at_level(logging.WARNING):
        got = read_image(encode(Image.fromarray(cmyk, "CMYK"), "TIFF", icc_profile=srgb))
    assert "ICC profile unusable" in caplog.text
    assert int(np.abs(got.rgb.astype(np.int64) - _cmyk_expected(cmyk)).max()) <= 1  # one 8-bit step, as above
    assert got.icc is None


@pytest.mark.parametrize("channels,color_type", [(3, 2), (4, 6)])
def test_16bit_colour_png(channels: int, color_type: int) -> None:
    v = rng(9).integers(0, 65536, (20, 30, channels), dtype=np.uint16)
    got = read_image(raw_png(30, 20, 16, color_type, v.astype(">u2").tobytes()))
    want = v * 255.0 / 65535.0
    err = float(np.abs(got.rgb - want[..., :3]).max())
    assert err <= 1.0, f"16-bit colour PNG: max abs error {err:.3f} (8-bit steps)"  # quantised to 8 bits: within one step
    if channels == 4:
        aerr = float(np.abs(got.alpha - v[..., 3] / 65535.0).max())
        # the alpha too is brought to 8 bits (one step), then divided in float32 (one rounding)
        assert aerr <= EIGHT_BIT_STEP + rounding_bound(1.0, 1), f"16-bit alpha: max abs error {aerr:.5f}"


def test_16bit_rgb_tiff() -> None:
    tifffile = pytest.importorskip("tifffile")
    v = rng(10).integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, v, photometric="rgb")
    got = read_image(buf.getvalue())
    err = float(np.abs(got.rgb - v * 255.0 / 65535.0).max())
    assert err <= 1.0, f"16-bit RGB TIFF: max abs error {err:.3f}"  # quantised to 8 bits: within one step


def test_icc_profile_of_rgb_is_kept_and_written_back(tmp_path: Path) -> None:
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    got = read_image(encode(Image.fromarray(photo("coffee")), "PNG", icc_profile=icc))
    assert got.icc == icc
    out = write_image(tmp_path / "o.png", got.rgb, icc=got.icc)
    assert Image.open(out).info.get("icc_profile") == icc


def test_non_rgb_profile_is_not_kept() -> None:
    """A greyscale image's profile does not describe the RGB array returned; it must not be written back."""
    from PIL import ImageCms

    lab_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    assert lab_profile[16:20] == b"Lab "
    got = read_image(encode(Image.fromarray(photo("camera")), "PNG", icc_profile=lab_profile))
    assert got.icc is None


def test_animated_gif_first_frame_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    frames = [Image.fromarray(photo(n, 4)[:100, :100]).quantize(colors=255, dither=Image.Dither.NONE) for n in ("astronaut", "coffee", "rocket")]
    raw = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    palette0 = np.array(frames[0].getpalette()[: 3 * 256], np.uint8).reshape(-1, 3)
    with caplog.at_level(logging.WARNING):
        got = read_image(raw, name="anim.gif")
    assert got.frames == 3
    assert "anim.gif: 3 frames" in caplog.text and "using the first" in caplog.text
    assert np.array_equal(got.rgb, palette0[np.asarray(frames[0])])


def test_animated_webp_first_frame(caplog: pytest.LogCaptureFixture) -> None:
    a, b = photo("astronaut", 4)[:100, :100], photo("rocket", 4)[:100, :100]
    raw = encode(Image.fromarray(a), "WEBP", save_all=True, append_images=[Image.fromarray(b)], lossless=True)
    with caplog.at_level(logging.WARNING):
        got = read_image(raw)
    assert got.frames == 2 and "using the first" in caplog.text
    assert np.array_equal(got.rgb, a)


def test_from_pil_matches_read_image() -> None:
    v = rng(11).integers(0, 65536, (40, 60), dtype=np.uint16)
    raw = encode(Image.fromarray(v), "PNG")
    assert np.array_equal(from_pil(Image.open(io.BytesIO(raw))).rgb, read_image(raw).rgb)
    with pytest.raises(InputImageError, match="too small"):
        from_pil(Image.new("RGB", (4, 4)))
