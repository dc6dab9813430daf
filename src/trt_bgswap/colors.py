"""Colour values for ``--bg-color``: ``#RRGGBB``, ``#RGB`` or a CSS colour name.

Names are the CSS Color Module Level 4 named colours (the table Pillow ships in
``PIL.ImageColor.colormap``). Anything else is refused with the accepted forms,
rather than guessed at.
"""

from __future__ import annotations

import numbers
import re

from PIL import ImageColor

from trt_bgswap.errors import UsageError

RGB = tuple[int, int, int]

_HEX6 = re.compile(r"#([0-9a-fA-F]{6})")
_HEX3 = re.compile(r"#([0-9a-fA-F]{3})")
_BARE_HEX = re.compile(r"[0-9a-fA-F]{3}|[0-9a-fA-F]{6}")
_FORMS = "'#RRGGBB', '#RGB' or a CSS colour name such as 'white'"


def _named(name: str) -> RGB | None:
    spec = ImageColor.colormap.get(name.lower())
    if spec is None:
        return None
    if isinstance(spec, tuple):  # Pillow caches parsed names as tuples
        return (int(spec[0]), int(spec[1]), int(spec[2]))
    return parse_color(spec)


def parse_color(value: str | tuple[int, int, int]) -> RGB:
    """An (r, g, b) tuple of 0..255 ints; a tuple is validated and returned as ints."""
    if isinstance(value, tuple):
        if len(value) != 3 or not all(
            isinstance(c, numbers.Integral) and not isinstance(c, bool) and 0 <= c <= 255 for c in value
        ):
            raise UsageError(f"colour {value!r}: give three integers 0..255 (r, g, b), or {_FORMS}")
        return (int(value[0]), int(value[1]), int(value[2]))
    if not isinstance(value, str):
        raise UsageError(f"colour {value!r}: give a string ({_FORMS}) or an (r, g, b) tuple")
    text = value.strip()
    m = _HEX6.fullmatch(text)
    if m:
        h = m.group(1)
        return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))
    m = _HEX3.fullmatch(text)
    if m:
        h = m.group(1)
        return (int(h[0] * 2, 16), int(h[1] * 2, 16), int(h[2] * 2, 16))
    named = _named(text) if text else None
    if named is not None:
        return named
    if _BARE_HEX.fullmatch(text):
        raise UsageError(f"colour {value!r}: hex colours start with '#' (did you mean '#{text}'? quote it in the shell)")
    raise UsageError(f"colour {value!r} is not a colour; use {_FORMS}")
