"""Which pages of a file are in the OS page cache (``mincore(2)``), and dropping them: for the read-ahead tests."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

from trt_bgswap.runtime import page_cache


def cached_fraction(path: Path, offset: int = 0, length: int | None = None) -> float:
    """The share of ``path``'s pages in ``[offset, offset + length)`` that are in the page cache (asking reads nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        rc = libc.mincore(ctypes.c_void_p(addr), size, vec)
        libc.munmap(ctypes.c_void_p(addr), size)
        assert rc == 0, os.strerror(ctypes.get_errno())
        end = size if length is None else offset + length
        first, last = offset // mmap.PAGESIZE, (end + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        return sum(v & 1 for v in vec[first:last]) / max(1, last - first)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache, synced first (a file just written has dirty pages, which stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    page_cache.evict([path])
