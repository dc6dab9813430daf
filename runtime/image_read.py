"""Reading user images robustly: every bad input is one clear `InputImageError`.

Reading follows Pillow's documented behaviour (``Image.open`` reads the header
only, ``load`` decodes) so the pixel cap is enforced *before* any decoding: a
decompression bomb (a small file declaring a huge image) never allocates.
Orientation is applied from EXIF (``ImageOps.exif_transpose``, the TIFF/EXIF
Orientation tag 274), the first frame of an animation is used, and every colour
mode ends as 8-bit RGB plus, when the file carries transparency, a separate float
alpha. Decoders raise many exception types on malformed data (ValueError,
SyntaxError, struct.error, EOFError, OSError...), so decoding is wrapped and
each becomes an `InputImageError` naming the file, the problem and the fix.
Writing is :mod:`~trt_bgswap.runtime.image_write`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from trt_bgswap.errors import ImageTooLargeError, InputImageError, UsageError

log = logging.getLogger(__name__)

# 2**26 px (8192 x 8192, about 67 MP): above 50 MP phone photos, below what a
# few GB of float32 compositing buffers can hold. Raise it with --max-pixels.
DEFAULT_MAX_PIXELS = 1 << 26
# RMBG and the inpainting UNet downsample 32x/8x; below this a mask is meaningless.
MIN_SIDE = 16

# Magic numbers of the formats users bring, to tell "damaged PNG" from "not an image at all".
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)

ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})  # what batch inputs are
ImageSource = str | os.PathLike | bytes | bytearray | memoryview


@dataclass
class LoadedImage:
    rgb: np.ndarray  # uint8 HxWx3, upright (EXIF orientation applied)
    alpha: np.ndarray | None  # float32 HxW in [0, 1] when the file carries transparency, else None
    path: Path | None  # None for bytes input
    format: str | None  # Pillow's format name ("JPEG", "PNG", ...)
    mode: str  # the file's colour mode before conversion ("RGB", "CMYK", "I;16", ...)
    frames: int  # >1 for animations / multi-page files; only the first frame is returned
    icc: bytes | None  # the ICC profile that describes ``rgb`` (None when it is sRGB by conversion or unknown)
    exif: bytes | None  # raw EXIF with the orientation already applied

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL reports it."""
        return (self.rgb.shape[1], self.rgb.shape[0])


@dataclass(frozen=True)
class ImageInfo:
    """What an image file's header says, read without decoding its pixels."""

    size: tuple[int, int]  # (width, height) as stored (before EXIF orientation)
    format: str | None
    mode: str
    has_alpha: bool  # a transparency channel or colour key; it may still be fully opaque


def one_line(text: object) -> str:
    return " ".join(str(text).split()) or "no detail"


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.1f} MP" if n >= 50_000 else f"{n} px"  # below, a small cap would read "0.0 MP"


def _open_bytes(src: ImageSource, name: str | None) -> tuple[io.BytesIO, str, Path | None]:
    """The whole file in memory: decoders seek freely, and a file changing underneath cannot bite."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        label = name or "<image bytes>"
        path = None
    else:
        path = Path(src)
        label = name or str(path)
        try:
            if path.is_dir():
                raise InputImageError(f"{label}: is a folder, not an image file; give the path of an image file")
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputImageError(f"{label}: no such file; check the path") from None
        except PermissionError:
            raise InputImageError(
                f"{label}: permission denied; make the file readable (chmod u+r) or copy it somewhere readable"
            ) from None
        except IsADirectoryError:
            raise InputImageError(f"{label}: is a folder, not an image file; give the path of an image file") from None
        except OSError as e:
            raise InputImageError(f"{label}: cannot read the file ({one_line(e.strerror or e)}); check the path and the disk") from None
    if not data:
        raise InputImageError(f"{label}: the file is empty (0 bytes); re-copy or re-download it")
    return io.BytesIO(data), label, path


def _check_size(label: str, size: tuple[int, int], max_pixels: int, min_side: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageTooLargeError(
            f"{label}: {w}x{h} = {_megapixels(w * h)} is above the {_megapixels(max_pixels)} limit "
            f"(decompression-bomb guard); downscale the image or raise the limit (--max-pixels / max_pixels=)"
        )
    if min(w, h) < min_side:
        raise InputImageError(f"{label}: {w}x{h} is too small to process; the minimum is {min_side} px a side, upscale it first")


def _corrupt(label: str, fmt: str | None, e: BaseException) -> InputImageError:
    kind = f"{fmt} image" if fmt else "image"
    return InputImageError(f"{label}: corrupt or truncated {kind} ({type(e).__name__}: {one_line(e)}); re-export or re-download it")


def _scale16(arr: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 by v * 255 / 65535, rounded (what 16-bit PNG/TIFF greyscale means)."""
    return np.rint(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)


def _stretch(label: str, arr: np.ndarray, what: str) -> np.ndarray:
    """Min-max to 0..255 for data with no declared range (float or 32-bit integer greyscale)."""
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        raise InputImageError(f"{label}: {what} image holds no finite values; check the file")
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    log.warning("%s: %s values span [%g, %g], outside the usual range; stretched to 0..255", label, what, lo, hi)
    scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    return np.rint(np.where(finite, scaled, 0.0)).astype(np.uint8)


def _grey_to_8bit(label: str, im: Image.Image) -> np.ndarray:
    """High-bit-depth greyscale (I;16*, I, F) as uint8 HxW, scaled by its range rather than clipped."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        return _scale16(arr)
    if im.mode == "I":
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return _scale16(arr)  # 16-bit data held in a 32-bit mode (PGM, some TIFFs)
        return _stretch(label, arr, "32-bit integer")
    # "F": [0, 1] is the float convention for images; anything else has no declared range.
    finite = arr[np.isfinite(arr)]
    if finite.size == arr.size and (arr.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0)):
        return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    return _stretch(label, arr, "floating-point")


def _cmyk_to_rgb(label: str, im: Image.Image) -> tuple[Image.Image, bytes | None]:
    """Through the embedded ICC profile when there is one (colour-managed), else Pillow's naive formula."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            out = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
            if out is not None:
                return out, None  # now sRGB
        except Exception as e:  # noqa: BLE001 - a bad or mismatched profile must not lose the image
            log.warning("%s: embedded CMYK ICC profile unusable (%s); converting without colour management", label, one_line(e))
    return im.convert("RGB"), None


def _to_rgb_alpha(label: str, im: Image.Image) -> tuple[np.ndarray, np.ndarray | None, bytes | None]:
    """Any Pillow mode -> (uint8 HxWx3, float32 HxW alpha or None, ICC profile describing the RGB)."""
    icc = im.info.get("icc_profile") or None
    if isinstance(icc, bytes) and icc[16:20] != b"RGB ":  # ICC header: data colour space at bytes 16..19
        icc = None  # a grey or Lab profile does not describe the RGB we return; writing it back would mislabel colours
    mode = im.mode
    transparency = im.info.get("transparency")
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _grey_to_8bit(label, im)
        alpha = None
        if isinstance(transparency, int) and mode != "F":
            alpha = (np.asarray(im) != transparency).astype(np.float32)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2)), alpha, icc
    if mode == "CMYK":
        rgb_im, icc = _cmyk_to_rgb(label, im)
        return np.array(rgb_im, dtype=np.uint8), None, icc
    has_alpha = mode in ALPHA_MODES or transparency is not None
    try:
        converted = im.convert("RGBA" if has_alpha else "RGB")
    except (ValueError, OSError) as e:
        raise InputImageError(f"{label}: colour mode {mode!r} is not supported ({one_line(e)}); convert it to RGB first") from None
    arr = np.array(converted, dtype=np.uint8)
    if not has_alpha:
        return arr, None, icc
    return np.ascontiguousarray(arr[..., :3]), arr[..., 3].astype(np.float32) / 255.0, icc


def _frames(im: Image.Image) -> int:
    try:
        n = int(getattr(im, "n_frames", 1))
    except Exception:  # noqa: BLE001 - counting frames of a damaged animation must not fail the first frame
        n = 2 if getattr(im, "is_animated", False) else 1
    try:
        im.seek(0)
    except Exception:  # noqa: BLE001
        pass
    return max(n, 1)


def _upright(label: str, im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - malformed EXIF must not lose an otherwise good image
        log.warning("%s: EXIF orientation unreadable (%s); using the image as stored", label, one_line(e))
        return im


def _open_header(buf: io.BytesIO, label: str, max_pixels: int, min_side: int) -> Image.Image:
    """Open (header only) and check the declared size: a decompression bomb never allocates."""
    try:
        im = Image.open(buf)
    except Image.DecompressionBombError as e:
        declared = re.search(r"\((\d+) pixels\)", str(e))
        if declared and int(declared.group(1)) > max_pixels:
            raise ImageTooLargeError(
                f"{label}: {_megapixels(int(declared.group(1)))} is above the {_megapixels(max_pixels)} limit "
                f"(decompression-bomb guard); downscale the image or raise the limit (--max-pixels / max_pixels=)"
            ) from None
        raise ImageTooLargeError(
            f"{label}: too many pixels for Pillow's decompression-bomb limit ({one_line(e)}); "
            f"downscale the image (or raise PIL.Image.MAX_IMAGE_PIXELS as well as max_pixels)"
        ) from None
    except UnidentifiedImageError:
        head = buf.getvalue()[:12]
        known = next((fmt for magic, fmt in SIGNATURES if head.startswith(magic)), None)
        if known is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            known = "WEBP"
        if known is not None:
            raise InputImageError(
                f"{label}: corrupt or truncated {known} image (its header cannot be parsed); re-export or re-download it"
            ) from None
        raise InputImageError(
            f"{label}: not an image Pillow can read (starts with {head[:8]!r}); give a PNG, JPEG, WebP, TIFF, BMP or GIF file"
        ) from None
    except Exception as e:  # noqa: BLE001 - any header parse failure means a damaged file
        raise _corrupt(label, None, e) from None
    try:
        size = im.size
    except Exception as e:  # noqa: BLE001
        raise _corrupt(label, im.format, e) from None
    _check_size(label, size, max_pixels, min_side)
    return im


def _decode(buf: io.BytesIO, label: str, max_pixels: int, min_side: int) -> tuple[Image.Image, str | None, int]:
    """Open (header only), check the size, then decode the first frame."""
    im = _open_header(buf, label, max_pixels, min_side)
    fmt = im.format
    size = im.size
    frames = _frames(im)
    try:
        im.load()
    except MemoryError:
        raise InputImageError(f"{label}: {size[0]}x{size[1]} does not fit in memory; downscale it or lower --max-pixels") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types on malformed data
        raise _corrupt(label, fmt, e) from None
    if im.size != size:  # a few formats (ICO, ICNS, JPEG draft) settle their size on load
        _check_size(label, im.size, max_pixels, min_side)
    if frames > 1:
        log.warning("%s: %d frames (animated or multi-page); using the first", label, frames)
    return im, fmt, frames


def probe_image(src: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS, *, min_side: int = MIN_SIDE, name: str | None = None) -> ImageInfo:
    """The checks of :func:`read_image` that need only the header (readable, an image, within the size limits).

    A batch probes every input before loading a model, so a missing or unreadable photo is
    reported at once; damage inside the pixel data still shows only when it is decoded.
    """
    cap = _max_pixels(max_pixels)
    buf, label, _ = _open_bytes(src, name)
    with _pillow_warnings(label):
        im = _open_header(buf, label, cap, min_side)
        has_alpha = im.mode in ALPHA_MODES or "transparency" in im.info
        return ImageInfo(size=im.size, format=im.format, mode=im.mode, has_alpha=has_alpha)


@contextlib.contextmanager
def _pillow_warnings(label: str) -> Iterator[None]:
    """Pillow warns (corrupt EXIF, bomb thresholds...) through `warnings`; route them to our log instead.

    The DecompressionBombWarning is dropped: our own pixel cap, checked first, is the one that applies.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if not issubclass(w.category, Image.DecompressionBombWarning):
            log.debug("%s: %s", label, one_line(w.message))


def _max_pixels(max_pixels: int | None) -> int:
    if max_pixels is None:
        return DEFAULT_MAX_PIXELS
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise UsageError(f"max_pixels={max_pixels!r}: give a positive pixel count (default {DEFAULT_MAX_PIXELS})")
    return max_pixels


def _finish(label: str, im: Image.Image, path: Path | None, fmt: str | None, frames: int) -> LoadedImage:
    mode = im.mode
    im = _upright(label, im)
    try:
        rgb, alpha, icc = _to_rgb_alpha(label, im)
    except InputImageError:
        raise
    except MemoryError:
        raise InputImageError(f"{label}: {im.size[0]}x{im.size[1]} does not fit in memory; downscale it or lower --max-pixels") from None
    except Exception as e:  # noqa: BLE001 - lazy decoders may fail only at conversion
        raise _corrupt(label, fmt, e) from None
    exif = im.info.get("exif")
    return LoadedImage(
        rgb=rgb,
        alpha=alpha,
        path=path,
        format=fmt,
        mode=mode,
        frames=frames,
        icc=icc if isinstance(icc, bytes) else None,
        exif=exif if isinstance(exif, bytes) else None,
    )


def read_image(
    src: ImageSource,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    *,
    min_side: int = MIN_SIDE,
    name: str | None = None,
) -> LoadedImage:
    """Decode a file or encoded bytes into upright 8-bit RGB (+ alpha); any failure is an `InputImageError`.

    ``max_pixels=None`` means the default cap; ``name`` labels bytes input in messages.
    """
    cap = _max_pixels(max_pixels)
    buf, label, path = _open_bytes(src, name)
    with _pillow_warnings(label):
        im, fmt, frames = _decode(buf, label, cap, min_side)
        return _finish(label, im, path, fmt, frames)


def from_pil(image: Image.Image, max_pixels: int | None = DEFAULT_MAX_PIXELS, *, min_side: int = MIN_SIDE, name: str = "<PIL image>") -> LoadedImage:
    """The same conversions and checks as `read_image`, for an image the caller already opened."""
    label = name
    _check_size(label, image.size, _max_pixels(max_pixels), min_side)
    with _pillow_warnings(label):
        try:
            image.load()
        except Exception as e:  # noqa: BLE001
            raise _corrupt(label, image.format, e) from None
        return _finish(label, image, None, image.format, _frames(image))
