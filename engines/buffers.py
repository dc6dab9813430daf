"""Device buffer plans: how many bytes each engine's tensors take, and what can be shared.

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

from trt_bgswap.specs import ModelSpec

from trt_bgswap.engines.profiles import ShapeProfile

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
class MemoryPlan:
    """Device memory for a set of engines: I/O per engine plus activation scratch, shared or not."""

    buffers: tuple[EngineBuffers, ...]
    activation_bytes: Mapping[str, int]  # per engine, as TensorRT reports (device_memory_size_v2)

    @property
    def io_bytes(self) -> int:
        return sum(b.io_bytes for b in self.buffers)

    @property
    def shared_activation_bytes(self) -> int:
        """One scratch block serving every engine in turn: the largest need."""
        return aligned(max(self.activation_bytes.values(), default=0))

    @property
    def separate_activation_bytes(self) -> int:
        return sum(aligned(n) for n in self.activation_bytes.values())

    def total_bytes(self, share_activations: bool) -> int:
        act = self.shared_activation_bytes if share_activations else self.separate_activation_bytes
        return self.io_bytes + act

    def savings(self) -> int:
        return self.separate_activation_bytes - self.shared_activation_bytes


def memory_plan(buffers: Sequence[EngineBuffers], activation_bytes: Mapping[str, int]) -> MemoryPlan:
    names = {b.model for b in buffers}
    unknown = sorted(set(activation_bytes) - names)
    if unknown:
        raise ValueError(f"activation sizes given for engines {unknown} that have no buffer plan (have {sorted(names)})")
    return MemoryPlan(tuple(buffers), dict(activation_bytes))


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
