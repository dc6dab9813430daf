"""A real wide-gamut ICC profile for tests: Display P3 primaries, written as an ICC v2 matrix/TRC profile.

Pillow's ImageCms can only *create* sRGB, Lab and XYZ profiles, and the test machines carry no
ICC files, so the profile is assembled here from the ICC.1:2001-04 (v2) layout: a 128-byte
header, a tag table, and XYZType / curveType / textDescriptionType / textType tags. The
colorants are Display P3's primaries chromatically adapted to the D50 PCS (Bradford), as
Apple's "Display P3" profile carries them; the tone curve is a pure gamma 2.2 (a simplification
of P3's sRGB-like curve: still a different colour space from sRGB, which is all tests need).
LittleCMS (via ImageCms) reads it like any camera's profile.
"""

from __future__ import annotations

import struct

D50 = (0.9642, 1.0, 0.8249)
P3_D50 = {"r": (0.51512, 0.24120, -0.00105), "g": (0.29198, 0.69225, 0.04189), "b": (0.15710, 0.06657, 0.78407)}


def _s15f16(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz(v: tuple[float, float, float]) -> bytes:
    return b"XYZ " + b"\0" * 4 + b"".join(_s15f16(c) for c in v)


def _curve(gamma: float) -> bytes:
    return b"curv" + b"\0" * 4 + struct.pack(">I", 1) + struct.pack(">H", round(gamma * 256)) + b"\0\0"


def _desc(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    return b"desc" + b"\0" * 4 + struct.pack(">I", len(ascii_)) + ascii_ + b"\0" * 8 + b"\0" * 3 + b"\0" * 67


def _text(text: str) -> bytes:
    return b"text" + b"\0" * 4 + text.encode("ascii") + b"\0"


def display_p3_profile(name: str = "Display P3 (test, gamma 2.2)") -> bytes:
    """The bytes of an ICC v2 RGB display profile with Display P3 primaries."""
    tags = [
        (b"desc", _desc(name)),
        (b"cprt", _text("public domain test profile")),
        (b"wtpt", _xyz(D50)),
        (b"rXYZ", _xyz(P3_D50["r"])),
        (b"gXYZ", _xyz(P3_D50["g"])),
        (b"bXYZ", _xyz(P3_D50["b"])),
        (b"rTRC", _curve(2.2)),
        (b"gTRC", _curve(2.2)),
        (b"bTRC", _curve(2.2)),
    ]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    table, body = [struct.pack(">I", len(tags))], b""
    for sig, data in tags:
        pad = (-len(data)) % 4
        table.append(sig + struct.pack(">II", offset + len(body), len(data)))
        body += data + b"\0" * pad
    size = 128 + table_size + len(body)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + b"mntr" + b"RGB " + b"XYZ "
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp" + b"APPL"
        + b"\0" * 4 + b"\0" * 4 + b"\0" * 4 + b"\0" * 8
        + struct.pack(">I", 0)
        + b"".join(_s15f16(c) for c in D50)
        + b"lcms"
        + b"\0" * 16 + b"\0" * 28
    )
    assert len(header) == 128, len(header)
    return header + b"".join(table) + body
