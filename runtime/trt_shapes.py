"""TensorRT shapes at run time: optimization profiles, the profile a shape runs under, and device buffer plans.

`trt-bgswap build` makes the profiles (:mod:`trt_bgswap.engines.profiles`); the runtime picks
one per input shape (:func:`select_profile`) and sizes its device buffers from the spec
(:func:`buffer_plan`): how many bytes each engine's tensors take, and what can be shared.

The runtime allocates every I/O tensor once per shape and reuses it
(allocation only when a tensor needs more room than it has), and can give all
engines one activation ("scratch") block sized to the largest engine's need,
since the pipeline runs its engines one after another on one stream (the
pattern TensorRT supports through user-managed execution-context memory:
``ExecutionContextAllocationStrategy.USER_MANAGED`` + ``set_device_memory``).
The arithmetic lives here, in plain Python, so it is unit-tested on CPU;
:mod:`trt_bgswap.runtime.trt_backend` only executes the plan.

CUDA graphs (NVIDIA's "CUDA Graphs" section of the TensorRT developer guide)
replay a captured launch sequence with fixed pointers and shapes; this project
captures only engines built with static profiles, where neither can change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trt_bgswap.errors import UsageError
from trt_bgswap.specs import ModelSpec

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorProfile:
    """min/opt/max shapes of one input tensor."""

    name: str
    min: Shape
    opt: Shape
    max: Shape

    def contains(self, shape: Sequence[int]) -> bool:
        shape = tuple(shape)
        return len(shape) == len(self.min) and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimization profile: a :class:`TensorProfile` per model input, in spec order."""

    tensors: tuple[TensorProfile, ...]

    @property
    def is_static(self) -> bool:
        return all(t.min == t.opt == t.max for t in self.tensors)

    def tensor(self, name: str) -> TensorProfile:
        for t in self.tensors:
            if t.name == name:
                return t
        raise UsageError(f"profile has no input {name!r} (has {[t.name for t in self.tensors]})")

    def contains(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        """Whether every input shape lies inside this profile (what TensorRT's set_input_shape accepts)."""
        return all(t.name in shapes and t.contains(shapes[t.name]) for t in self.tensors)

    def to_json(self) -> list[dict[str, Any]]:
        return [t.to_json() for t in self.tensors]

    @classmethod
    def from_json(cls, d: Sequence[Mapping[str, Any]]) -> "ShapeProfile":
        return cls(tuple(TensorProfile(t["name"], tuple(t["min"]), tuple(t["opt"]), tuple(t["max"])) for t in d))


def select_profile(profiles: Sequence[ShapeProfile], shapes: Mapping[str, Sequence[int]]) -> int:
    """Index of the first profile accepting these input shapes (TensorRT's set_optimization_profile_async)."""
    for i, p in enumerate(profiles):
        if p.contains(shapes):
            return i
    ranges = "; ".join(
        ", ".join(f"{t.name} {list(t.min)}..{list(t.max)}" for t in p.tensors) for p in profiles
    )
    got = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
    raise UsageError(
        f"input shapes ({got}) fit none of the engine's profiles ({ranges}); "
        "rebuild with `trt-bgswap build --size WxH` for this size or a --dynamic range covering it"
    )



# cudaMalloc returns 256-byte aligned pointers; TensorRT asks for at least that for I/O and scratch.
DEVICE_ALIGNMENT = 256


def aligned(nbytes: int, alignment: int = DEVICE_ALIGNMENT) -> int:
    return -(-nbytes // alignment) * alignment


@dataclass(frozen=True)
class TensorBuffer:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    is_input: bool


@dataclass(frozen=True)
class EngineBuffers:
    """One engine's I/O buffers for one set of dims."""

    model: str
    tensors: tuple[TensorBuffer, ...]

    @property
    def io_bytes(self) -> int:
        return sum(aligned(t.nbytes) for t in self.tensors)

    def sizes(self) -> dict[str, int]:
        return {t.name: t.nbytes for t in self.tensors}


def buffer_plan(spec: ModelSpec, dims: Mapping[str, int]) -> EngineBuffers:
    """Bytes of every input and output of ``spec`` at ``dims`` (from the spec's declared dims and dtypes)."""
    tensors = tuple(
        TensorBuffer(t.name, t.dtype, t.resolve(dims), t.nbytes(dims), is_input)
        for ts, is_input in ((spec.inputs, True), (spec.outputs, False))
        for t in ts
    )
    return EngineBuffers(spec.name, tensors)


def complete_dims(spec: ModelSpec, dims: Mapping[str, int], output_shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """``dims`` plus the symbols only outputs carry (the VAE encoder's ``h``/``w``), read from the shapes the engine reports.

    A symbol the inputs already fixed must agree with the output shape, else the
    plan does not implement the declared spec.
    """
    full = dict(dims)
    for t in spec.outputs:
        shape = tuple(output_shapes[t.name])
        if len(shape) != len(t.shape):
            raise ValueError(f"{spec.name}.{t.name}: the engine reports rank {len(shape)} {shape}, the spec {t.shape}")
        for axis, (want, got) in enumerate(zip(t.shape, shape)):
            if isinstance(want, int):
                if want != got:
                    raise ValueError(f"{spec.name}.{t.name}: dim {axis} is {got} in the engine, {want} in the spec")
            elif full.setdefault(want, int(got)) != got:
                raise ValueError(f"{spec.name}.{t.name}: dim {axis} ({want}) is {got} in the engine but the inputs give {want}={full[want]}")
    return full


def reallocations(capacity: Mapping[str, int], needed: Mapping[str, int]) -> list[str]:
    """Tensors whose buffer must be (re)allocated: new ones and those that outgrew their capacity.

    Shrinking reuses the existing buffer, so alternating sizes do not thrash the allocator.
    """
    return [name for name, n in needed.items() if capacity.get(name, -1) < n]


@dataclass(frozen=True)
class GraphEligibility:
    eligible: bool
    reason: str


def cuda_graph_eligibility(profile: ShapeProfile) -> GraphEligibility:
    """Whether an engine running under ``profile`` may be captured into a CUDA graph: static shapes only.

    A captured graph bakes in shapes and pointers; under a static profile
    (min = opt = max) no input shape can change between replays. The runtime
    re-captures whenever it switches profile or reallocates a buffer.
    """
    dynamic = [t.name for t in profile.tensors if not t.min == t.opt == t.max]
    if dynamic:
        return GraphEligibility(
            False, f"inputs {dynamic} have dynamic shapes; CUDA graphs need a static profile (build without --dynamic)"
        )
    return GraphEligibility(True, "static profile")
