"""The generation-size policy (runtime/sizing.py)."""

from __future__ import annotations

import pytest

from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.sizing import check_generation_size, generation_size


@pytest.mark.parametrize(
    "w, h, expected",
    [
        (512, 512, (512, 512)),
        (4000, 3000, (576, 448)),  # 4:3 photo: about 512^2 pixels, multiples of 64
        (3000, 4000, (448, 576)),
        (1920, 1080, (704, 384)),
        (100, 10000, (256, 1024)),  # extreme aspect clamped to 1:4
    ],
)
def test_generation_size_policy(w: int, h: int, expected: tuple[int, int]) -> None:
    gw, gh = generation_size(w, h, default_size=512, multiple=64)
    assert (gw, gh) == expected
    assert gw % 64 == 0 and gh % 64 == 0
    assert 0.7 < gw * gh / 512**2 < 1.3


def test_check_generation_size_rejects_bad_sizes() -> None:
    check_generation_size(576, 448, 64)
    with pytest.raises(UsageError, match="multiples of 64"):
        check_generation_size(500, 448, 64)
    with pytest.raises(UsageError, match="between"):
        check_generation_size(4096, 448, 64)
