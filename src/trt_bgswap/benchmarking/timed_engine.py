"""An :class:`~trt_bgswap.runtime.engine.Engine` wrapper that times each inference.

The pipeline runs unchanged (no timing code in the runtime); the benchmark hands it
wrapped engines, so each model stage's time is read inside a real end-to-end run. Only
``infer`` is timed: input validation and dtype casts stay in the pipeline's overhead. With
``peaks``, the process's peak memory while each call ran is recorded under the same stage.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping

import numpy as np

from trt_bgswap.runtime.engine import Engine
from trt_bgswap.runtime.residency import Residency

from trt_bgswap.benchmarking.peak_memory import StagePeaks
from trt_bgswap.benchmarking.stats import StageClock


class TimedEngine(Engine):
    """Delegates to ``inner`` and records ``infer`` durations under ``stage`` in ``clock``."""

    def __init__(self, inner: Engine, stage: str, clock: StageClock, peaks: StagePeaks | None = None) -> None:
        super().__init__(inner.spec, inner.path)
        self.inner = inner
        self.stage = stage
        self.clock = clock
        self.peaks = peaks

    @property
    def backend(self) -> str:
        return self.inner.backend

    def load(self) -> None:
        self.inner.load()

    def allocate(self, dims: Mapping[str, int]) -> None:
        super().allocate(dims)
        self.inner.allocate(dims)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.peaks.stage(self.stage) if self.peaks is not None else contextlib.nullcontext():
            t0 = time.perf_counter()
            out = self.inner.infer(feeds)
            self.clock.add(self.stage, time.perf_counter() - t0)
        return out

    def low_memory_parts(self, residency: Residency, name: str) -> Engine | None:
        """A graph built in parts runs them inside this timed call (a UNet step stays one call, its session opens
        included)."""
        parts = self.inner.low_memory_parts(residency, name)
        if parts is None:
            return None
        self.inner = parts
        return self

    def unload(self) -> None:
        self.inner.unload()
