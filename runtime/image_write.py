"""Writing images: the format from the extension (PNG, JPEG, WebP), metadata carried over, never a partial file.

Writes go through `trt_bgswap.atomic` (temp file + rename, so no partial file is ever left)
and refuse to overwrite an input or, unless asked, an existing output. Reading is
:mod:`~trt_bgswap.runtime.image_read`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from trt_bgswap.atomic import atomic_path
from trt_bgswap.errors import OutputError, OutputExistsError, UsageError
from trt_bgswap.runtime.image_read import one_line

log = logging.getLogger(__name__)

OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
ALPHA_SUFFIXES = frozenset({".png", ".webp"})  # output formats that keep an alpha channel (cut-outs)

# WebP's format limit (the VP8/VP8L header has 14-bit dimensions).
WEBP_MAX_SIDE = 16383
JPEG_MAX_SIDE = 65535
# Files of 90+% JPEG quality keep full chroma resolution (4:4:4): composites have sharp colour edges.
FULL_CHROMA_QUALITY = 90
# EXIF tags an output must not carry over: the orientation (already applied to the pixels) and, unless
# asked, the GPS position (a privacy leak when results are shared).
EXIF_ORIENTATION = 0x0112
EXIF_GPS_IFD = 0x8825


def _check_array(arr: np.ndarray, label: str) -> str:
    """The Pillow mode for a uint8 HxW / HxWx1 / HxWx3 / HxWx4 array."""
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
        dtype = getattr(arr, "dtype", type(arr).__name__)
        raise UsageError(f"{label}: image data has dtype {dtype}; give a uint8 array (HxW, HxWx3 or HxWx4)")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1):
        return "L"
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return "RGB" if arr.shape[2] == 3 else "RGBA"
    raise UsageError(f"{label}: image data has shape {arr.shape}; give HxW, HxWx3 or HxWx4")


def to_pil(arr: np.ndarray) -> Image.Image:
    """uint8 HxW / HxWx3 / HxWx4 -> an L / RGB / RGBA PIL image."""
    mode = _check_array(arr, "to_pil")
    return Image.fromarray(np.ascontiguousarray(arr.reshape(arr.shape[:2]) if mode == "L" else arr), mode)


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def output_exif(exif: bytes | None, keep_gps: bool = False) -> bytes | None:
    """The input's EXIF for an output: camera, date and the rest kept; orientation dropped (the pixels are
    upright), GPS dropped unless asked. Unreadable EXIF is dropped with a log line, never an error."""
    if not exif:
        return None
    try:
        data = Image.Exif()
        data.load(exif)
        data.pop(EXIF_ORIENTATION, None)
        if not keep_gps:
            data.pop(EXIF_GPS_IFD, None)
        return data.tobytes() if len(data) else None
    except Exception as e:  # noqa: BLE001 - metadata must never cost the image
        log.warning("EXIF metadata unreadable (%s); the output is written without it", one_line(e))
        return None


def save_options(fmt: str, quality: int, icc: bytes | None = None, exif: bytes | None = None) -> dict[str, object]:
    """Pillow ``save`` options for a format name ("PNG", "JPEG", "WEBP"): quality, full chroma at 90+, metadata."""
    options: dict[str, object] = {}
    if fmt in ("JPEG", "WEBP"):
        options["quality"] = quality
    if fmt == "JPEG" and quality >= FULL_CHROMA_QUALITY:
        options["subsampling"] = 0
    if icc:
        options["icc_profile"] = icc
    if exif:
        options["exif"] = exif
    return options


def write_image(
    path: str | os.PathLike,
    image: np.ndarray,
    quality: int = 95,
    overwrite: bool = False,
    protected: Iterable[str | os.PathLike] = (),
    icc: bytes | None = None,
    exif: bytes | None = None,
) -> Path:
    """Encode by extension and write atomically; refuses inputs (``protected``) and, unless asked, existing files.

    RGBA to JPEG is refused rather than silently flattened: JPEG has no alpha, and
    choosing a matte colour for the caller would hide a mistake. Raises
    `OutputExistsError` (a batch skips the image) or `OutputError`.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    fmt = OUTPUT_FORMATS.get(suffix)
    if fmt is None:
        raise UsageError(f"{target}: unsupported output extension {suffix or '(none)'!r}; use .png, .jpg, .jpeg or .webp")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise UsageError(f"quality={quality!r}: give an integer from 1 to 100")
    mode = _check_array(image, str(target))
    h, w = image.shape[:2]
    if h < 1 or w < 1:
        raise UsageError(f"{target}: image data is empty ({w}x{h})")
    if fmt == "JPEG" and mode == "RGBA":
        raise UsageError(f"{target}: JPEG has no alpha channel; write .png or .webp to keep transparency, or pass RGB")
    limit = WEBP_MAX_SIDE if fmt == "WEBP" else JPEG_MAX_SIDE if fmt == "JPEG" else None
    if limit is not None and max(w, h) > limit:
        raise UsageError(f"{target}: {w}x{h} exceeds the {fmt} limit of {limit} px a side; write .png instead")
    for src in protected:
        if _same_file(target, Path(src)):
            raise OutputError(f"{target}: is an input file ({src}); inputs are never overwritten, choose another output path")
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; give an output file name ending in {suffix}")
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target}: already exists; pass --overwrite (overwrite=True) to replace it")
    options = save_options(fmt, quality, icc, exif)
    pil = to_pil(image)
    try:
        with atomic_path(target) as tmp:
            pil.save(tmp, format=fmt, **options)
    except PermissionError:
        raise OutputError(f"{target}: the folder {target.parent} is not writable; fix its permissions or choose another output folder") from None
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{target}: {target.parent} is not a folder; choose another output path") from None
    except OSError as e:
        raise OutputError(f"{target}: cannot write ({one_line(e.strerror or e)}); check free space and the output folder") from None
    return target
