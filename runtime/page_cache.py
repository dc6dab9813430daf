"""Read a graph's memory-mapped weights into the OS page cache at load, front to back.

A session that runs its weights from their mapped file (``session.disable_prepacking``; the
build chooses it for graphs whose weights are in a file, ``engines/ort_build.keeps_weights_mapped``)
reads nothing when it opens: its first run faults the pages in one by one, in the order the
graph uses them, which is not the file's. With the page cache cold (after a boot, or once the OS
has reclaimed cache left idle) the full-size SD1.5 UNet's first step read its 3.5 GB that way at
about 0.2 GB/s, 15 s inside the first request; ``POSIX_FADV_WILLNEED`` and one read per 2 MiB
read the same file in 3 s, at load, where ``Stages.load`` opens the other sessions meanwhile
(benchmarks/README.md, "Weights read ahead at load"). On a warm cache the check costs 5-50 ms.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

STRIDE = 2 << 20  # one byte read per this many: each read waits for its part of the readahead, cached or not


def weights_beside(graph: Path) -> list[Path]:
    """The external weights files of a graph: ``<graph file name>[.<anything>].data`` or ``_data`` beside it.

    The build's naming (``EngineCache.companion_name(graph, key, ".data")``, e.g.
    ``model.fused.onnx.bf56db313509.data``) and ONNX's usual ``model.onnx.data`` / ``model.onnx_data``;
    a graph cut into parts (``model.fused.onnx.part0of3.onnx``) names none of its own."""
    graph = Path(graph)
    name = glob.escape(graph.name)
    found = {*graph.parent.glob(name + ".*data"), *graph.parent.glob(name + "_data")}
    return sorted(p for p in found if p.is_file())


def read_ahead(paths: Iterable[Path]) -> int:
    """Bring the whole of each of ``paths`` into the page cache and return when they are there (bytes covered)."""
    return read_ahead_ranges((p, 0, None) for p in paths)


def read_ahead_ranges(ranges: Iterable[tuple[Path, int, int | None]]) -> int:
    """Bring each ``(path, offset, length)`` into the page cache (length None: to the end); a no-op off POSIX.

    A graph cut into parts for ``--low-memory`` reads only its part's ranges of the shared weights
    file (:class:`trt_bgswap.graph_parts.GraphPart`), not the whole file at every part's open."""
    if not hasattr(os, "posix_fadvise"):  # Windows, macOS: the first run reads them as before
        return 0
    total, t0 = 0, time.perf_counter()
    for path, offset, length in ranges:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            log.debug("%s: not read ahead (%s)", path, e)
            continue
        try:
            end = os.fstat(fd).st_size if length is None else min(offset + length, os.fstat(fd).st_size)
            if end <= offset:
                continue
            os.posix_fadvise(fd, offset, end - offset, os.POSIX_FADV_WILLNEED)  # the kernel reads ahead sequentially
            for at in range(offset, end, STRIDE):
                os.pread(fd, 1, at)
            total += end - offset
        except OSError as e:  # a file system without fadvise: the mapping's faults read it later
            log.debug("%s: not read ahead (%s)", path, e)
        finally:
            os.close(fd)
    if total:
        log.debug("read ahead %.2f GB of mapped weights in %.2f s", total / 1e9, time.perf_counter() - t0)
    return total


def evict(paths: Iterable[Path]) -> int:
    """Drop ``paths`` (files) from the page cache; bytes covered, 0 off POSIX.

    The opposite of :func:`read_ahead`, for measuring a cold start (``trt-bgswap bench
    --cold-cache evicted``); ``POSIX_FADV_DONTNEED`` drops clean pages only."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    total = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        except OSError as e:
            log.debug("%s: not evicted (%s)", path, e)
        finally:
            os.close(fd)
    return total
