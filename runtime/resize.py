"""Torch-exact image resizing in numpy: bilinear and nearest, without torch.

RMBG-1.4's reference pre/post-processing (``utilities.py`` in briaai/RMBG-1.4) resizes
with ``torch.nn.functional.interpolate(mode="bilinear")`` and diffusers downsizes the
inpainting mask with the default ``mode="nearest"``; the lean runtime must reproduce
both without importing torch. These follow PyTorch's CPU kernels
(``aten/src/ATen/native/UpSample.h`` and ``cpu/UpSampleKernel.cpp``):

- bilinear, ``align_corners=False``, ``antialias=False``: ``scale = in / out`` in float32,
  ``src = max(scale * (dst + 0.5) - 0.5, 0)``, ``i0 = min(floor(src), in - 1)``,
  ``i1 = i0 + (i0 < in - 1)``, ``w1 = src - i0``, ``w0 = 1 - w1``; the width is
  interpolated first, then the height (torch's evaluation order), in float32.
  Downscaling samples 2x2 neighbours only (no antialias), as torch does.
- nearest: ``src = min(floor(dst * scale), in - 1)`` with float32 ``scale = in / out``
  (torch's legacy ``nearest``, not ``nearest-exact``).

Layout convention: both functions resize the **last two axes**, as torch does, so
``HxW``, ``CxHxW`` and ``NxCxHxW`` arrays work unchanged; an ``HxWxC`` image must be
moved to channels-first first (``img.transpose(2, 0, 1)``; a view is fine).
Each function is separable: one gather + lerp per axis, vectorised over everything else.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from trt_bgswap.errors import UsageError


def _check(x: np.ndarray, size: Sequence[int]) -> tuple[int, int]:
    if x.ndim < 2:
        raise UsageError(f"resize: array of shape {x.shape} has no (H, W) axes; give at least a 2-D array")
    if len(size) != 2:
        raise UsageError(f"resize: size={tuple(size)} must be (height, width)")
    out_h, out_w = int(size[0]), int(size[1])
    if out_h <= 0 or out_w <= 0:
        raise UsageError(f"resize: size={tuple(size)} must be positive")
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise UsageError(f"resize: input of shape {x.shape} is empty")
    return out_h, out_w


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and float32 weights of torch's bilinear kernel along one axis."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
    w0 = np.float32(1.0) - w1
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, w0.astype(np.float32), w1.astype(np.float32)


def resize_bilinear(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize the last two axes to ``size=(h, w)`` exactly as torch's bilinear ``interpolate``.

    Any real dtype in (uint8 images too); float32 out. Matches
    ``F.interpolate(t, size, mode="bilinear", align_corners=False)`` to float32 rounding.
    Only the source rows the height pass reads are converted and interpolated, so
    downscaling a 12 MP uint8 photo never materialises a float copy of it.
    """
    out_h, out_w = _check(x, size)
    x = np.asarray(x)
    in_h, in_w = x.shape[-2], x.shape[-1]
    y = x
    rows = None
    if out_h != in_h:
        r0, r1, rw0, rw1 = _linear_taps(in_h, out_h)
        needed = np.unique(np.concatenate([r0, r1]))
        if needed.size < in_h:
            y = y[..., needed, :]
            r0, r1 = np.searchsorted(needed, r0), np.searchsorted(needed, r1)
        rows = (r0, r1, rw0[:, None], rw1[:, None])
    if out_w != in_w:  # width first, as torch's kernel nests its loops
        c0, c1, cw0, cw1 = _linear_taps(in_w, out_w)
        a = np.asarray(y[..., c0], dtype=np.float32)
        a *= cw0
        b = np.asarray(y[..., c1], dtype=np.float32)
        b *= cw1
        a += b
        y = a
    if rows is not None:
        r0, r1, rw0, rw1 = rows
        a = np.asarray(y[..., r0, :], dtype=np.float32)
        a *= rw0
        b = np.asarray(y[..., r1, :], dtype=np.float32)
        b *= rw1
        a += b
        y = a
    if y is x:  # same size: a float32 copy, never the caller's array
        y = x.astype(np.float32, copy=True)
    return np.ascontiguousarray(y, dtype=np.float32)


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    if in_size == out_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:  # torch's shortcut (same result, kept for exactness)
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def resize_nearest(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize the last two axes to ``size=(h, w)`` as torch's default ``mode="nearest"``; dtype kept."""
    out_h, out_w = _check(x, size)
    x = np.asarray(x)
    rows = _nearest_index(x.shape[-2], out_h)
    cols = _nearest_index(x.shape[-1], out_w)
    return np.ascontiguousarray(x[..., rows[:, None], cols[None, :]])


def sample_bilinear(x: np.ndarray, size: Sequence[int], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``resize_bilinear(x, size)[..., rows, cols]`` without making the whole resized array.

    For a sparse set of pixels (an edge band) of a large upsampling; same taps and float32
    operations in the same order as :func:`resize_bilinear`, so the values are identical.
    """
    out_h, out_w = _check(x, size)
    x = np.asarray(x)
    r0, r1, rw0, rw1 = (t[rows] for t in _linear_taps(x.shape[-2], out_h))
    c0, c1, cw0, cw1 = (t[cols] for t in _linear_taps(x.shape[-1], out_w))

    def row(r: np.ndarray) -> np.ndarray:
        a = x[..., r, c0].astype(np.float32) * cw0
        return a + x[..., r, c1].astype(np.float32) * cw1

    return row(r0) * rw0 + row(r1) * rw1
