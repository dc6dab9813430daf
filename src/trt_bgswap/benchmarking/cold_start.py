"""Cold start: from launching a process to its first image on disk, for `trt-bgswap run` and the baseline script.

Each command runs in a fresh Python process; the time is the output file's modification
time minus the launch time (what a user waits for), plus the process's total wall time and
its own peak RSS (``VmHWM`` sampled from outside: the memory one real run needs; ``wait4``'s
figure would start from this benchmark's own high-water mark, see
:mod:`~trt_bgswap.benchmarking.peak_memory`).
Engines are already built (``trt-bgswap build``), as the target says. What the OS file cache
holds when a side launches is the ``cache`` condition, the same for both sides:

- ``as-found``: whatever the benchmark left (the only condition before ``--cold-cache``). The model files were read
  earlier in the run, but an OS may reclaim idle cache meanwhile (this project's CI VM drops file
  pages idle for about a minute, so a side may find its files partly gone, the other side's not);
- ``primed`` (the default): the same command ran, untimed, just before: a restart on a box that ran it lately;
- ``evicted``: the model folders and the Python installation dropped from the cache
  (``POSIX_FADV_DONTNEED``) just before: the first launch after a boot, disk speed included.

Each sample records the bytes the machine's disks read during it, so a launch that waited on the
disk shows.
Each side runs several times, interleaved with the other side (ours, baseline, ours, ...) so
a slow spell of a shared machine hits both; a side's figure is its median, every sample kept
(one sample each varied by 10 % between two runs of the same benchmark on the same VM).
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from trt_bgswap.errors import BgSwapError, UsageError
from trt_bgswap.runtime import page_cache

from trt_bgswap.benchmarking import CACHE_CONDITIONS, DEFAULT_CACHE
from trt_bgswap.benchmarking.machine import disk_read_bytes
from trt_bgswap.benchmarking.peak_memory import run_measuring_peak

log = logging.getLogger(__name__)


def evict_from_page_cache(paths: Iterable[Path]) -> int:
    """Drop every file under ``paths`` (files or folders) from the OS page cache; bytes covered (0 off POSIX)."""
    files: list[Path] = []
    for root in map(Path, paths):
        files += [root] if root.is_file() else [f for f in root.rglob("*") if f.is_file() and not f.is_symlink()]
    return page_cache.evict(files)


def python_installation() -> list[Path]:
    """What either side's interpreter reads at start-up: the environment and the base installation (stdlib)."""
    return sorted({Path(sys.prefix), Path(sys.base_prefix)})


def summarize(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One side's cold starts as one record: median times, the largest peak (memory is judged by its worst run), every sample."""
    if not samples:
        raise ValueError("no cold-start samples")
    out = dict(samples[0])
    out["to_first_image"] = statistics.median(s["to_first_image"] for s in samples)
    out["process_wall"] = statistics.median(s["process_wall"] for s in samples)
    out["peak_rss"] = max(s["peak_rss"] for s in samples)
    out["peak_rss_upper"] = max(s["peak_rss_upper"] for s in samples)
    out["samples"] = [s["to_first_image"] for s in samples]
    out["disk_read_samples"] = [s.get("disk_read_bytes") for s in samples]
    out["peak_rss_samples"] = [s["peak_rss"] for s in samples]
    return out


def interleaved(runs: Mapping[str, Callable[[], dict[str, Any]]], rounds: int, on_error: Callable[[str, BgSwapError], None]) -> dict[str, dict[str, Any]]:
    """Run every side ``rounds`` times, one round of all sides after another; a side that fails is reported once and dropped."""
    samples: dict[str, list[dict[str, Any]]] = {side: [] for side in runs}
    failed: set[str] = set()
    for _ in range(rounds):
        for side, fn in runs.items():
            if side in failed:
                continue
            try:
                samples[side].append(fn())
            except BgSwapError as e:
                failed.add(side)
                on_error(side, e)
    return {side: summarize(s) for side, s in samples.items() if s and side not in failed}


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("trt-bgswap")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "trt_bgswap.cli"]


def _launch(cmd: Sequence[str], output: Path, log_path: Path) -> tuple[float, float, Any]:
    if output.exists():
        output.unlink()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as logf:
        start = time.time()
        child = run_measuring_peak(cmd, stdout=logf)
        end = time.time()
    if child.returncode != 0 or not output.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise BgSwapError(f"cold-start command failed (exit {child.returncode}): {' '.join(cmd)}\n{tail}")
    return start, end, child


def timed_command(cmd: Sequence[str], output: Path, log_path: Path, cache: str = DEFAULT_CACHE, files: Sequence[Path] = ()) -> dict[str, Any]:
    """Run ``cmd`` (which must write ``output``) under the ``cache`` condition; seconds to the file's mtime and to exit.

    ``files``: what the command reads (its model folders, the Python installation), dropped from the
    page cache under ``evicted``."""
    if cache not in CACHE_CONDITIONS:
        raise UsageError(f"cold-start cache {cache!r}: choose one of {', '.join(CACHE_CONDITIONS)}")
    if cache == "primed":
        _launch(cmd, output, log_path)
    elif cache == "evicted":
        dropped = evict_from_page_cache(files)
        log.debug("cold start: %.2f GB dropped from the page cache", dropped / 1e9)
    read_before = disk_read_bytes()
    start, end, child = _launch(cmd, output, log_path)
    read_after = disk_read_bytes()
    written = os.stat(output).st_mtime
    return {
        "to_first_image": written - start, "process_wall": end - start, "peak_rss": child.peak_rss if child.peak_rss is not None else child.peak_rss_upper, "peak_rss_upper": child.peak_rss_upper,
        "peak_samples": child.samples, "command": list(cmd), "cache": cache,
        "disk_read_bytes": None if read_before is None or read_after is None else read_after - read_before,
    }  # fmt: skip


def cold_start_ours(
    export_dir: Path, photo: Path, out_dir: Path, prompt: str, steps: int, guidance: float, size: tuple[int, int], threads: int, provider: str,
    low_memory: bool = False, cache: str = DEFAULT_CACHE,
) -> dict[str, Any]:
    name = "cold-ours-low-memory" if low_memory else "cold-ours"
    out = out_dir / f"{name}.png"
    cmd = [
        *_cli(), "-q", "run", str(photo), "--models", str(export_dir), "--prompt", prompt, "--steps", str(steps),
        "--guidance", str(guidance), "--seed", "0", "--size", f"{size[0]}x{size[1]}", "--threads", str(threads),
        "--provider", provider, "-o", str(out), "--overwrite", *(["--low-memory"] if low_memory else []),
    ]  # fmt: skip
    return timed_command(cmd, out, out_dir / f"{name}.log", cache, [export_dir, *python_installation()])


def cold_start_baseline(
    sources: dict[str, Path], photo: Path, out_dir: Path, prompt: str, steps: int, guidance: float, size: tuple[int, int], threads: int, rmbg_size: int,
    cache: str = DEFAULT_CACHE,
) -> dict[str, Any]:
    out = out_dir / "cold-baseline.png"
    cmd = [
        sys.executable, "-m", "trt_bgswap.benchmarking.baseline", "--sd", str(sources["sd-inpainting"]),
        "--lora", str(sources["lcm-lora"]), "--rmbg", str(sources["rmbg"]), "--photo", str(photo), "--prompt", prompt,
        "--steps", str(steps), "--guidance", str(guidance), "--size", str(size[0]), str(size[1]),
        "--rmbg-size", str(rmbg_size), "--threads", str(threads), "-o", str(out),
    ]  # fmt: skip
    return timed_command(cmd, out, out_dir / "cold-baseline.log", cache, [*sources.values(), *python_installation()])
