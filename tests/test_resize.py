"""runtime/resize.py against torch.nn.functional.interpolate, the reference it reimplements."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from tolerance import assert_within, bilinear_bound

from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.resize import resize_bilinear, resize_nearest

# (input h, w) -> (output h, w): up, down, mixed, identity, odd ratios, 1-pixel edges, 2x exact.
SIZES = [
    ((8, 8), (16, 16)),
    ((16, 16), (8, 8)),
    ((7, 13), (23, 5)),
    ((10, 10), (10, 10)),
    ((1, 1), (5, 7)),
    ((5, 7), (1, 1)),
    ((3, 200), (17, 3)),
    ((33, 47), (66, 94)),
    ((100, 37), (41, 301)),
    ((300, 451), (256, 256)),
    ((256, 256), (400, 600)),
    ((1024, 1024), (513, 767)),
    ((13, 1), (26, 9)),
]


def _torch(x: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x))
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(t, size=size, mode=mode, **kwargs).numpy()


@pytest.mark.numerics
@pytest.mark.parametrize(("src", "dst"), SIZES)
def test_bilinear_matches_torch(src: tuple[int, int], dst: tuple[int, int]) -> None:
    rng = np.random.default_rng(src[0] * 1000 + dst[1])
    x = rng.random((2, 3, *src), dtype=np.float32)
    ours = resize_bilinear(x, dst)
    ref = _torch(x, dst, "bilinear")
    assert ours.shape == ref.shape and ours.dtype == np.float32
    err = float(np.abs(ours - ref).max())
    # same grid and weights formula; PyTorch's vectorised kernels may fuse the coordinate arithmetic (FMA)
    assert_within(err, bilinear_bound(x, src), f"bilinear {src}->{dst} vs torch")


@pytest.mark.numerics
@pytest.mark.parametrize(("src", "dst"), SIZES)
def test_nearest_matches_torch_exactly(src: tuple[int, int], dst: tuple[int, int]) -> None:
    rng = np.random.default_rng(src[1] * 1000 + dst[0])
    x = rng.random((1, 2, *src), dtype=np.float32)
    ours = resize_nearest(x, dst)
    ref = _torch(x, dst, "nearest")
    assert ours.shape == ref.shape
    mismatches = int((ours != ref).sum())
    # exact: the index is floor(dst * scale) of one correctly rounded float32 product on both sides
    assert mismatches == 0, f"nearest {src}->{dst}: {mismatches} pixels differ from torch"


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
@pytest.mark.parametrize("size", [(1024, 1024), (200, 173)])
def test_bilinear_on_photos_in_pixel_units(name: str, size: tuple[int, int]) -> None:
    """The masker resizes 0..255 values from an HxWx3 view: same numbers as torch on the CHW copy."""
    rgb = getattr(data, name)()
    chw = rgb.transpose(2, 0, 1)  # a strided view, as the masker passes it
    ours = resize_bilinear(chw, size)
    ref = _torch(chw[None].astype(np.float32), size, "bilinear")[0]
    err = float(np.abs(ours - ref).max())
    assert_within(err, bilinear_bound(chw, chw.shape[-2:]), f"{name} -> {size} (0..255 units) vs torch")


@pytest.mark.parametrize("shape", [(9, 11), (3, 9, 11), (2, 3, 9, 11)])
def test_ranks_share_the_last_two_axes(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    out = resize_bilinear(x, (5, 20))
    ref = _torch(x.reshape(1, -1, 9, 11), (5, 20), "bilinear").reshape(*shape[:-2], 5, 20)
    assert out.shape == (*shape[:-2], 5, 20)
    err = float(np.abs(out - ref).max())
    assert_within(err, bilinear_bound(x, (9, 11)), f"rank {len(shape)} vs torch")
    assert resize_nearest(x, (5, 20)).shape == out.shape


def test_nearest_keeps_dtype_and_bilinear_copies() -> None:
    m = (np.arange(35, dtype=np.uint8).reshape(5, 7) * 7).astype(np.uint8)
    assert resize_nearest(m, (10, 3)).dtype == np.uint8
    x = np.ones((4, 4), np.float32)
    y = resize_bilinear(x, (4, 4))
    y[0, 0] = 5.0
    assert x[0, 0] == 1.0, "resize_bilinear returned the input array itself"


@pytest.mark.parametrize(
    ("shape", "size"),
    [((5,), (2, 2)), ((4, 4), (0, 3)), ((4, 4), (3,)), ((0, 4), (2, 2))],
)
def test_bad_arguments_raise(shape: tuple[int, ...], size: tuple[int, ...]) -> None:
    with pytest.raises(UsageError):
        resize_bilinear(np.zeros(shape, np.float32), size)
    with pytest.raises(UsageError):
        resize_nearest(np.zeros(shape, np.float32), size)
