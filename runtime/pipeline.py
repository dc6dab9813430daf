"""The lean background-replacement loop: mask -> inpaint -> composite, numpy + an engine backend.

The inpainting part reproduces diffusers' ``StableDiffusionInpaintPipeline``
(9-channel UNet) with ``LCMScheduler`` step for step:

1. resize image and mask to the generation size as ``VaeImageProcessor`` does
   (Lanczos; the mask binarised at 0.5), masked image = image * (mask < 0.5);
2. latent mask = the binary mask resized to latent size with nearest
   neighbour (``torch.nn.functional.interpolate``'s default);
3. masked-image latents = (mean + std * eps) * scaling_factor of the VAE
   posterior, with ``eps`` given (diffusers samples it from its generator);
4. initial latents = noise * init_noise_sigma; per step, the UNet sees
   [latents, mask, masked-image latents] on the channel axis, with
   classifier-free guidance (batch order [uncond, cond]) only when guidance > 1;
5. the LCM step injects the given per-step noise on every non-final step;
6. decode latents / scaling_factor and map [-1, 1] to [0, 1].

All randomness is explicit (:class:`Noise`), so the same seed gives the same
image and a test can hand diffusers the very same draws.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.manifest import InpaintConfig, Manifest
from trt_bgswap.runtime.assemble import GENERATE_STAGE, MASK_STAGE, STAGES, Stages, assemble, check_stages, device_graphs_in, models_to_open
from trt_bgswap.runtime.backends import Availability
from trt_bgswap.runtime.color_management import ColorSpace
from trt_bgswap.runtime.compose import CompositeOptions, compose, refine_masker_alpha
from trt_bgswap.runtime.composite import solid_background, upscale_background
from trt_bgswap.runtime.conditioning import Conditioning
from trt_bgswap.runtime.engine import Engine
from trt_bgswap.runtime.generator import GenerationInputs
from trt_bgswap.runtime.jobs import GenerationJob, GenerationKey, GenerationOptions, Noise, Result
from trt_bgswap.runtime.guided_filter import Refinement
from trt_bgswap.runtime.mask_ops import MaskOptions, inpaint_mask, refine_alpha
from trt_bgswap.runtime.masker import Masker, MaskStage
from trt_bgswap.runtime.preprocess import inpaint_inputs
from trt_bgswap.runtime.residency import Residency, residency_for
from trt_bgswap.runtime.scheduler import LCMScheduler
from trt_bgswap.runtime.sizing import check_generation_size, generation_size
from trt_bgswap.runtime.tokenizer import ClipTokenizer
from trt_bgswap.specs import RMBG, pipeline_dims

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from trt_bgswap.runtime.memory_guard import SizeGuard

__all__ = ["GENERATE_STAGE", "MASK_STAGE", "STAGES", "GenerationJob", "GenerationOptions", "Noise", "Pipeline", "Result"]

@dataclass
class _Prepared:
    """One generation's host inputs at its size: what the generator stacks with others of the same key."""

    key: GenerationKey
    masked: np.ndarray  # (1, 3, H, W) in [-1, 1], the subject blanked
    latent_mask: np.ndarray  # (1, 1, h, w)
    noise: Noise
    cond: Conditioning  # one row: hidden states (1, S, D) and the family's added conditions
    uncond: Conditioning | None  # with guidance
    photo_pixels: int = 0  # the photo's own arrays stay alive while it generates (memory_guard)


class Pipeline:
    """Loads an exported folder once; replaces backgrounds for many images.

    Thread-safe: every call (``mask``, ``text_embeddings``, ``inpaint``, ``replace``) holds one
    lock, since the stages share engine buffers and the scheduler's state; run several
    Pipelines for parallel throughput.
    """

    def __init__(self, manifest: Manifest, stages: Stages, memory: "SizeGuard | None" = None) -> None:
        self.manifest = manifest
        self.stages = stages
        self.memory = memory  # what a size costs in host memory; None on GPUs (an UnmeasuredGuard for exports without memory facts)
        self.config: InpaintConfig | None = manifest.inpaint
        self.scheduler = LCMScheduler.from_config(self.config.scheduler) if self.config else None
        self._lock = threading.RLock()
        self._closed = False

    # --- construction ---

    @classmethod
    def load(
        cls,
        folder: str | Path,
        provider: str = "auto",
        threads: int = 0,
        engines: Mapping[str, Engine] | None = None,
        device_graphs: bool | None = None,
        stages: Collection[str] = STAGES,
        facts: Availability | None = None,
        low_memory: "bool | int | Residency" = False,
        memory_budget: int | None = None,
    ) -> "Pipeline":
        """Open an exported folder on a backend, using `trt-bgswap build`'s engines when present.

        ``provider``: ``auto`` (TensorRT engines, then ONNX Runtime CUDA, then CPU), ``trt``,
        ``tensorrt`` / ``cuda`` (ONNX Runtime execution providers) or ``cpu``; ``facts``: what
        the machine offers (probed when None). ``device_graphs``: run the export's device graphs
        (VAE and RMBG with their pre/post-processing inside); None does so on TensorRT when the
        export has them. ``stages``: the work this pipeline does (``mask``, ``generate``): the
        other stage's models are not opened (a solid-colour run opens no UNet), and a masker
        left out opens on first use. ``engines`` overrides models with engines the caller made.
        ``low_memory``: True opens each model's session only while its stage runs (one at a time);
        a number of bytes keeps the most recently used sessions that fit it (:mod:`~.residency`).
        ``memory_budget``: the most host memory a generation may take (bytes; default
        ``TRT_BGSWAP_MEMORY_BUDGET``, else what is free): larger sizes are refused, the default shrinks.
        """
        from trt_bgswap.runtime.loader import open_engines, resolve_backend

        check_stages(stages)
        folder = Path(folder)
        manifest = Manifest.load(folder)
        choice = resolve_backend(provider, facts)
        if device_graphs is None:
            device_graphs = choice.engine == "trt" and bool(device_graphs_in(manifest))
        names = models_to_open(manifest, device_graphs, stages)
        residency = residency_for(low_memory)  # one budget for every session, the lazily opened masker's too
        from trt_bgswap.runtime.memory_guard import MemoryGuard

        resident = residency.budget if residency is not None else None  # --low-memory: fewer weights resident at once
        memory = MemoryGuard.for_folder(folder, choice, names, manifest, memory_budget, resident_budget=resident)  # before any graph is opened
        opened = open_engines(folder, manifest, choice, threads, names=names)
        replaced = {k: e for k, e in (engines or {}).items() if k in opened.engines}
        for k in replaced:
            opened.engines[k].close()
        opened.engines.update(engines or {})
        tokenizer = tokenizer_2 = None
        if manifest.inpaint is not None and GENERATE_STAGE in stages:
            tokenizer = ClipTokenizer.from_dir(folder / manifest.inpaint.tokenizer_dir)
            if manifest.inpaint.tokenizer_2_dir is not None:
                tokenizer_2 = ClipTokenizer.from_dir(folder / manifest.inpaint.tokenizer_2_dir)

        def open_masker() -> MaskStage | None:
            return cls.load(
                folder, provider, threads, device_graphs=device_graphs, stages=(MASK_STAGE,), facts=facts, memory_budget=memory_budget,
                low_memory=residency or False,
            ).stages.masker

        lazy = open_masker if MASK_STAGE not in stages and any(n in manifest.models for n in models_to_open(manifest, device_graphs, (MASK_STAGE,))) else None
        assembled = assemble(manifest, opened.engines, tokenizer, tokenizer_2=tokenizer_2, lazy_masker=lazy, residency=residency)
        assembled.on_close.append(lambda: [r.close() for r in opened.shared])
        try:
            assembled.load()
        except BaseException:
            assembled.close()
            raise
        log.info("loaded %s (%s): %s", folder, choice.name, ", ".join(f"{k}={b}" for k, b in assembled.backends().items()))
        return cls(manifest, assembled, memory)

    @classmethod
    def from_engines(
        cls,
        manifest: Manifest,
        engines: Mapping[str, Engine],
        tokenizer: ClipTokenizer | None,
        low_memory: bool | int = False,
        tokenizer_2: ClipTokenizer | None = None,
    ) -> "Pipeline":
        """A pipeline over engines the caller opened (the benchmark's timed engines), assembled by the same rules."""
        stages = assemble(manifest, engines, tokenizer, tokenizer_2=tokenizer_2, residency=residency_for(low_memory))
        stages.load()
        return cls(manifest, stages)

    @classmethod
    def without_models(cls) -> "Pipeline":
        """A pipeline that opens nothing: solid colours behind the caller's own masks."""
        return cls(Manifest(precision="none", opset=None, models={}, inpaint=None, rmbg=None), Stages())

    @classmethod
    def with_masker(cls, masker: Masker) -> "Pipeline":
        """A pipeline around a masker opened on its own (an RMBG .onnx file): masks and solid colours."""
        return cls(Manifest(precision="none", opset=None, models={}, inpaint=None, rmbg=masker.cfg), Stages(masker=masker, engines={RMBG: masker.engine}))

    # --- lifecycle ---

    def close(self) -> None:
        """Free every session, engine, device buffer and CUDA graph; the pipeline cannot be used afterwards."""
        with self._lock:
            self.stages.close()
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this pipeline was closed; load the models again (Pipeline.load / BackgroundReplacer(...))")

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- stages ---

    @property
    def engines(self) -> dict[str, Engine]:
        return self.stages.engines

    @property
    def can_mask(self) -> bool:
        """Whether this pipeline has (or opens on first use) a masker; a closed pipeline says it is closed."""
        self._check_open()
        return self.stages.masker is not None

    def _inpaint_config(self) -> InpaintConfig:
        self._check_open()
        if self.config is None or self.stages.generator is None or self.stages.conditioner is None:
            what = list(self.stages.missing) or ["the inpainting config"]
            raise ModelError(f"this model folder has no inpainting models ({', '.join(what)} missing); re-run `trt-bgswap export --inpaint ...`")
        return self.config

    def mask(self, rgb: np.ndarray) -> np.ndarray:
        """RMBG's soft alpha (float32 HxW in [0,1]) for an RGB uint8 image."""
        self._check_open()
        if self.stages.masker is None:
            raise ModelError("this model folder has no RMBG model; re-run `trt-bgswap export --rmbg ...` or pass a mask")
        with self._lock:
            return self.stages.masker.predict(rgb)

    def text_embeddings(self, prompt: str) -> np.ndarray:
        """(1, S, D) encoder hidden states for a prompt, cached (the same prompt is encoded once)."""
        return self.conditioning(prompt, (self._inpaint_config().default_size,) * 2).hidden  # type: ignore[arg-type]

    def conditioning(self, prompt: str, size: tuple[int, int], negative: bool = False) -> Conditioning:
        """One row of what the UNet is conditioned on for a prompt (or a negative prompt) at a (width, height)."""
        self._inpaint_config()
        assert self.stages.conditioner is not None
        with self._lock:
            conditioner = self.stages.conditioner
            return conditioner.negative(prompt, size) if negative else conditioner.prompt(prompt, size)

    def generation_size_for(self, width: int, height: int, options: GenerationOptions) -> tuple[int, int]:
        """The size to generate a ``width`` x ``height`` photo at; an explicit size that does not fit in memory is refused,
        the policy's own size shrinks (same aspect) until it fits."""
        cfg = self._inpaint_config()
        if options.size is not None:
            check_generation_size(options.size[0], options.size[1], cfg.size_multiple)
            if self.memory is not None:
                self.memory.check(options.size, options.guidance, width * height)
            return options.size
        size = generation_size(width, height, cfg.default_size, cfg.size_multiple)
        return self.memory.fit(size, options.guidance, width * height) if self.memory is not None else size

    def generation_key(self, width: int, height: int, options: GenerationOptions) -> GenerationKey:
        """Generations with equal keys have equal latent shapes and schedules: their UNet calls stack."""
        gw, gh = self.generation_size_for(width, height, options)
        return (gw, gh, options.steps, options.guidance)

    def _prepare(self, rgb: np.ndarray, repaint: np.ndarray, options: GenerationOptions, noise: Noise | None) -> _Prepared:
        """The host work before the engines: sizes, noise, diffusers' input preparation, the prompts' embeddings."""
        cfg = self._inpaint_config()
        options.validate()
        key = self.generation_key(rgb.shape[1], rgb.shape[0], options)
        width, height = key[:2]
        dims = pipeline_dims(1, height, width, cfg.vae_scale_factor)
        shape = (1, cfg.latent_channels, dims["h"], dims["w"])
        if noise is None:
            seed = options.seed if options.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
            noise = Noise.from_seed(seed, shape, options.steps)
        noise.check(shape, options.steps)
        masked, latent_mask = inpaint_inputs(rgb, repaint, width, height, (dims["h"], dims["w"]))
        guided = options.guidance > 1.0  # classifier-free guidance: diffusers' batch order [uncond, cond]
        uncond = self.conditioning(options.negative_prompt, (width, height), negative=True) if guided else None
        return _Prepared(key, masked, latent_mask, noise, self.conditioning(options.prompt, (width, height)), uncond, rgb.shape[0] * rgb.shape[1])

    def _generate(self, preps: Sequence[_Prepared]) -> list[np.ndarray]:
        """The generated images of prepared jobs that share one key: stacked as far as the generator allows."""
        assert self.scheduler is not None and self.stages.generator is not None
        generator = self.stages.generator
        (width, height, steps, guidance), *others = {p.key for p in preps}
        if others:
            raise UsageError(f"jobs of different sizes/steps/guidance {sorted({p.key for p in preps})}; group them by generation_key")
        self.scheduler.set_timesteps(steps)
        sigma = np.float32(self.scheduler.init_noise_sigma)
        step = generator.max_batch or len(preps)
        if self.memory is not None:  # as many generations stacked as fit in memory (one does: each was checked alone)
            step = self.memory.stackable((width, height), guidance, step, max(p.photo_pixels for p in preps))
        images: list[np.ndarray] = []
        for start in range(0, len(preps), step):
            part = preps[start : start + step]
            uncond = [p.uncond for p in part if p.uncond is not None]
            rows = Conditioning.stack([*uncond, *(p.cond for p in part)])  # [uncond_1..N, cond_1..N] with guidance
            inputs = GenerationInputs(
                masked_image=np.concatenate([p.masked for p in part]),
                eps=np.concatenate([p.noise.posterior for p in part]),
                latents=np.concatenate([p.noise.latents for p in part]).astype(np.float32) * sigma,
                step_noise=tuple(np.concatenate([p.noise.steps[i] for p in part]) for i in range(steps - 1)),
                latent_mask=np.concatenate([p.latent_mask for p in part]),
                embeddings=rows.hidden,
                guidance=guidance,
                added=rows.added,
            )
            images.extend(generator.generate(self.scheduler, inputs))
        return images

    def inpaint(self, rgb: np.ndarray, mask_u8: np.ndarray, options: GenerationOptions, noise: Noise | None = None) -> np.ndarray:
        """Repaint where ``mask_u8`` is 255; float32 hxwx3 in [0,1] at the generation size."""
        with self._lock:
            return self._generate([self._prepare(rgb, mask_u8, options, noise)])[0]

    def mask_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """RMBG's soft alpha for several sRGB photos, in one engine call where the masker allows."""
        if self.stages.masker is None:
            raise ModelError("this model folder has no RMBG model; re-run `trt-bgswap export --rmbg ...` or pass a mask")
        with self._lock:
            return self.stages.masker.predict_batch(list(images))

    def replace(
        self,
        rgb: np.ndarray,
        options: GenerationOptions | None = None,
        mask_options: MaskOptions | None = None,
        alpha: np.ndarray | None = None,
        background_color: tuple[int, int, int] | None = None,
        noise: Noise | None = None,
        color_space: ColorSpace | None = None,
        composite_options: CompositeOptions | None = None,
        from_masker: bool = False,
    ) -> Result:
        """The whole job for one image: mask (or the given alpha), new background, composite.

        ``color_space``: the photo's ICC space; the masker and the generation see the photo in
        sRGB, and the new background (solid or generated, both sRGB) is converted into the
        photo's space before the subject is put back, so the output keeps the photo's profile.
        ``composite_options``: edges, alpha refinement (of the masker's alpha only), grain, light, shadow;
        ``from_masker``: the ``alpha`` given is RMBG's (a caller that batched the masks), refined as the masker's own.
        """
        self._check_open()
        _check_rgb(rgb)
        cs = color_space or ColorSpace()
        if options is not None and background_color is None:  # size and memory are settled before any work on the image
            options = dataclasses.replace(options, size=self.generation_size_for(rgb.shape[1], rgb.shape[0], options))
        mask_options = mask_options or MaskOptions()
        composite_options = composite_options or CompositeOptions()
        composite_options.validate()
        if alpha is None:
            alpha, from_masker = self.mask(cs.to_srgb(rgb)), True
        if background_color is not None:
            model_rgb = cs.to_srgb(rgb)
            alpha, refinement = self.refine_masker_alpha(model_rgb, alpha, composite_options) if from_masker else (alpha, None)
            a = _compositing_alpha(rgb, alpha, mask_options)
            h, w = rgb.shape[:2]
            out, report = compose(rgb, solid_background(cs.color_from_srgb(background_color), w, h), a, composite_options)
            log.debug("%s", report.summary())
            return Result(out, a, inpaint_mask(a, mask_options), None, None, None, self.backends(), dataclasses.replace(report, refinement=refinement))
        if options is None:
            raise UsageError("give a prompt (GenerationOptions) or a background colour")
        job = GenerationJob(rgb, alpha, options, mask_options, cs, noise, composite_options, from_masker=from_masker)
        return self.replace_batch([job])[0]

    def replace_batch(self, jobs: Sequence[GenerationJob]) -> list[Result]:
        """Generated backgrounds for several jobs of one :meth:`generation_key`, their UNet calls stacked; each result
        is what the job gets alone wherever the backend computes a batch row as it computes it alone (ONNX Runtime's
        CPU kernels do; the server checks it on the loaded engines at warm-up)."""
        results: list[Result] = []
        with self._lock:
            prepared = []
            for job in jobs:
                _check_rgb(job.rgb)
                job.composite_options.validate()
                cs = job.color_space or ColorSpace()
                model_rgb = cs.to_srgb(job.rgb)
                alpha, refinement = self.refine_masker_alpha(model_rgb, job.alpha, job.composite_options) if job.from_masker else (job.alpha, None)
                a = _compositing_alpha(job.rgb, alpha, job.mask_options)
                repaint = inpaint_mask(a, job.mask_options)
                options = job.options
                if options.seed is None and job.noise is None:
                    options = dataclasses.replace(options, seed=int(np.random.SeedSequence().entropy % 2**63))
                prepared.append((job, cs, a, repaint, options, refinement, self._prepare(model_rgb, repaint, options, job.noise)))
            generated = self._generate([p[-1] for p in prepared])
        for (job, cs, a, repaint, options, refinement, prep), image in zip(prepared, generated):
            h, w = job.rgb.shape[:2]
            seed = options.seed if job.noise is None else None
            # the generation's seed seeds the grain (0 when the caller handed the noise in)
            out, report = compose(job.rgb, cs.from_srgb(upscale_background(image, w, h)), a, job.composite_options, seed=seed or 0)
            log.debug("%s", report.summary())
            results.append(Result(out, a, repaint, image, seed, prep.key[:2], self.backends(), dataclasses.replace(report, refinement=refinement)))
        return results

    def refine_masker_alpha(self, rgb: np.ndarray, alpha: np.ndarray, options: CompositeOptions) -> tuple[np.ndarray, Refinement | None]:
        """The masker's alpha sharpened at full resolution along the photo's edges, when ``options.refine_alpha``."""
        if self.manifest.rmbg is None:
            return alpha, None
        return refine_masker_alpha(rgb, alpha, self.manifest.rmbg.input_size, options)

    def backends(self) -> dict[str, str]:
        return self.stages.backends()


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise UsageError(f"image array must be uint8 HxWx3 RGB, got {getattr(rgb, 'dtype', type(rgb).__name__)} {getattr(rgb, 'shape', '')}")


def _compositing_alpha(rgb: np.ndarray, alpha: np.ndarray, mask_options: MaskOptions) -> np.ndarray:
    if alpha.shape != rgb.shape[:2]:
        raise UsageError(f"mask is {alpha.shape[1]}x{alpha.shape[0]} but the image is {rgb.shape[1]}x{rgb.shape[0]}; give a mask of the image's size")
    return refine_alpha(alpha, mask_options)
