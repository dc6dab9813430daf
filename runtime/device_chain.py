"""The generation chain kept on the GPU: masked image in, final image out, one download.

With the device graphs of an export (``export --device-graphs``,
:mod:`trt_bgswap.export.device_graphs`) the host arithmetic between the VAE, the
denoising loop and RMBG lives inside the graphs, so on TensorRT the data can stay on
the device from the first upload to the final image:

1. upload the preprocessed masked image and the posterior's ``eps`` into
   ``vae_encoder_sample``; run it;
2. its ``masked_image_latents`` go device-to-device into the fused step graph's input;
   :meth:`TrtStepLoop.run_on_device` runs the whole LCM loop (noise, schedule, latent
   mask and text embeddings uploaded once) and returns the final latents' address;
3. those go device-to-device into ``vae_decoder_image``; run it;
4. only the image (NCHW float32 in [0, 1]) comes back: one device-to-host copy.

Every decision (the dims of each engine, that linked tensors have the same size, the
copies a generation makes) is a plain function (:func:`chain_plan`) tested on CPU;
:class:`DeviceChain` only executes it. The same graphs run on ONNX Runtime through the
ordinary engine interface and :class:`~trt_bgswap.runtime.generator.StageGenerator`
(``Pipeline.load(..., device_graphs=True)``), which proves the chain end to end on CPU.
Importable without ``tensorrt``/``cuda-python``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.manifest import InpaintConfig
from trt_bgswap.runtime.cuda_device import Stream
from trt_bgswap.runtime.denoise import schedule_of
from trt_bgswap.runtime.generator import GenerationInputs
from trt_bgswap.runtime.scheduler import LCMScheduler
from trt_bgswap.runtime.trt_backend import TrtEngine
from trt_bgswap.runtime.trt_loop import STEP_INPUTS, StepEngine, TrtStepLoop
from trt_bgswap.runtime.vae import image_hwc
from trt_bgswap.specs import UNET_STEP, VAE_DECODER_IMAGE, VAE_ENCODER_SAMPLE, ModelSpec, StepIO, VaeDecoderImageIO, VaeEncoderSampleIO, pipeline_dims

log = logging.getLogger(__name__)

ENCODER, DECODER, STEP_MODEL = VAE_ENCODER_SAMPLE, VAE_DECODER_IMAGE, UNET_STEP
HTOD, DTOD, DTOH = "HtoD", "DtoD", "DtoH"


# --- the plan: plain Python, tested on CPU -------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    model: str
    tensor: str


@dataclass(frozen=True)
class Link:
    """One engine's output copied device-to-device into another engine's input."""

    src: Endpoint
    dst: Endpoint
    nbytes: int


@dataclass(frozen=True)
class ChainPlan:
    """What one generation moves where: uploads, device-to-device links, downloads, and every engine's dims."""

    dims: Mapping[str, Mapping[str, int]]
    uploads: tuple[Endpoint, ...]  # host -> device, once per generation
    links: tuple[Link, ...]
    downloads: tuple[Endpoint, ...]

    def copies(self, schedule_changed: bool, steps: int) -> dict[str, int]:
        """cudaMemcpy counts of one generation (the loop also uploads its schedule when it changed, and copies each step's rows in)."""
        return {HTOD: len(self.uploads) + int(schedule_changed), DTOD: len(self.links) + steps * len(STEP_INPUTS), DTOH: len(self.downloads)}


LINKED_INPUT = StepIO.MASKED_IMAGE_LATENTS  # the step graph's input the encoder's output feeds on the device
# The loop's own uploads (trt_loop.TrtStepLoop): its conditioning inputs except the linked one, and the noise block.
LOOP_HOST_INPUTS = tuple(n for n in StepIO.CONDITIONING if n != LINKED_INPUT)
LOOP_NOISE = "noise rows"  # the noise block (initial latents + step noise), one upload
FINAL_LATENTS = StepIO.PREV_LATENTS  # where the loop leaves the final latents (the last step's output row)
ENCODER_HOST_INPUTS = (VaeEncoderSampleIO.SAMPLE, VaeEncoderSampleIO.EPS)  # the masked image and the posterior draw


def chain_plan(specs: Mapping[str, ModelSpec], cfg: InpaintConfig, height: int, width: int, guided: bool) -> ChainPlan:
    """The generation chain at ``height`` x ``width``; refuses graphs whose linked tensors differ in size or dtype."""
    for name in (ENCODER, STEP_MODEL, DECODER):
        if name not in specs:
            raise ModelError(f"the device chain needs the {name!r} graph; re-run `trt-bgswap export --fused-step --device-graphs`")
    size = pipeline_dims(1, height, width, cfg.vae_scale_factor)
    latent = {"h": size["h"], "w": size["w"]}
    dims = {ENCODER: size, STEP_MODEL: {"B": 2 if guided else 1, **latent}, DECODER: size}
    links = []
    for src, dst in (
        (Endpoint(ENCODER, VaeEncoderSampleIO.LATENTS), Endpoint(STEP_MODEL, LINKED_INPUT)),
        (Endpoint(STEP_MODEL, FINAL_LATENTS), Endpoint(DECODER, VaeDecoderImageIO.LATENTS)),
    ):
        a, b = specs[src.model].tensor(src.tensor), specs[dst.model].tensor(dst.tensor)
        na = a.nbytes(dims[src.model])
        if (a.dtype, a.resolve(dims[src.model])) != (b.dtype, b.resolve(dims[dst.model])):
            raise ModelError(
                f"{src.model}.{src.tensor} is {a.dtype}{a.resolve(dims[src.model])} but {dst.model}.{dst.tensor} takes "
                f"{b.dtype}{b.resolve(dims[dst.model])}; export the graphs together (`trt-bgswap export --fused-step --device-graphs`)"
            )
        links.append(Link(src, dst, na))
    uploads = (
        *(Endpoint(ENCODER, n) for n in ENCODER_HOST_INPUTS),
        *(Endpoint(STEP_MODEL, n) for n in LOOP_HOST_INPUTS),
        Endpoint(STEP_MODEL, LOOP_NOISE),
    )
    return ChainPlan(dims, uploads, tuple(links), (Endpoint(DECODER, VaeDecoderImageIO.IMAGE),))


def same_stream(*streams: Stream) -> bool:
    """Chained engines must share one stream: that alone orders a copy after the run that produced its source."""
    return all(s is streams[0] for s in streams)


# --- the execution: thin TensorRT / CUDA -------------------------------------------------------


class DeviceFedStepEngine(StepEngine):
    """The step engine, with inputs that can come from another engine's device buffer instead of the host."""

    # input name -> device address its data is copied from; DeviceChain sets a new mapping per generation
    device_feeds: Mapping[str, int] = MappingProxyType({})

    def upload(self, name: str, array: np.ndarray) -> None:
        ptr = self.device_feeds.get(name)
        if ptr is None:
            super().upload(name, array)
        else:
            self.feed_from_device(name, ptr)


class ChainedStepLoop(TrtStepLoop):
    """:class:`TrtStepLoop` whose conditioning inputs can be fed device-to-device (the encoder's latents)."""

    engine_class = DeviceFedStepEngine


class DeviceChain:
    """vae_encoder_sample -> the LCM loop -> vae_decoder_image on TensorRT, on one stream, one download."""

    max_batch = 1  # the loop's step graph takes one generation at a time

    def __init__(self, encoder: TrtEngine, loop: ChainedStepLoop, decoder: TrtEngine, cfg: InpaintConfig) -> None:
        self.encoder, self.loop, self.decoder, self.cfg = encoder, loop, decoder, cfg
        self.last_plan: ChainPlan | None = None
        self._warm = False

    @property
    def backend(self) -> str:
        return f"{self.loop.engine.backend} (device chain)"

    def load(self) -> None:
        self.encoder.load()
        self.decoder.load()
        self.loop.load()
        if not same_stream(self.encoder.stream, self.loop.stream, self.decoder.stream):
            raise UsageError("the device chain's engines run on different CUDA streams; open them with one stream (runtime.loader does)")
        if not self._warm:
            self.loop.warm_up()  # the step graphs are captured at load, not on the first request
            self._warm = True

    def generate(self, scheduler: LCMScheduler, inputs: GenerationInputs) -> np.ndarray:
        """The whole generation on the device; returns the float32 (1, H, W, 3) image in [0, 1] (one download)."""
        coefficients = schedule_of(scheduler)
        self.load()
        _, _, height, width = inputs.masked_image.shape
        specs = {ENCODER: self.encoder.spec, STEP_MODEL: self.loop.engine.spec, DECODER: self.decoder.spec}
        plan = chain_plan(specs, self.cfg, height, width, inputs.embeddings.shape[0] == 2)
        _allocate(self.encoder, plan.dims[ENCODER])
        host = {VaeEncoderSampleIO.SAMPLE: np.ascontiguousarray(inputs.masked_image, dtype=np.float32), VaeEncoderSampleIO.EPS: np.ascontiguousarray(inputs.eps, dtype=np.float32)}
        for endpoint in plan.uploads:
            if endpoint.model == ENCODER:
                self.encoder.upload(endpoint.tensor, host[endpoint.tensor])
        self.encoder.run()
        link_in, link_out = plan.links
        # the encoder's output is copied on the device; the host array only gives the loop its shape
        denoise = inputs.denoise_inputs(np.zeros(inputs.latents.shape, dtype=np.float32))
        self.loop.engine.device_feeds = {link_in.dst.tensor: self.encoder.device_ptr(link_in.src.tensor)}
        try:
            final = self.loop.run_on_device(coefficients, denoise)
        finally:
            self.loop.engine.device_feeds = {}
        _allocate(self.decoder, plan.dims[DECODER])
        self.decoder.feed_from_device(link_out.dst.tensor, final)
        self.decoder.run()
        self.last_plan = plan
        return image_hwc(self.decoder.download(plan.downloads[0].tensor))

    def close(self) -> None:
        """The loop (its graph, block and engine), then the encoder and decoder engines."""
        self.loop.close()
        self.encoder.close()
        self.decoder.close()


def _allocate(engine: TrtEngine, dims: Mapping[str, int]) -> None:
    """(Re)allocate only when the shapes change: allocation invalidates the engine's buffers and CUDA graph."""
    if engine._dims != dict(dims):
        engine.allocate(dims)


def device_chain_for(encoder: TrtEngine, step: TrtEngine, decoder: TrtEngine, cfg: InpaintConfig, use_cuda_graph: bool = True) -> DeviceChain:
    """The device chain over opened TensorRT engines (they share one stream; the loop reuses the step engine's)."""
    loop = ChainedStepLoop(step.spec, step.path, stream=step.stream, use_cuda_graph=use_cuda_graph, shared_activations=step.shared)
    return DeviceChain(encoder, loop, decoder, cfg)
