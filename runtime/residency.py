"""``--low-memory``: which models' sessions stay resident, decided by a budget.

A generation runs its models one after another (RMBG, text encoder, VAE encoder, the UNet
for every step, VAE decoder), so a small box needs only the running model in memory. Each
engine is wrapped in a :class:`ResidentEngine`; before one opens, the least recently used
others close until the opened ones fit the budget. Budget 0 keeps one model at a time: a
session lives while its stage runs (the UNet across all its steps, since nothing else runs
between them) and until the next stage needs the room. Results are those of the default
mode bit for bit: the same graphs open with the same session options; only when they open
differs. The cost is opening each session again per request (reported by ``trt-bgswap bench``).

What a session costs is estimated from its files on disk (the weights); ONNX Runtime adds
its pre-packed copies of GEMM weights and its arena, so the budget is a bound on what is
*kept*, not on the peak.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.engine import Engine

log = logging.getLogger(__name__)


def files_bytes(path: Path) -> int:
    """A graph file and its external weights beside it (``model.onnx`` + ``model.onnx.data`` / ``model.onnx_data``)."""
    path = Path(path)
    if not path.parent.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file() and p.name.startswith(path.name))


def residency_for(low_memory: "bool | int | Residency | None") -> "Residency | None":
    """``low_memory``: False/None (every session stays open), True (one at a time), a budget in bytes, or a residency to share."""
    if isinstance(low_memory, Residency):
        return low_memory
    if low_memory is None or low_memory is False:
        return None
    if low_memory is True:
        return Residency(0)
    if not isinstance(low_memory, int) or low_memory < 0:
        raise UsageError(f"low_memory={low_memory!r}: give True (one model at a time) or a number of bytes to keep resident")
    return Residency(low_memory)


class Residency:
    """The engines currently open, least recently used first, and the budget that bounds them (bytes)."""

    def __init__(self, budget_bytes: int = 0) -> None:
        self.budget = budget_bytes
        self._open: OrderedDict[str, ResidentEngine] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0  # sessions opened, for the benchmark's cost report

    def manage(self, engines: Mapping[str, Engine]) -> dict[str, Engine]:
        """Each engine wrapped in a :class:`ResidentEngine` of this residency (a graph built in parts: each part)."""
        return {name: engine.low_memory_parts(self, name) or ResidentEngine(engine, name, self) for name, engine in engines.items()}

    def acquire(self, engine: "ResidentEngine") -> bool:
        """Open ``engine``, first closing the least recently used others until the open ones fit the budget.

        True if it was opened now (its buffers must be allocated again)."""
        with self._lock:
            if engine.name in self._open:
                self._open.move_to_end(engine.name)
                return False
            need = engine.cost
            while self._open and sum(e.cost for e in self._open.values()) + need > self.budget:
                _, old = self._open.popitem(last=False)
                log.debug("low memory: closing %s for %s", old.name, engine.name)
                old.inner.unload()
            engine.inner.load()
            self.loads += 1
            self._open[engine.name] = engine
            return True

    def release(self) -> None:
        """Close every open session (between requests, or before something else needs the memory)."""
        with self._lock:
            while self._open:
                _, old = self._open.popitem(last=False)
                old.inner.unload()

    def forget(self, engine: "ResidentEngine") -> None:
        with self._lock:
            self._open.pop(engine.name, None)


class ResidentEngine(Engine):
    """An engine whose session is opened when it runs and closed when the budget needs the room."""

    def __init__(self, inner: Engine, name: str, residency: Residency, cost: int | None = None) -> None:
        super().__init__(inner.spec, inner.path)
        self.inner = inner
        self.name = name
        self.residency = residency
        self.cost = files_bytes(inner.path) if cost is None else cost

    @property
    def backend(self) -> str:
        return self.inner.backend

    def load(self) -> None:
        """Deferred to the first run; only the file is checked now, so a missing model fails at load as usual."""
        if not self.inner.path.is_file():
            self.inner.load()  # raises the backend's own "model file missing" error

    def allocate(self, dims: Mapping[str, int]) -> None:
        super().allocate(dims)
        self.residency.acquire(self)
        self.inner.allocate(dims)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.residency.acquire(self) and self._dims is not None:
            self.inner.allocate(self._dims)  # a session opened again has no buffers for the current shapes
        return self.inner.infer(feeds)

    def unload(self) -> None:
        self.residency.forget(self)
        self.inner.unload()

    def close(self) -> None:
        self.residency.forget(self)
        self.inner.close()
