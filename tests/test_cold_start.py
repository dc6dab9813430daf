"""Cold starts are repeated and interleaved (ours, baseline, ours, ...); a side's figure is its median."""

from __future__ import annotations

import pytest

from trt_bgswap.benchmarking.cold_start import interleaved, summarize
from trt_bgswap.errors import BgSwapError


def _sample(t: float, peak: int) -> dict:
    return {"to_first_image": t, "process_wall": t + 0.5, "peak_rss": peak, "peak_rss_upper": peak + 1, "peak_samples": 3, "command": ["x"]}


def test_a_side_is_its_median_time_and_its_largest_peak() -> None:
    s = summarize([_sample(60.0, 5), _sample(54.0, 7), _sample(57.0, 6)])
    assert s["to_first_image"] == 57.0 and s["process_wall"] == 57.5
    assert s["peak_rss"] == 7 and s["peak_rss_upper"] == 8
    assert s["samples"] == [60.0, 54.0, 57.0] and s["peak_rss_samples"] == [5, 7, 6]
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
