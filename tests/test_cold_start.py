"""Cold starts are repeated and interleaved (ours, baseline, ours, ...); a side's figure is its median."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from page_residency import cached_fraction, evict
from trt_bgswap.benchmarking.cold_start import evict_from_page_cache, interleaved, summarize, timed_command
from trt_bgswap.errors import BgSwapError, UsageError


def _sample(t: float, peak: int) -> dict:
    return {"to_first_image": t, "process_wall": t + 0.5, "peak_rss": peak, "peak_rss_upper": peak + 1, "peak_samples": 3, "command": ["x"]}


def test_a_side_is_its_median_time_and_its_largest_peak() -> None:
    s = summarize([_sample(60.0, 5), _sample(54.0, 7), _sample(57.0, 6)])
    assert s["to_first_image"] == 57.0 and s["process_wall"] == 57.5
    assert s["peak_rss"] == 7 and s["peak_rss_upper"] == 8
    assert s["samples"] == [60.0, 54.0, 57.0] and s["peak_rss_samples"] == [5, 7, 6]
    assert s["disk_read_samples"] == [None, None, None]  # samples from before disk reads were recorded
    with pytest.raises(ValueError):
        summarize([])


def test_sides_alternate_and_a_failing_side_is_dropped_once() -> None:
    order: list[str] = []
    errors: list[str] = []
    times = iter([10.0, 20.0, 12.0, 22.0, 11.0, 21.0])

    def side(name: str, fail_on: int | None = None):  # noqa: ANN202
        calls = iter(range(1, 100))

        def run() -> dict:
            n = next(calls)
            order.append(f"{name}{n}")
            if n == fail_on:
                raise BgSwapError(f"{name} broke")
            return _sample(next(times), 1)

        return run

    out = interleaved({"ours": side("ours"), "baseline": side("baseline")}, 3, lambda s, e: errors.append(f"{s}: {e}"))
    assert order == ["ours1", "baseline1", "ours2", "baseline2", "ours3", "baseline3"]
    assert out["ours"]["to_first_image"] == 11.0 and out["baseline"]["to_first_image"] == 21.0 and not errors

    order.clear()
    times = iter([1.0, 2.0, 3.0, 4.0])
    out = interleaved({"ours": side("ours"), "low": side("low", fail_on=2)}, 3, lambda s, e: errors.append(f"{s}: {e}"))
    assert order == ["ours1", "low1", "ours2", "low2", "ours3"], "a failed side is not run again"
    assert set(out) == {"ours"} and errors == ["low: low broke"]


def _probe(data: Path, out: Path, count: Path) -> list[str]:
    """A command that records how much of ``data`` was cached when it started, and how often it ran."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[4]); from page_residency import cached_fraction; from pathlib import Path; "
        "f = cached_fraction(Path(sys.argv[1])); c = Path(sys.argv[3]); c.write_text(str(int(c.read_text() or 0) + 1) if c.exists() else '1'); "
        "Path(sys.argv[2]).write_text(str(f))"
    )
    return [sys.executable, "-c", code, str(data), str(out), str(count), str(Path(__file__).parent)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise and mincore(2): Linux")
def test_cache_conditions_prime_or_evict_before_the_timed_launch(tmp_path: Path) -> None:
    data = tmp_path / "weights.bin"
    data.write_bytes(np.random.default_rng(0).bytes(8 << 20))
    evict(data)
    if cached_fraction(data) > 0.1:
        pytest.skip(f"{tmp_path}'s file system keeps files cached (tmpfs?)")
    out, count = tmp_path / "out.txt", tmp_path / "count.txt"

    data.read_bytes()  # cached now
    r = timed_command(_probe(data, out, count), out, tmp_path / "log.txt", "evicted", [tmp_path])
    assert float(out.read_text()) < 0.1, "evicted: the command found its file in the cache"
    assert r["cache"] == "evicted" and count.read_text() == "1" and r["to_first_image"] > 0
    assert r["disk_read_bytes"] is not None and r["disk_read_bytes"] >= 0

    r = timed_command(_probe(data, out, count), out, tmp_path / "log.txt", "as-found", [tmp_path])
    assert float(out.read_text()) < 0.1 and count.read_text() == "2", "as-found: nothing read or dropped before it"

    data.read_bytes()
    r = timed_command(_probe(data, out, count), out, tmp_path / "log.txt", "as-found", [tmp_path])
    assert float(out.read_text()) > 0.9 and count.read_text() == "3"

    r = timed_command(_probe(data, out, count), out, tmp_path / "log.txt", "primed", [tmp_path])
    assert count.read_text() == "5", "primed: the command ran once, untimed, before the timed launch"
    assert r["cache"] == "primed"


def test_evicting_drops_every_file_under_a_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for i, name in enumerate(("a/x.bin", "a/y.bin", "z.bin")):
        (tmp_path / name).write_bytes(bytes(4096 * (i + 1)))
    (tmp_path / "link").symlink_to(tmp_path / "z.bin")  # counted once, through its target
    for name in ("a/x.bin", "a/y.bin", "z.bin"):
        fd = os.open(tmp_path / name, os.O_RDONLY)
        os.fsync(fd)  # dirty pages cannot be dropped
        os.close(fd)
    dropped = evict_from_page_cache([tmp_path, tmp_path / "missing"])
    assert dropped == (6 * 4096 if hasattr(os, "posix_fadvise") else 0)
    if sys.platform.startswith("linux") and cached_fraction(tmp_path / "z.bin") > 0:
        pytest.skip(f"{tmp_path}'s file system keeps files cached (tmpfs?)")
    if sys.platform.startswith("linux"):
        assert [cached_fraction(tmp_path / n) for n in ("a/x.bin", "a/y.bin", "z.bin")] == [0.0, 0.0, 0.0]


def test_an_unknown_cache_condition_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="as-found, primed, evicted"):
        timed_command(["true"], tmp_path / "o", tmp_path / "l", "warm")
