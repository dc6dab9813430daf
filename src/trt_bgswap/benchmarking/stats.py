"""Latency statistics and a clock that records named stage durations.

Following nanoGPT's ``bench.py`` and tinygrad's benchmarks: warm-up calls first, then
timed calls; report min / median / p90 (the min is the least-disturbed run on a shared
machine, the median the typical one, p90 the tail). CPU backends are synchronous, so
reading ``time.perf_counter`` after a call needs no device synchronisation.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from trt_bgswap.errors import UsageError

# The stages that are model calls; everything else in an end-to-end run is overhead.
MODEL_STAGES = ("rmbg", "text_encoder", "vae_encoder", "unet", "vae_decoder")


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings, in seconds."""

    n: int
    min: float
    median: float
    p90: float
    mean: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        if not samples:
            raise UsageError("no timing samples: --runs must be at least 1")
        a = np.asarray(samples, dtype=np.float64)
        return cls(n=len(a), min=float(a.min()), median=float(np.median(a)), p90=float(np.percentile(a, 90)), mean=float(a.mean()))

    def to_json(self) -> dict[str, float | int]:
        return {"n": self.n, "min": self.min, "median": self.median, "p90": self.p90, "mean": self.mean}


def time_calls(fn: Callable[[], Any], warmup: int, runs: int) -> Stats:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed."""
    if runs < 1:
        raise UsageError(f"runs={runs}: --runs must be at least 1")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Stats.of(samples)


class StageClock:
    """Collects durations per stage name; one ``lap()`` per measured run groups them."""

    def __init__(self) -> None:
        self.current: dict[str, list[float]] = defaultdict(list)
        self.runs: list[dict[str, list[float]]] = []
        self.enabled = True

    def add(self, stage: str, seconds: float) -> None:
        if self.enabled:
            self.current[stage].append(seconds)

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def lap(self) -> dict[str, list[float]]:
        """Close one run: its stage durations are stored and the next run starts empty."""
        run = {k: list(v) for k, v in self.current.items()}
        self.runs.append(run)
        self.current = defaultdict(list)
        return run

    def discard(self) -> None:
        """Forget the current (warm-up) run."""
        self.current = defaultdict(list)


def time_runs(clock: StageClock, fn: Callable[[int], Any], warmup: int, runs: int) -> tuple[list[float], list[float]]:
    """Seconds of ``fn(i)`` for ``runs`` timed calls after ``warmup`` untimed ones, and of every call in order.

    ``clock`` keeps one lap per timed call. Every call's time shows the first request after load
    against the next ones (start-up work left for the first call).
    """
    samples, every = [], []
    for i in range(warmup + runs):
        clock.discard()
        t = time.perf_counter()
        fn(i)
        dt = time.perf_counter() - t
        every.append(dt)
        if i < warmup:
            clock.discard()
            continue
        samples.append(dt)
        clock.lap()
    return samples, every


def stage_stats(runs: list[dict[str, list[float]]], steps: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per model stage, the stats of its total per run; per UNet step, the stats of that step."""
    stages = {name: Stats.of([sum(r.get(name, [])) for r in runs]).to_json() for name in MODEL_STAGES}
    unet_steps = []
    for i in range(steps):
        samples = [r["unet"][i] for r in runs if len(r.get("unet", [])) > i]
        if samples:
            unet_steps.append(Stats.of(samples).to_json())
    return stages, unet_steps


def non_model_stats(e2e: Sequence[float], runs: list[dict[str, list[float]]]) -> dict[str, float | int]:
    """The stats of each run's end-to-end time minus its model calls: what the pipeline itself costs."""
    model_sums = [sum(sum(v) for k, v in r.items() if k in MODEL_STAGES) for r in runs]
    return Stats.of([e - m for e, m in zip(e2e, model_sums)]).to_json()
