"""Each process's own peak memory, whole and per stage (Linux ``/proc``; ``proc(5)``).

Why not ``getrusage``: on Linux a child's ``ru_maxrss`` (and ``RUSAGE_CHILDREN``, and
``wait4``'s rusage) starts from its parent's high-water mark at fork and keeps it across
``exec`` (the kernel folds the old address space's ``hiwater_rss`` into ``signal->maxrss``
in ``exec_mmap``): a 14 MB child of a 3 GB Python parent reports 3 GB. So a benchmark run
from a large parent reported the parent's peak for every side (issue 15).

What is measured instead:

- in-process: ``VmHWM`` of ``/proc/self/status``, the peak of this address space only;
- per stage: ``VmHWM`` after resetting it with ``echo 5 > /proc/self/clear_refs`` (Linux 4.0+)
  at the stage's start, so it is the process's peak *while that stage ran*; the whole
  process's peak is kept across resets by folding every reading into a running maximum;
- another process (a cold ``run``): ``VmHWM`` of ``/proc/<pid>/status`` sampled from
  outside until it exits. ``VmHWM`` is itself a high-water mark, so a sample taken any time
  after the peak reads it exactly; only a peak reached in the last sampling interval before
  exit can be missed. ``wait4``'s figure is kept beside it as the upper bound it is.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SAMPLE_INTERVAL_S = 0.005  # reading /proc/<pid>/status takes ~20 us: sampling costs the measured process nothing visible


def _status_kib(pid: int | str, key: str) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def own_peak_bytes(pid: int | str = "self") -> int | None:
    """``VmHWM``: the peak resident set of this address space (not inherited from a parent); None off Linux."""
    kib = _status_kib(pid, "VmHWM")
    return None if kib is None else kib * 1024


def resident_bytes(pid: int | str = "self") -> int | None:
    kib = _status_kib(pid, "VmRSS")
    return None if kib is None else kib * 1024


def reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (``proc(5)``, clear_refs value 5); False if the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def rusage_peak_bytes(usage: Any) -> int:
    """``ru_maxrss`` in bytes (Linux reports KiB, macOS bytes): an upper bound for a child, see the module doc."""
    return int(usage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def process_peak_bytes() -> int:
    """This process's own peak so far: ``VmHWM`` on Linux, else ``getrusage`` (exact for a process nobody forked large)."""
    own = own_peak_bytes()
    return own if own is not None else rusage_peak_bytes(resource.getrusage(resource.RUSAGE_SELF))


@dataclass
class StagePeaks:
    """The process's peak while each named stage ran, and its peak over all of them (kept across the resets).

    ``peaks[stage]``: the largest resident set seen during any call of that stage; ``rises[stage]``:
    the largest growth over the resident set at the call's start (what the stage itself adds:
    its activations, and its session when ``--low-memory`` opens it for the stage).
    """

    peaks: dict[str, int] = field(default_factory=dict)
    rises: dict[str, int] = field(default_factory=dict)
    process_peak: int = 0
    can_reset: bool = False

    def __post_init__(self) -> None:
        self._fold()  # the peak before the first reset is kept
        self.can_reset = reset_peak()

    def _fold(self) -> int:
        now = own_peak_bytes() or 0
        self.process_peak = max(self.process_peak, now)
        return now

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.can_reset:  # without the reset a stage's reading would be the process's peak so far
            yield
            return
        self._fold()
        reset_peak()
        start = resident_bytes() or 0
        try:
            yield
        finally:
            peak = self._fold()
            self.peaks[name] = max(self.peaks.get(name, 0), peak)
            self.rises[name] = max(self.rises.get(name, 0), peak - start)

    def peak(self) -> int:
        self._fold()
        return max(self.process_peak, process_peak_bytes())

    def to_json(self) -> dict[str, Any]:
        return {"peak": dict(self.peaks), "rise": dict(self.rises), "per_stage_available": self.can_reset}


@dataclass(frozen=True)
class ChildPeak:
    returncode: int
    peak_rss: int | None  # the child's own VmHWM, sampled from outside (None off Linux)
    peak_rss_upper: int  # wait4's ru_maxrss: includes the parent's high-water mark at fork
    samples: int
    wall_seconds: float


def run_measuring_peak(cmd: Sequence[str], stdout: IO[bytes] | int | None = None, interval: float = SAMPLE_INTERVAL_S) -> ChildPeak:
    """Run ``cmd`` to completion, sampling its own ``VmHWM`` until it exits."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=stdout, stderr=subprocess.STDOUT if stdout is not None else None)
    seen: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            hwm = own_peak_bytes(proc.pid)  # None once the process is a zombie (its memory is gone)
            if hwm is not None:
                seen.append(hwm)
            done.wait(interval)

    sampler = threading.Thread(target=sample, name="peak-sampler", daemon=True)
    sampler.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildPeak(proc.returncode, max(seen) if seen else None, rusage_peak_bytes(usage), len(seen), time.perf_counter() - start)
