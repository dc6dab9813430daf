"""--bg-color parsing: hex forms and CSS names, checked against Pillow's ImageColor; bad values name the fix."""

from __future__ import annotations

import pytest
from PIL import ImageColor

from trt_bgswap.colors import parse_color
from trt_bgswap.errors import UsageError

GOOD = ["#ffffff", "#000000", "#1A2b3C", "#abc", "#F0A", "white", "Black", "rebeccapurple", "  #102030  ", "skyblue"]


@pytest.mark.parametrize("text", GOOD)
def test_matches_pillow(text: str) -> None:
    want = ImageColor.getrgb(text.strip())
    assert parse_color(text) == want, f"{text!r}: ours {parse_color(text)} vs Pillow {want}"


@pytest.mark.parametrize("name", sorted(ImageColor.colormap)[::7])
def test_every_css_name_sampled(name: str) -> None:
    assert parse_color(name) == ImageColor.getrgb(name)


BAD = [
    ("ffffff", "did you mean '#ffffff'"),
    ("abc", "did you mean '#abc'"),
    ("#ff", "is not a colour"),
    ("#gggggg", "is not a colour"),
    ("#ffffff80", "is not a colour"),  # alpha is meaningless for a solid background
    ("rgb(1,2,3)", "is not a colour"),
    ("notacolour", "is not a colour"),
    ("", "is not a colour"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_strings(text: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_color(text)
    assert message in str(info.value)
    assert "#RRGGBB" in str(info.value) or "did you mean" in str(info.value)


@pytest.mark.parametrize("value,ok", [((1, 2, 3), True), ((0, 0, 256), False), ((1, 2), False), ((1.0, 2, 3), False), ((True, 0, 0), False)])
def test_tuples(value: tuple, ok: bool) -> None:
    if ok:
        assert parse_color(value) == value
    else:
        with pytest.raises(UsageError, match="three integers 0..255"):
            parse_color(value)
