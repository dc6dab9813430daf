"""The assembler: which implementation runs each stage, decided once, when a pipeline loads.

From what the export folder holds (its manifest), what was opened for the chosen backend
(:mod:`trt_bgswap.runtime.loader`) and the stages the caller needs, :func:`assemble` builds
one object per stage:

========== ==================================================================================
masker     :class:`~.masker.Masker` (RMBG + host pre/post) or :class:`~.masker.DeviceMasker`
           (``rmbg_full``); opened on first use when the caller did not ask for masks
text       a :class:`~.conditioning.Conditioner` by the manifest's model family (:data:`CONDITIONERS`):
           SD1/SD2 one CLIP text encoder; SDXL two, plus the UNet's added conditions
generator  :class:`~.device_chain.DeviceChain` when TensorRT runs all three device graphs;
           else a :class:`~.generator.StageGenerator` of a VAE encoder (host or device graph),
           a denoiser (TensorRT device loop > fused step graph > host UNet loop) and a VAE
           decoder (host or device graph)
========== ==================================================================================

The pipeline only calls stages; adding a backend or a model family means adding stage
implementations and a rule here, not ``if`` chains in the pipeline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.families import SD1, SD2, SDXL, get_family
from trt_bgswap.manifest import InpaintConfig, Manifest
from trt_bgswap.runtime.conditioning import ClipConditioner, Conditioner, SdxlConditioner
from trt_bgswap.runtime.denoise import Denoiser, FusedStepDenoiser, HostDenoiser
from trt_bgswap.runtime.engine import Engine
from trt_bgswap.runtime.generator import Generator, StageGenerator
from trt_bgswap.runtime.masker import DeviceMasker, Masker, MaskStage
from trt_bgswap.runtime.ort_backend import OrtEngine
from trt_bgswap.runtime.residency import Residency
from trt_bgswap.runtime.text_encoder import TextEncoder
from trt_bgswap.runtime.tokenizer import ClipTokenizer
from trt_bgswap.runtime.trt_backend import TrtEngine
from trt_bgswap.runtime.vae import GraphVaeDecoder, GraphVaeEncoder, HostVaeDecoder, HostVaeEncoder, VaeDecoder, VaeEncoder
from trt_bgswap.specs import (
    DEVICE_GRAPH_REPLACES,
    DEVICE_GRAPHS,
    MASK_GRAPHS,
    RMBG,
    RMBG_FULL,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    UNET_STEP,
    VAE_DECODER,
    VAE_DECODER_IMAGE,
    VAE_ENCODER,
    VAE_ENCODER_SAMPLE,
)

log = logging.getLogger(__name__)

MASK_STAGE, GENERATE_STAGE = "mask", "generate"
STAGES = (MASK_STAGE, GENERATE_STAGE)


def check_stages(stages: Collection[str]) -> None:
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise UsageError(f"stages={sorted(stages)}: {unknown} unknown; choose from {list(STAGES)}")


def device_graphs_in(manifest: Manifest) -> list[str]:
    """The device graphs an export holds (the VAE pair counts only as a pair)."""
    have = [name for name in DEVICE_GRAPHS if name in manifest.models]
    if (VAE_ENCODER_SAMPLE in have) != (VAE_DECODER_IMAGE in have):
        pair = [n for n in (VAE_ENCODER_SAMPLE, VAE_DECODER_IMAGE) if n in have]
        raise ModelError(f"the export has only {pair} of the VAE device graphs; re-run `trt-bgswap export --device-graphs`")
    return have


def models_to_open(manifest: Manifest, device_graphs: bool, stages: Collection[str] = STAGES) -> list[str]:
    """The manifest's graphs a pipeline opens: device graphs replace their host graphs (or are left out), the fused
    step graph replaces the plain UNet (which would only take memory), and only the stages asked for."""
    check_stages(stages)
    graphs = device_graphs_in(manifest)
    if device_graphs:
        if not graphs:
            raise UsageError("device_graphs=True but this export has no device graphs; re-run `trt-bgswap export --device-graphs`")
        replaced = {DEVICE_GRAPH_REPLACES[g] for g in graphs}
        names = [n for n in manifest.models if n not in replaced]
    else:
        names = [n for n in manifest.models if n not in DEVICE_GRAPHS]
    if UNET_STEP in names:
        names = [n for n in names if n != UNET]
    return [n for n in names if (MASK_STAGE if n in MASK_GRAPHS else GENERATE_STAGE) in stages]


class LazyMasker:
    """A masker opened on first use (a pipeline loaded for generation only that is then asked for a mask)."""

    def __init__(self, opener: Callable[[], MaskStage]) -> None:
        self._opener: Callable[[], MaskStage] | None = opener
        self._masker: MaskStage | None = None

    def _get(self) -> MaskStage:
        if self._masker is None:
            assert self._opener is not None
            log.info("opening the masker on first use")
            self._masker = self._opener()
            self._opener = None
        return self._masker

    @property
    def engine(self) -> Engine:
        return self._get().engine

    def load(self) -> None:
        """Deferred by design: the masker opens when it is first used."""

    def predict(self, rgb: Any) -> Any:
        return self._get().predict(rgb)

    def predict_batch(self, images: Any) -> Any:
        return self._get().predict_batch(images)

    def close(self) -> None:
        if self._masker is not None:
            self._masker.close()
        self._opener = None


@dataclass
class Stages:
    """One object per stage, and the engines they run on (for the backend report and the benchmarks)."""

    masker: MaskStage | None = None
    text_encoder: TextEncoder | None = None  # the (first) text encoder, also inside the conditioner
    conditioner: Conditioner | None = None
    generator: Generator | None = None
    engines: dict[str, Engine] = field(default_factory=dict)
    missing: tuple[str, ...] = ()  # inpainting graphs the export lacks, for the error a prompt gets
    on_close: list[Callable[[], None]] = field(default_factory=list)  # shared resources (the CUDA stream), last
    residency: Residency | None = None  # --low-memory: sessions open while their stage runs

    def load(self) -> None:
        """Deserialize every engine now (a server's first request must not pay for it).

        ONNX Runtime sessions open in parallel: building a session (reading weights, optimizing
        the graph, pre-packing GEMM weights) runs in C++ with the GIL released. Under
        ``--low-memory`` they open when their stage runs instead.
        """
        for stage in (self.masker, self.conditioner, self.generator):
            if stage is not None and hasattr(stage, "load"):
                stage.load()
        parallel = [e for e in self.engines.values() if isinstance(e, OrtEngine)]
        for engine in self.engines.values():
            if not isinstance(engine, OrtEngine):
                engine.load()  # TensorRT engines share a stream and activation block: one at a time
        workers = min(len(parallel), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        if workers <= 1:
            for engine in parallel:
                engine.load()
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="open-session") as pool:
            for future in [pool.submit(engine.load) for engine in parallel]:
                future.result()  # the first failure is raised; the caller closes what opened

    def backends(self) -> dict[str, str]:
        names = {k: e.backend for k, e in self.engines.items()}
        if self.generator is not None:
            names["generator"] = self.generator.backend
        return names

    def close(self) -> None:
        for stage in (self.masker, self.conditioner, self.generator):
            if stage is not None:
                stage.close()
        for engine in self.engines.values():
            engine.close()
        for close in self.on_close:
            close()
        self.on_close.clear()
        self.masker = self.text_encoder = self.conditioner = self.generator = None


def _masker(manifest: Manifest, engines: Mapping[str, Engine]) -> MaskStage | None:
    if RMBG_FULL in engines:
        return DeviceMasker(engines[RMBG_FULL])
    if RMBG in engines and manifest.rmbg is not None:
        return Masker(engines[RMBG], manifest.rmbg)
    return None


def _vae(cfg: InpaintConfig, engines: Mapping[str, Engine]) -> tuple[VaeEncoder | None, VaeDecoder | None]:
    encoder: VaeEncoder | None = None
    decoder: VaeDecoder | None = None
    if VAE_ENCODER_SAMPLE in engines:
        encoder = GraphVaeEncoder(engines[VAE_ENCODER_SAMPLE])
    elif VAE_ENCODER in engines:
        encoder = HostVaeEncoder(engines[VAE_ENCODER], cfg)
    if VAE_DECODER_IMAGE in engines:
        decoder = GraphVaeDecoder(engines[VAE_DECODER_IMAGE])
    elif VAE_DECODER in engines:
        decoder = HostVaeDecoder(engines[VAE_DECODER], cfg)
    return encoder, decoder


def _denoiser(engines: Mapping[str, Engine], use_cuda_graph: bool) -> Denoiser | None:
    step = engines.get(UNET_STEP)
    if isinstance(step, TrtEngine):
        from trt_bgswap.runtime.trt_loop import TrtStepLoop

        return TrtStepLoop(step.spec, step.path, stream=step.stream, use_cuda_graph=use_cuda_graph, shared_activations=step.shared)
    if step is not None:
        return FusedStepDenoiser(step)
    if UNET in engines:
        return HostDenoiser(engines[UNET])
    return None


def _clip_conditioner(encoders: Mapping[str, TextEncoder], cfg: InpaintConfig) -> Conditioner | None:
    return ClipConditioner(encoders[TEXT_ENCODER]) if TEXT_ENCODER in encoders else None


def _sdxl_conditioner(encoders: Mapping[str, TextEncoder], cfg: InpaintConfig) -> Conditioner | None:
    if TEXT_ENCODER not in encoders or TEXT_ENCODER_2 not in encoders:
        return None
    return SdxlConditioner(encoders[TEXT_ENCODER], encoders[TEXT_ENCODER_2], cfg)


# The text stage of each model family (trt_bgswap.families): a new family adds a row here, not an `if` in the pipeline.
CONDITIONERS: dict[str, Callable[[Mapping[str, TextEncoder], InpaintConfig], Conditioner | None]] = {
    SD1: _clip_conditioner,
    SD2: _clip_conditioner,
    SDXL: _sdxl_conditioner,
}


def assemble(
    manifest: Manifest,
    engines: Mapping[str, Engine],
    tokenizer: ClipTokenizer | None,
    *,
    tokenizer_2: ClipTokenizer | None = None,
    lazy_masker: Callable[[], MaskStage] | None = None,
    use_cuda_graph: bool = True,
    residency: Residency | None = None,
) -> Stages:
    """The stages for the opened ``engines`` (unloaded); each engine goes to exactly one stage.

    ``tokenizer_2``: the second text encoder's tokenizer (SDXL exports).
    ``residency`` (``--low-memory``): host engines open while their stage runs; TensorRT engines
    keep theirs (the device loop and chain hold their own engines and CUDA graphs).
    """
    engines = dict(engines)
    if residency is not None:
        engines.update(residency.manage({n: e for n, e in engines.items() if not isinstance(e, TrtEngine)}))
    stages = Stages(masker=_masker(manifest, engines) or (LazyMasker(lazy_masker) if lazy_masker is not None else None), residency=residency)
    direct = {n: e for n, e in engines.items() if n in MASK_GRAPHS}
    encoders: dict[str, TextEncoder] = {}
    for name, tok in ((TEXT_ENCODER, tokenizer), (TEXT_ENCODER_2, tokenizer_2)):
        if name in engines and tok is not None:
            encoders[name] = TextEncoder(engines[name], tok)
            direct[name] = engines[name]
    stages.text_encoder = encoders.get(TEXT_ENCODER)
    cfg = manifest.inpaint
    if cfg is not None:
        family = get_family(cfg.family)
        stages.conditioner = CONDITIONERS[family.name](encoders, cfg)
    if cfg is None:
        stages.engines = direct
        return stages
    chain_parts = [engines.get(n) for n in (VAE_ENCODER_SAMPLE, UNET_STEP, VAE_DECODER_IMAGE)]
    if all(isinstance(e, TrtEngine) for e in chain_parts):
        from trt_bgswap.runtime.device_chain import device_chain_for

        encoder, step, decoder = chain_parts
        stages.generator = device_chain_for(encoder, step, decoder, cfg, use_cuda_graph=use_cuda_graph)  # type: ignore[arg-type]
        direct.update({VAE_ENCODER_SAMPLE: encoder, VAE_DECODER_IMAGE: decoder})  # type: ignore[dict-item]
    else:
        encoder, decoder = _vae(cfg, engines)
        denoiser = _denoiser(engines, use_cuda_graph)
        if encoder is not None and denoiser is not None and decoder is not None:
            stages.generator = StageGenerator(encoder, denoiser, decoder)
            direct.update({n: e for n, e in engines.items() if n not in MASK_GRAPHS and n not in encoders and not (n == UNET_STEP and isinstance(e, TrtEngine))})
        else:
            want = {"VAE encoder": encoder, "denoising UNet": denoiser, "VAE decoder": decoder}
            stages.missing = tuple(k for k, v in want.items() if v is None)
    if stages.conditioner is None:
        stages.missing = (*stages.missing, "text encoder")
    stages.engines = direct
    return stages
