"""A graph run as its consecutive parts (:mod:`trt_bgswap.graph_parts`), each its own engine.

With ``--low-memory`` each part is a :class:`~trt_bgswap.runtime.residency.ResidentEngine`, so only
the running part's session (its share of the weights) is open: the full SD1.5 UNet peaks at about a
third of its 3.44 GB of weights instead of all of them, for a few more session opens per step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from trt_bgswap.graph_parts import GraphPart
from trt_bgswap.runtime.engine import Engine
from trt_bgswap.specs import ModelSpec, TensorSpec


def part_spec(whole: ModelSpec, index: int, part: GraphPart) -> ModelSpec:
    """A part's I/O as a spec (dims unknown: the parts are only ever run through :class:`PartsEngine`)."""
    return ModelSpec(
        f"{whole.name}.part{index}",
        tuple(TensorSpec(n, t, ()) for n, t in part.inputs),
        tuple(TensorSpec(n, t, ()) for n, t in part.outputs),
    )


class PartsEngine(Engine):
    """Runs ``parts`` in order, feeding each the whole graph's inputs and earlier parts' outputs it reads."""

    def __init__(self, spec: ModelSpec, path: Path, parts: Sequence[Engine]) -> None:
        super().__init__(spec, path)
        self.parts = list(parts)
        # after part k, the tensors no later part reads and that are not outputs can be dropped
        needed_after: list[set[str]] = []
        later: set[str] = set(spec.output_names)
        for part in reversed(self.parts):
            needed_after.append(set(later))
            later |= set(part.spec.input_names)
        self._keep = list(reversed(needed_after))

    @property
    def backend(self) -> str:
        return self.parts[0].backend

    def load(self) -> None:
        for part in self.parts:
            part.load()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        live: dict[str, np.ndarray] = dict(feeds)
        for part, keep in zip(self.parts, self._keep):
            live.update(part.infer({n: live[n] for n in part.spec.input_names}))
            live = {n: a for n, a in live.items() if n in keep}
        return {n: live[n] for n in self.spec.output_names}

    def unload(self) -> None:
        for part in self.parts:
            part.unload()

    def close(self) -> None:
        for part in self.parts:
            part.close()
