"""Image files for the image_read / image_write tests: photos, encoders, hand-written PNGs, an unprivileged runner."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera"]


def photo(name: str, step: int = 2) -> np.ndarray:
    return np.ascontiguousarray(getattr(data, name)()[::step, ::step])


def encode(im: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, pixels: bytes | None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour PNGs); pixels are big-endian rows, filter 0."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    if pixels is None:
        idat = zlib.compress(b"")
    else:
        row = len(pixels) // height
        idat = zlib.compress(b"".join(b"\x00" + pixels[i * row : (i + 1) * row] for i in range(height)))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


_DROP_DAC = textwrap.dedent(
    """
    import ctypes, json, os, sys
    if os.geteuid() == 0:  # root reads anything: drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH for this process
        libc = ctypes.CDLL(None, use_errno=True)
        class Hdr(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        class Caps(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
        hdr, caps = Hdr(0x20080522, 0), (Caps * 2)()
        if libc.capget(ctypes.byref(hdr), caps) != 0:
            print(json.dumps({"skip": "capget failed"})); sys.exit(0)
        mask = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF
        caps[0].effective &= mask; caps[0].permitted &= mask
        if libc.capset(ctypes.byref(hdr), caps) != 0:
            print(json.dumps({"skip": "capset failed"})); sys.exit(0)
    """
)


def run_unprivileged(body: str) -> dict:
    """Run ``body`` (which sets ``result``) where file permissions apply even to root; returns its JSON."""
    code = _DROP_DAC + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(f"cannot drop root's file-permission override here: {out['skip']}")
    return out
