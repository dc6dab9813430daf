"""Peak memory is each process's own (issue 15): a small child of a large parent reports its small peak."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from trt_bgswap.benchmarking.peak_memory import StagePeaks, own_peak_bytes, run_measuring_peak

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or own_peak_bytes() is None, reason="reads /proc/<pid>/status")

MIB = 2**20
PARENT = 256 * MIB  # the parent's resident block: far above any small Python child (~10-40 MiB)


def _resident(nbytes: int) -> np.ndarray:
    block = np.ones(nbytes, dtype=np.uint8)  # np.ones writes every page: resident, not just reserved
    assert own_peak_bytes() >= nbytes - 8 * MIB  # batched RSS counters lag by a few pages per thread
    return block


def test_a_child_of_a_large_parent_reports_its_own_small_peak() -> None:
    block = _resident(PARENT)
    child = run_measuring_peak([sys.executable, "-c", "import time; time.sleep(0.5)"])
    assert child.returncode == 0 and child.samples > 0
    # the old measurement (wait4's ru_maxrss) inherits the parent's high-water mark; this test fails if it were used
    assert child.peak_rss_upper >= PARENT
    assert child.peak_rss is not None and child.peak_rss < 64 * MIB, f"child reported {child.peak_rss / MIB:.0f} MiB"
    del block


def test_a_child_that_grows_reports_its_growth() -> None:
    code = "import numpy as np, time; a = np.ones(96 * 2**20, np.uint8); time.sleep(0.3); del a; time.sleep(0.2)"
    child = run_measuring_peak([sys.executable, "-c", code])
    assert child.returncode == 0
    assert child.peak_rss is not None and child.peak_rss >= 96 * MIB  # the freed block still counts: a high-water mark


def test_stage_peaks_are_each_stages_own_and_the_process_peak_survives_the_resets() -> None:
    peaks = StagePeaks()
    if not peaks.can_reset:
        pytest.skip("this kernel refuses /proc/self/clear_refs")
    with peaks.stage("big"):
        block = _resident(160 * MIB)
        del block
    with peaks.stage("small"):
        small = _resident(8 * MIB)
        del small
    # the kernel's RSS counters are batched per thread (up to 64 pages each, mm/rss accounting), so allow a few MiB
    assert peaks.rises["big"] >= 150 * MIB
    assert peaks.rises["small"] < 64 * MIB  # the big stage's freed block is not charged to the next stage
    assert peaks.peaks["big"] - peaks.peaks["small"] >= 96 * MIB
    assert peaks.peak() >= peaks.peaks["big"]
