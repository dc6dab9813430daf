"""The denoising loop kept on the GPU: the fused UNet-step TensorRT engine run step after step on device buffers.

Same loop as :class:`trt_bgswap.runtime.denoise.FusedStepDenoiser` (its reference), with no
host round trip between steps:

- one device block per (shape, steps) holds the step-varying inputs (:func:`loop_layout`):
  the schedule (per-step timestep and the six LCM coefficients, a row each) and the noise
  (the initial latents, each step's injected noise, a zero row for the final step);
- the schedule is uploaded once per schedule, the noise once per generation, each in
  one copy; the text embeddings, mask and masked-image latents go into the engine's
  own input buffers (or are fed device-to-device by the caller through :attr:`TrtStepLoop.engine`);
- the step engine's tensors are bound **once** to its own fixed input/output buffers; before
  each step, device-to-device copies put that step's rows there (:func:`step_copies`: step
  ``i`` reads the latents step ``i - 1`` wrote), then **one** ``execute_async_v3``;
- for static shapes that one enqueue is captured into a CUDA graph and replayed for every
  step: NVIDIA's proven pattern, one enqueue per graph on fixed addresses, new data copied
  into the same tensors (demo/Diffusion/demo_diffusion/engine.py@v11.1:298-325; trtexec,
  samples/common/sampleInference.cpp@v11.1:1335-1372). Capturing several enqueues of one
  context with ``set_tensor_address`` between them is documented nowhere, so it is not done;
- graphs are kept per :class:`GraphKey` (shapes, including the guidance batch ``B``, and the
  addresses baked in), so alternating guidance 1 and 2 replays both; the context is re-set to
  a slot's profile and shapes before its graph replays, as NVIDIA's TensorRT-Edge-LLM
  ``EngineExecutor`` does (prepare: profile, shapes, bindings; execute: replay the cached graph
  matching them). The step count is not in the key: the graph is one step;
- only the final latents are copied back (or left on the device for the VAE decoder).

Every decision (offsets, alignment, bindings, packing, capture) is a plain function
tested on CPU; :class:`TrtStepLoop` only executes them. Importable without
``tensorrt``/``cuda-python``; using it without them raises
:class:`~trt_bgswap.errors.BackendUnavailable` with the install hint.

One concept, kept in one file although it passes 400 lines: the device-resident loop, its plan
next to the execution that follows it (the plan's offsets are what the execution binds).
"""

from __future__ import annotations

import logging
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trt_bgswap.runtime.trt_shapes import DEVICE_ALIGNMENT, GraphEligibility, aligned, buffer_plan, cuda_graph_eligibility, reallocations
from trt_bgswap.errors import BackendUnavailable, ModelError, UsageError
from trt_bgswap.runtime.cuda_device import CudaGraph, DeviceBuffer, Stream, copy_device, copy_to_device, copy_to_host
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
    """Where every step-varying input lives in the loop's one device block.

    Order: [schedule = timestep rows, coefficient rows][noise rows], so the schedule and the
    noise are each one contiguous upload.
    """

    steps: int
    timestep: Region  # steps rows: float32 timestep (1,)
    coefficients: Region  # steps rows: float32 (6,), COEFFICIENT_NAMES order
    noise: Region  # steps + 1 rows: initial latents, noise after steps 0..steps-2, zeros for the final step

    @property
    def nbytes(self) -> int:
        return self.noise.end

    @property
    def schedule_bytes(self) -> tuple[int, int]:
        return self.timestep.offset, self.coefficients.end

    @property
    def noise_bytes(self) -> tuple[int, int]:
        return self.noise.offset, self.noise.end

    def regions(self) -> dict[str, Region]:
        return {"timestep": self.timestep, "coefficients": self.coefficients, "noise": self.noise}


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
    return LoopLayout(steps, timestep, coefficients, noise)


STEP_INPUTS = (StepIO.LATENTS, StepIO.NOISE, StepIO.TIMESTEP, StepIO.COEFFICIENTS)  # copied into the engine before every step


@dataclass(frozen=True)
class StepCopy:
    """One device-to-device copy before a step: ``nbytes`` into the engine's input ``dst``, from a block
    offset (``src_offset``) or from one of the engine's own outputs (``src_output``)."""

    dst: str
    nbytes: int
    src_offset: int | None = None
    src_output: str | None = None


def step_copies(layout: LoopLayout, index: int) -> list[StepCopy]:
    """What step ``index`` copies into the engine's fixed input buffers before its one enqueue.

    Step 0 reads the initial latents (noise row 0); step ``i > 0`` reads the ``prev_latents``
    step ``i - 1`` left in the engine's output buffer (a copy: an input never aliases an output);
    step ``i`` injects noise row ``i + 1`` and uses schedule row ``i``.
    """
    if not 0 <= index < layout.steps:
        raise IndexError(f"step {index} outside 0..{layout.steps - 1}")
    sample = layout.noise.row_bytes
    latents = StepCopy(StepIO.LATENTS, sample, src_offset=layout.noise.at(0)) if index == 0 else StepCopy(StepIO.LATENTS, sample, src_output=StepIO.PREV_LATENTS)
    return [
        latents,
        StepCopy(StepIO.NOISE, sample, src_offset=layout.noise.at(index + 1)),
        StepCopy(StepIO.TIMESTEP, layout.timestep.row_bytes, src_offset=layout.timestep.at(index)),
        StepCopy(StepIO.COEFFICIENTS, layout.coefficients.row_bytes, src_offset=layout.coefficients.at(index)),
    ]


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
    """What a captured step graph bakes in: shapes (the guidance batch ``B`` among them) and every device address it touches."""

    dims: tuple[tuple[str, int], ...]
    addresses: tuple[int, ...]

    @classmethod
    def of(cls, dims: Mapping[str, int], addresses: Sequence[int]) -> "GraphKey":
        return cls(tuple(sorted(dims.items())), tuple(addresses))


MAX_GRAPHS = 8  # graph slots kept per loop (sizes x guidance batches in use); the oldest goes first


def graph_action(wanted: bool, eligibility: GraphEligibility, captured: Container[GraphKey], key: GraphKey) -> str:
    """``eager``, ``capture`` (run eagerly, then record) or ``replay`` the captured step.

    A CUDA graph replays fixed kernels on fixed pointers and shapes: it is used only for
    static profiles, and captured once per :class:`GraphKey`.
    """
    if not wanted or not eligibility.eligible:
        return GRAPH_EAGER
    return GRAPH_REPLAY if key in captured else GRAPH_CAPTURE


# --- the execution: thin TensorRT / CUDA -------------------------------------------------------


class StepEngine(TrtEngine):
    """The step engine: fixed buffers sized for the largest guidance batch, so switching batches moves no address."""

    def reserve(self, dims: Mapping[str, int]) -> None:
        """Grow the device buffers to ``dims``'s sizes now (a later ``allocate`` of smaller dims reuses them)."""
        if self._engine is None:
            self.load()
        sizes = buffer_plan(self.spec, dims).sizes()
        for name in reallocations({k: b.nbytes for k, b in self._device.items()}, sizes):
            if name in self._device:
                self._device[name].free()
            self._device[name] = DeviceBuffer(sizes[name])
        self._dims = None  # the next allocate re-binds every tensor to these buffers

    def max_batch(self) -> int:
        """The largest guidance batch ``B`` any profile admits (1 when the spec has no ``B``)."""
        best = 1
        for p in self.profiles:
            for t in p.tensors:
                symbols = self.spec.tensor(t.name).shape
                best = max([best] + [hi for sym, hi in zip(symbols, t.max) if sym == "B"])
        return best

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
        self._reserved: tuple[tuple[str, int], ...] | None = None  # the (h, w) whose largest batch the buffers hold
        self._block: DeviceBuffer | None = None
        self._schedule: bytes | None = None  # what the block's schedule rows hold now
        self._graphs: dict[GraphKey, CudaGraph] = {}  # insertion order = age
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

    def warm_up(self) -> list[dict[str, int]]:
        """Capture the step graph of every static profile now (at ``Pipeline.load``), so no request pays for it.

        Each profile's inputs are zeroed, run once eagerly (TensorRT's warm-up after a shape change)
        and recorded; returns the dims captured. Dynamic profiles run eagerly and need nothing.
        """
        self.load()
        done = []
        if not self.use_cuda_graph or self._graph_failed:
            return done
        spec = self.engine.spec
        for profile in self.engine.profiles:
            if not cuda_graph_eligibility(profile).eligible:
                continue
            feeds = {t.name: np.zeros(t.opt, dtype=spec.tensor(t.name).np_dtype) for t in profile.tensors}
            dims = spec.infer_dims(feeds)
            self._allocate(dims)
            key = GraphKey.of(dims, self._addresses())
            if key in self._graphs:
                continue
            for name, zeros in feeds.items():
                self.engine.upload(name, zeros)
            self.engine.run()
            if not self._capture(key):
                break
            done.append(dims)
        self.stream.synchronize()
        return done

    def _allocate(self, dims: dict[str, int]) -> None:
        """Shapes for this run; buffers sized once for the largest guidance batch, so 1/2/1/2 keeps every address."""
        if dims == self._dims:
            return
        sample = tuple(sorted((k, v) for k, v in dims.items() if k != "B"))
        if sample != self._reserved:
            self.engine.reserve({**dims, "B": max(self.engine.max_batch(), dims.get("B", 1))} if "B" in dims else dims)
            self._reserved = sample
        self.engine.allocate(dims)
        self._dims = dims

    def _prepare(self, dims: dict[str, int], coefficients: LCMCoefficients) -> LoopLayout:
        """Shapes, block and schedule for this run; (re)allocates only when something grew or changed."""
        self._allocate(dims)
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

    def _copy_step_inputs(self, index: int) -> None:
        assert self.layout is not None and self._block is not None
        for c in step_copies(self.layout, index):
            src = self._block.ptr + c.src_offset if c.src_offset is not None else self.engine.device_ptr(c.src_output)
            copy_device(self.engine.device_ptr(c.dst), src, c.nbytes, self.stream)

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
        assert self._block is not None
        for name in StepIO.CONDITIONING:
            self.engine.upload(name, feeds[name])
        copy_to_device(self._block.ptr + layout.noise_bytes[0], pack_noise(layout, inputs), self.stream)

        eligibility = self.engine.graph_eligibility()
        key = GraphKey.of(dims, self._addresses())
        action = graph_action(self.use_cuda_graph and not self._graph_failed, eligibility, self._graphs, key)
        if self.use_cuda_graph and not eligibility.eligible and self.last_action is None:
            log.info("%s: not capturing the step into a CUDA graph: %s", STEP_MODEL, eligibility.reason)
        for i in range(steps):
            self._copy_step_inputs(i)
            if action == GRAPH_REPLAY:
                self._graphs[key].replay()
            elif i == 0 and action == GRAPH_CAPTURE:
                self.engine.run()  # TensorRT's warm-up enqueue after a shape change, not recorded
                if not self._capture(key):
                    action = GRAPH_EAGER
            else:
                self.engine.run()
        self.last_action = action
        return self.engine.device_ptr(StepIO.PREV_LATENTS)

    def _addresses(self) -> tuple[int, ...]:
        """Every device address the captured step touches: the engine's tensors and the shared scratch."""
        names = [t.name for t in (*self.engine.spec.inputs, *self.engine.spec.outputs)]
        return (*(self.engine.device_ptr(n) for n in names), self.engine.scratch_ptr)

    def _capture(self, key: GraphKey) -> bool:
        """Record one enqueue into a new slot (recording runs nothing: step 0's result is the warm-up's)."""
        for k in [k for k in self._graphs if k.addresses != key.addresses]:  # they bake buffers that moved or were freed
            self._graphs.pop(k).reset()
        while len(self._graphs) >= MAX_GRAPHS:
            self._graphs.pop(next(iter(self._graphs))).reset()
        graph = CudaGraph(self.stream)
        try:
            graph.capture(self.engine.run)
        except BackendUnavailable as e:
            self._graph_failed = True
            log.warning("%s: CUDA-graph capture of the step failed (%s); running the steps eagerly from now on", STEP_MODEL, e)
            return False
        self._graphs[key] = graph
        log.info("%s: captured the step into a CUDA graph for %s (%d graph(s) kept)", STEP_MODEL, dict(key.dims), len(self._graphs))
        return True

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
        """Free the graphs, the block and the engine (and its stream if it made one)."""
        for graph in self._graphs.values():
            graph.reset()
        self._graphs.clear()
        if self._block is not None:
            self._block.free()
            self._block = None
        self.layout = None
        self._schedule = None
        self._dims = None
        self._reserved = None
        self.engine.close()
