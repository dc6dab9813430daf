"""The denoising loop kept on the GPU: the fused UNet-step TensorRT engine run step after step on device buffers.

Same loop as :class:`trt_bgswap.runtime.denoise.FusedStepDenoiser` (its reference), with no
host round trip between steps:

- one device block per (shape, steps) holds every step-varying tensor
  (:func:`loop_layout`): the schedule (per-step timestep and the six LCM coefficients,
  a row each), the noise (the initial latents, each step's injected noise, a zero
  row for the final step), two ping-pong latent buffers and the ``denoised`` output;
- the schedule is uploaded once per schedule, the noise once per generation, each in
  one copy; the text embeddings, mask and masked-image latents go into the engine's
  own input buffers (or are fed device-to-device by the caller through :attr:`TrtStepLoop.engine`);
- each step only re-points the engine's tensors (``set_tensor_address``) at its rows
  of the block (:func:`step_bindings`: step ``i`` reads the latents step ``i - 1``
  wrote) and calls ``execute_async_v3`` on the one stream;
- for static shapes the whole loop is captured once into a CUDA graph and replayed
  (NVIDIA's pattern in the TensorRT developer guide, "CUDA Graphs": enqueue once
  after a shape change, then ``cudaStreamBeginCapture`` / enqueue /
  ``cudaStreamEndCapture`` / ``cudaGraphInstantiate``, then ``cudaGraphLaunch``);
  :func:`graph_action` decides when;
- only the final latents are copied back (or left on the device for the VAE decoder).

Every decision (offsets, alignment, bindings, packing, capture) is a plain function
tested on CPU; :class:`TrtStepLoop` only executes them. Importable without
``tensorrt``/``cuda-python``; using it without them raises
:class:`~trt_bgswap.errors.BackendUnavailable` with the install hint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trt_bgswap.runtime.trt_shapes import DEVICE_ALIGNMENT, GraphEligibility, aligned, cuda_graph_eligibility
from trt_bgswap.errors import BackendUnavailable, ModelError, UsageError
from trt_bgswap.runtime.cuda_device import CudaGraph, DeviceBuffer, Stream, copy_to_device, copy_to_host
from trt_bgswap.runtime.scheduler import COEFFICIENT_NAMES, LCMCoefficients, LCMScheduler
from trt_bgswap.runtime.denoise import DenoiseInputs, schedule_of, step_feeds
from trt_bgswap.runtime.trt_backend import SharedActivations, TrtEngine
from trt_bgswap.specs import UNET_STEP, ModelSpec, StepIO

log = logging.getLogger(__name__)

STEP_MODEL = UNET_STEP
GRAPH_EAGER, GRAPH_CAPTURE, GRAPH_REPLAY = "eager", "capture", "replay"


# --- the plan: plain Python, tested on CPU -------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """``rows`` equal rows of ``row_bytes`` each, every row starting on a ``stride`` boundary."""

    offset: int
    row_bytes: int
    stride: int
    rows: int

    @property
    def nbytes(self) -> int:
        return self.stride * self.rows

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    def at(self, row: int) -> int:
        """Byte offset of one row (TensorRT wants every tensor address 256-byte aligned)."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} outside 0..{self.rows - 1}")
        return self.offset + row * self.stride


@dataclass(frozen=True)
class LoopLayout:
    """Where every step-varying tensor lives in the loop's one device block.

    Order: [schedule = timestep rows, coefficient rows][noise rows][latents ping, pong][denoised],
    so the schedule and the noise are each one contiguous upload.
    """

    steps: int
    timestep: Region  # steps rows: float32 timestep (1,)
    coefficients: Region  # steps rows: float32 (6,), COEFFICIENT_NAMES order
    noise: Region  # steps + 1 rows: initial latents, noise after steps 0..steps-2, zeros for the final step
    latents: Region  # 2 rows: ping-pong, step i writes row i % 2
    denoised: Region  # 1 row: written every step, read by nobody in the loop

    @property
    def nbytes(self) -> int:
        return self.denoised.end

    @property
    def schedule_bytes(self) -> tuple[int, int]:
        return self.timestep.offset, self.coefficients.end

    @property
    def noise_bytes(self) -> tuple[int, int]:
        return self.noise.offset, self.noise.end

    def regions(self) -> dict[str, Region]:
        return {
            "timestep": self.timestep,
            "coefficients": self.coefficients,
            "noise": self.noise,
            "latents": self.latents,
            "denoised": self.denoised,
        }


def _row(spec: ModelSpec, name: str, dims: Mapping[str, int]) -> int:
    return spec.tensor(name).nbytes(dims)


def loop_layout(spec: ModelSpec, dims: Mapping[str, int], steps: int, alignment: int = DEVICE_ALIGNMENT) -> LoopLayout:
    """The block layout for ``steps`` steps at ``dims``, every size from the step graph's spec."""
    if spec.name != STEP_MODEL:
        raise ModelError(f"the device loop runs the {STEP_MODEL!r} graph, not {spec.name!r}")
    if steps < 1:
        raise UsageError(f"steps={steps}: the loop needs at least one step")
    sample = _row(spec, StepIO.LATENTS, dims)
    for name in (StepIO.NOISE, StepIO.PREV_LATENTS, StepIO.DENOISED):
        if _row(spec, name, dims) != sample:
            raise ModelError(f"{spec.name}: {name} is {_row(spec, name, dims)} bytes but latents are {sample}; the step graph must keep the sample's shape")
    if spec.tensor(StepIO.COEFFICIENTS).resolve(dims) != (len(COEFFICIENT_NAMES),):
        raise ModelError(f"{spec.name}: coefficients input is {spec.tensor('coefficients').shape}, the scheduler has {len(COEFFICIENT_NAMES)}")

    offset = 0

    def region(row_bytes: int, rows: int) -> Region:
        nonlocal offset
        r = Region(offset, row_bytes, aligned(row_bytes, alignment), rows)
        offset = r.end
        return r

    timestep = region(_row(spec, StepIO.TIMESTEP, dims), steps)
    coefficients = region(_row(spec, StepIO.COEFFICIENTS, dims), steps)
    noise = region(sample, steps + 1)
    latents = region(sample, 2)
    denoised = region(sample, 1)
    return LoopLayout(steps, timestep, coefficients, noise, latents, denoised)


def step_bindings(layout: LoopLayout, index: int) -> dict[str, int]:
    """Block offsets each ``StepIO.LOOP`` tensor points at during step ``index``.

    Step 0 reads the initial latents from noise row 0; step ``i > 0`` reads the latents
    row step ``i - 1`` wrote; step ``i`` writes latents row ``i % 2`` (never the row it
    reads: TensorRT's inputs and outputs must not alias) and injects noise row ``i + 1``.
    """
    if not 0 <= index < layout.steps:
        raise IndexError(f"step {index} outside 0..{layout.steps - 1}")
    read = layout.noise.at(0) if index == 0 else layout.latents.at((index - 1) % 2)
    return {
        StepIO.LATENTS: read,
        StepIO.NOISE: layout.noise.at(index + 1),
        StepIO.TIMESTEP: layout.timestep.at(index),
        StepIO.COEFFICIENTS: layout.coefficients.at(index),
        StepIO.PREV_LATENTS: layout.latents.at(index % 2),
        StepIO.DENOISED: layout.denoised.at(0),
    }


def final_latents_offset(layout: LoopLayout) -> int:
    """Where the last step leaves the final latents."""
    return step_bindings(layout, layout.steps - 1)[StepIO.PREV_LATENTS]


def _put_rows(block: np.ndarray, region: Region, base: int, rows: Sequence[np.ndarray]) -> None:
    for i, row in enumerate(rows):
        raw = np.ascontiguousarray(row, dtype=np.float32).view(np.uint8).reshape(-1)
        if raw.size != region.row_bytes:
            raise UsageError(f"a row of {raw.size} bytes does not fit a {region.row_bytes}-byte slot; shapes differ from the layout's")
        start = region.at(i) - base
        block[start : start + raw.size] = raw


def pack_schedule(layout: LoopLayout, coefficients: LCMCoefficients) -> np.ndarray:
    """Host bytes of the schedule part of the block (uploaded once per schedule)."""
    if len(coefficients) != layout.steps:
        raise UsageError(f"a {len(coefficients)}-step schedule for a {layout.steps}-step layout; plan the layout for this schedule")
    start, end = layout.schedule_bytes
    block = np.zeros(end - start, dtype=np.uint8)
    _put_rows(block, layout.timestep, start, [np.array([t], dtype=np.float32) for t in coefficients.timesteps])
    _put_rows(block, layout.coefficients, start, list(coefficients.table()))
    return block


def pack_noise(layout: LoopLayout, inputs: DenoiseInputs) -> np.ndarray:
    """Host bytes of the noise part of the block (uploaded once per generation); the final step's row stays zero."""
    inputs.check(layout.steps, max_rows=1)
    start, end = layout.noise_bytes
    block = np.zeros(end - start, dtype=np.uint8)
    _put_rows(block, layout.noise, start, [inputs.latents, *inputs.step_noise[: layout.steps - 1]])
    return block


@dataclass(frozen=True)
class GraphKey:
    """What a captured loop graph bakes in: shapes, step count and every device address it touches."""

    dims: tuple[tuple[str, int], ...]
    steps: int
    addresses: tuple[int, ...]

    @classmethod
    def of(cls, dims: Mapping[str, int], steps: int, addresses: Sequence[int]) -> "GraphKey":
        return cls(tuple(sorted(dims.items())), steps, tuple(addresses))


def graph_action(wanted: bool, eligibility: GraphEligibility, captured: GraphKey | None, key: GraphKey) -> str:
    """``eager``, ``capture`` (run eagerly, then record) or ``replay`` the captured loop.

    A CUDA graph replays fixed kernels on fixed pointers and shapes: it is used only for
    static profiles, and re-captured whenever anything in :class:`GraphKey` changes.
    """
    if not wanted or not eligibility.eligible:
        return GRAPH_EAGER
    return GRAPH_REPLAY if captured == key else GRAPH_CAPTURE


# --- the execution: thin TensorRT / CUDA -------------------------------------------------------


class StepEngine(TrtEngine):
    """A TensorRT engine whose tensors can be re-pointed between enqueues (the loop's per-step rows)."""

    def bind(self, name: str, ptr: int) -> None:
        if self._context is None:
            raise BackendUnavailable(f"{self.spec.name}: engine not loaded; call load() first")
        if not self._context.set_tensor_address(name, ptr):
            raise BackendUnavailable(f"{self.spec.name}: TensorRT rejected the address of {name!r} (is it 256-byte aligned?)")

    def graph_eligibility(self) -> GraphEligibility:
        """Whether the profile the current shapes run under allows a CUDA graph."""
        if self._profile is None:
            return GraphEligibility(False, "no optimization profile selected yet")
        return cuda_graph_eligibility(self.profiles[self._profile])


class TrtStepLoop:
    """Runs a whole denoising schedule with the fused UNet-step plan, on one stream, device-resident."""

    max_rows = 1  # the step graph's latents are batch 1
    engine_class: type[StepEngine] = StepEngine  # a subclass may feed inputs differently (device_chain.DeviceFedStepEngine)

    def __init__(
        self,
        spec: ModelSpec,
        plan_path: Path,
        stream: Stream | None = None,
        use_cuda_graph: bool = True,
        shared_activations: SharedActivations | None = None,
    ) -> None:
        if spec.name != STEP_MODEL:
            raise ModelError(f"TrtStepLoop runs the {STEP_MODEL!r} plan, not {spec.name!r}")
        self.engine = self.engine_class(spec, plan_path, stream=stream, shared_activations=shared_activations, use_cuda_graph=False)
        self.use_cuda_graph = use_cuda_graph
        self.layout: LoopLayout | None = None
        self._dims: dict[str, int] | None = None
        self._block: DeviceBuffer | None = None
        self._schedule: bytes | None = None  # what the block's schedule rows hold now
        self._graph: CudaGraph | None = None
        self._graph_key: GraphKey | None = None
        self._graph_failed = False
        self.last_action: str | None = None  # what the last run did: eager / capture / replay

    @property
    def backend(self) -> str:
        return f"{self.engine.backend} (device loop)"

    @property
    def stream(self) -> Stream:
        return self.engine.stream

    def load(self) -> None:
        self.engine.load()
        if self._graph is None:
            self._graph = CudaGraph(self.stream)

    def _prepare(self, dims: dict[str, int], coefficients: LCMCoefficients) -> LoopLayout:
        """Shapes, block and schedule for this run; (re)allocates only when something grew or changed."""
        if dims != self._dims:
            self.engine.allocate(dims)
            self._dims = dims
        layout = loop_layout(self.engine.spec, dims, len(coefficients))
        if self._block is None or self._block.nbytes < layout.nbytes:
            if self._block is not None:
                self._block.free()
            self._block = DeviceBuffer(layout.nbytes)
            self._schedule = None
            log.debug("%s: loop block of %d bytes for %d steps at %s", STEP_MODEL, layout.nbytes, layout.steps, dims)
        schedule = pack_schedule(layout, coefficients)
        if layout != self.layout or self._schedule != schedule.tobytes():
            copy_to_device(self._block.ptr + layout.schedule_bytes[0], schedule, self.stream)
            self._schedule = schedule.tobytes()
        self.layout = layout
        return layout

    def _enqueue_steps(self) -> None:
        assert self.layout is not None and self._block is not None
        base = self._block.ptr
        for i in range(self.layout.steps):
            for name, offset in step_bindings(self.layout, i).items():
                self.engine.bind(name, base + offset)
            self.engine.run()

    def run_on_device(self, coefficients: LCMCoefficients, inputs: DenoiseInputs) -> int:
        """Enqueue the whole loop; returns the device address of the final (1, C, h, w) latents.

        Asynchronous on :attr:`stream`: work enqueued after it on the same stream (a VAE
        decoder fed with ``feed_from_device``) sees the result.
        """
        self.load()
        steps = len(coefficients)
        inputs.check(steps, max_rows=1)
        feeds = step_feeds(inputs, coefficients, 0, inputs.latents)
        dims = self.engine.spec.infer_dims(feeds)
        layout = self._prepare(dims, coefficients)
        assert self._block is not None and self._graph is not None
        for name in StepIO.CONDITIONING:
            self.engine.upload(name, feeds[name])
        copy_to_device(self._block.ptr + layout.noise_bytes[0], pack_noise(layout, inputs), self.stream)

        eligibility = self.engine.graph_eligibility()
        key = GraphKey.of(dims, steps, self._addresses())
        action = graph_action(self.use_cuda_graph and not self._graph_failed, eligibility, self._graph_key, key)
        if self.use_cuda_graph and not eligibility.eligible and self.last_action is None:
            log.info("%s: not capturing the loop into a CUDA graph: %s", STEP_MODEL, eligibility.reason)
        if action == GRAPH_REPLAY:
            self._graph.replay()
        else:
            self._enqueue_steps()  # eager; also TensorRT's required warm-up enqueue before a capture
            if action == GRAPH_CAPTURE:
                self._capture(key)
        self.last_action = action
        return self._block.ptr + final_latents_offset(layout)

    def _addresses(self) -> tuple[int, ...]:
        """Every device address the captured loop touches: the block, the conditioning inputs, shared scratch."""
        assert self._block is not None
        shared = self.engine.shared
        scratch = shared.buffer.ptr if shared is not None and shared.buffer is not None else 0
        return (self._block.ptr, *(self.engine.device_ptr(n) for n in StepIO.CONDITIONING), scratch)

    def _capture(self, key: GraphKey) -> None:
        assert self._graph is not None
        self._graph_key = None
        try:
            self._graph.capture(self._enqueue_steps)
        except BackendUnavailable as e:
            self._graph_failed = True
            log.warning("%s: CUDA-graph capture of the loop failed (%s); running the steps eagerly from now on", STEP_MODEL, e)
            return
        self._graph_key = key
        log.info("%s: captured the %d-step loop into a CUDA graph for %s", STEP_MODEL, key.steps, dict(key.dims))

    def denoise(self, scheduler: LCMScheduler, inputs: DenoiseInputs) -> np.ndarray:
        """The denoising stage: the scheduler's schedule, on the GPU."""
        return self.denoise_with(schedule_of(scheduler), inputs)

    def denoise_with(self, coefficients: LCMCoefficients, inputs: DenoiseInputs) -> np.ndarray:
        """The whole loop on the GPU for one schedule table; only the final latents come back to the host."""
        ptr = self.run_on_device(coefficients, inputs)
        out = np.empty(inputs.latents.shape, dtype=np.float32)
        copy_to_host(out, ptr, self.stream)
        self.stream.synchronize()
        return out

    def close(self) -> None:
        """Free the graph, the block and the engine (and its stream if it made one)."""
        if self._graph is not None:
            self._graph.reset()
            self._graph = None
        self._graph_key = None
        if self._block is not None:
            self._block.free()
            self._block = None
        self.layout = None
        self._schedule = None
        self._dims = None
        self.engine.close()
