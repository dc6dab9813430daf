"""One small engine interface for every backend.

Modelled on the lifecycle of NVIDIA's TensorRT demo engines (load, allocate for
a shape, infer), minus the parts that couple it to torch: a backend takes and
returns plain numpy arrays keyed by the tensor names of the model's
:class:`~trt_bgswap.specs.ModelSpec`. Backends never impersonate torch or
diffusers modules.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trt_bgswap.specs import ModelSpec

log = logging.getLogger(__name__)


class Engine(ABC):
    """A loaded model that maps named input arrays to named output arrays."""

    def __init__(self, spec: ModelSpec, path: Path) -> None:
        self.spec = spec
        self.path = Path(path)
        self._dims: dict[str, int] | None = None

    @property
    @abstractmethod
    def backend(self) -> str:
        """The backend that actually runs, e.g. ``onnxruntime:CPUExecutionProvider``."""

    @abstractmethod
    def load(self) -> None:
        """Deserialize the model; cheap to call twice."""

    def allocate(self, dims: Mapping[str, int]) -> None:
        """Prepare buffers for one set of symbol values; backends reallocate only when they change."""
        self._dims = dict(dims)

    @abstractmethod
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on already-validated feeds."""

    def low_memory_parts(self, residency: Any, name: str) -> "Engine | None":
        """Under ``--low-memory`` (``residency``: a runtime.residency.Residency), an engine to run instead that
        opens parts of this model one at a time; None: the whole model opens while it runs (the default)."""
        return None

    def unload(self) -> None:
        """Free the model's memory (for small devices that load engines one at a time); ``load`` brings it back."""

    def close(self) -> None:
        """Free everything the engine holds for good (sessions, device buffers, streams it made)."""
        self.unload()

    def __enter__(self) -> "Engine":
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        dims = self.spec.infer_dims(feeds)
        if dims != self._dims:
            self.allocate(dims)
        return self.infer(feeds)


class EngineStage:
    """A pipeline stage that runs one engine: its backend is the engine's, and closing the stage closes the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def backend(self) -> str:
        return self.engine.backend

    def close(self) -> None:
        self.engine.close()
