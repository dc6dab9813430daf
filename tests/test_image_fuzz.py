"""Fuzzing read_image: random bytes and damaged real photos either decode to a valid image or raise
InputImageError, never anything else (no ValueError, struct.error, EOFError, ... escaping from a decoder).

Seeds are small crops of skimage.data photos encoded as PNG, JPEG, WebP, GIF, TIFF and BMP;
mutations flip bytes, truncate, splice one format's header onto another's body, and insert junk.
Hypothesis runs derandomized with a bounded number of examples, so CI is reproducible and fast.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data

from trt_bgswap.errors import InputImageError
from trt_bgswap.runtime.image_read import MIN_SIDE, LoadedImage, read_image

FORMATS = {
    "PNG": {},
    "JPEG": {"quality": 90},
    "WEBP": {"quality": 80},
    "GIF": {},
    "TIFF": {},
    "BMP": {},
}
# Small so that each decode takes a millisecond; a second PNG with alpha covers the RGBA paths.
_CROP = np.ascontiguousarray(data.astronaut()[100:164:2, 150:198])  # 32x48


def _encode(fmt: str, mode: str = "RGB") -> bytes:
    im = Image.fromarray(_CROP)
    if mode == "RGBA":
        im = im.convert("RGBA")
    buf = io.BytesIO()
    im.save(buf, format=fmt, **FORMATS.get(fmt, {}))
    return buf.getvalue()


SEEDS = {fmt: _encode(fmt) for fmt in FORMATS}
SEEDS["PNG-RGBA"] = _encode("PNG", "RGBA")
SEEDS["WEBP-RGBA"] = _encode("WEBP", "RGBA")
SETTINGS = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A lower cap than the default keeps a mutated header from allocating hundreds of MB per example;
# the cap check itself is one of the paths being fuzzed.
FUZZ_MAX_PIXELS = 4_000_000


def check(raw: bytes) -> None:
    try:
        got = read_image(raw, max_pixels=FUZZ_MAX_PIXELS)
    except InputImageError as e:
        message = str(e)
        assert message.startswith("<image bytes>: "), message
        assert "\n" not in message, message
        return
    assert isinstance(got, LoadedImage)
    assert got.rgb.dtype == np.uint8 and got.rgb.ndim == 3 and got.rgb.shape[2] == 3
    h, w = got.rgb.shape[:2]
    assert min(h, w) >= MIN_SIDE and h * w <= FUZZ_MAX_PIXELS
    if got.alpha is not None:
        assert got.alpha.dtype == np.float32 and got.alpha.shape == (h, w)
        assert float(got.alpha.min()) >= 0.0 and float(got.alpha.max()) <= 1.0


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_seeds_decode(fmt: str) -> None:
    """Precondition: every undamaged seed reads, so the mutations below start from valid files."""
    got = read_image(SEEDS[fmt])
    assert got.rgb.shape == _CROP.shape


def test_mutations_reach_raw_decoder_failures() -> None:
    """Precondition for the fuzz tests to mean anything: plain Pillow fails in several ways on such
    mutations (so the wrapper is exercised), and read_image maps every one of them to InputImageError."""
    rng = np.random.default_rng(0)
    raw_failures: set[str] = set()
    for fmt in sorted(SEEDS):
        for i in range(60):
            raw = bytearray(SEEDS[fmt])
            for _ in range(int(rng.integers(1, 6))):
                raw[int(rng.integers(0, len(raw)))] ^= int(rng.integers(1, 256))
            if i % 3 == 0:
                raw = raw[: int(rng.integers(0, len(raw)))]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with Image.open(io.BytesIO(bytes(raw))) as im:
                        im.load()
            except Exception as e:  # noqa: BLE001 - collecting what Pillow raises is the point
                raw_failures.add(type(e).__name__)
            check(bytes(raw))
    assert {"OSError", "UnidentifiedImageError"} <= raw_failures, raw_failures


@SETTINGS
@given(st.binary(min_size=0, max_size=4096))
def test_random_bytes(raw: bytes) -> None:
    check(raw)


@SETTINGS
@given(st.sampled_from(sorted(SEEDS)), st.binary(min_size=0, max_size=512))
def test_valid_header_random_body(fmt: str, body: bytes) -> None:
    """A real signature followed by junk: gets past format detection into the plugins' parsers."""
    seed = SEEDS[fmt]
    check(seed[: min(len(seed), 16)] + body)


@SETTINGS
@given(
    st.sampled_from(sorted(SEEDS)),
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8),
)
def test_flipped_bytes(fmt: str, flips: list[tuple[float, int]]) -> None:
    raw = bytearray(SEEDS[fmt])
    for where, xor in flips:
        raw[int(where * len(raw))] ^= xor
    check(bytes(raw))


@SETTINGS
@given(st.sampled_from(sorted(SEEDS)), st.floats(0, 1))
def test_truncated(fmt: str, keep: float) -> None:
    raw = SEEDS[fmt]
    check(raw[: int(keep * len(raw))])


@SETTINGS
@given(st.sampled_from(sorted(SEEDS)), st.sampled_from(sorted(SEEDS)), st.floats(0, 1), st.floats(0, 1))
def test_spliced_headers(head_fmt: str, body_fmt: str, cut_head: float, cut_body: float) -> None:
    """One format's header on another's body (or the same format's body at another offset)."""
    head, body = SEEDS[head_fmt], SEEDS[body_fmt]
    check(head[: int(cut_head * len(head))] + body[int(cut_body * len(body)) :])


@SETTINGS
@given(st.sampled_from(sorted(SEEDS)), st.floats(0, 1), st.binary(min_size=1, max_size=64))
def test_inserted_junk(fmt: str, where: float, junk: bytes) -> None:
    raw = SEEDS[fmt]
    at = int(where * len(raw))
    check(raw[:at] + junk + raw[at:])


@SETTINGS
@given(st.sampled_from(sorted(SEEDS)), st.integers(0, 40), st.sampled_from([b"\x00\x00", b"\xff\xff", b"\x7f\xff", b"\x00\x01"]))
def test_header_fields_overwritten(fmt: str, offset: int, value: bytes) -> None:
    """Overwrite header bytes (where widths, heights, depths and counts live) with extreme values."""
    raw = bytearray(SEEDS[fmt])
    raw[offset : offset + len(value)] = value
    check(bytes(raw))
