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
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.manifest import InpaintConfig, Manifest
from trt_bgswap.runtime.assemble import GENERATE_STAGE, MASK_STAGE, STAGES, Stages, assemble, check_stages, device_graphs_in, models_to_open
from trt_bgswap.runtime.backends import Availability
from trt_bgswap.runtime.color_management import ColorSpace
from trt_bgswap.runtime.compose import CompositeOptions, CompositeReport, compose, refine_masker_alpha
from trt_bgswap.runtime.composite import solid_background, upscale_background
from trt_bgswap.runtime.engine import Engine
from trt_bgswap.runtime.generator import GenerationInputs
from trt_bgswap.runtime.guided_filter import Refinement
from trt_bgswap.runtime.mask_ops import MaskOptions, inpaint_mask, refine_alpha
from trt_bgswap.runtime.masker import Masker, MaskStage
from trt_bgswap.runtime.preprocess import inpaint_inputs
from trt_bgswap.runtime.scheduler import LCMScheduler
from trt_bgswap.runtime.sizing import check_generation_size, generation_size
from trt_bgswap.runtime.tokenizer import ClipTokenizer
from trt_bgswap.specs import RMBG, pipeline_dims

log = logging.getLogger(__name__)

__all__ = ["GENERATE_STAGE", "MASK_STAGE", "STAGES", "GenerationOptions", "Noise", "Pipeline", "Result"]

MAX_STEPS = 50
MAX_GUIDANCE = 30.0


@dataclass(frozen=True)
class GenerationOptions:
    """What to generate. The defaults are the LCM-LoRA's sweet spot: 4 steps, no guidance."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 4
    guidance: float = 1.0  # classifier-free guidance runs only above 1 (it doubles the UNet batch)
    seed: int | None = None  # None draws a fresh seed (reported in the result)
    size: tuple[int, int] | None = None  # (width, height) to generate at; None: the policy in runtime/sizing.py

    def validate(self, max_steps: int = MAX_STEPS) -> None:
        if not isinstance(self.steps, int) or not 1 <= self.steps <= max_steps:
            raise UsageError(f"steps={self.steps}: --steps must be between 1 and {max_steps} (LCM needs 2-8)")
        if not (0.0 <= self.guidance <= MAX_GUIDANCE) or self.guidance != self.guidance:
            raise UsageError(f"guidance={self.guidance}: --guidance must be between 0 and {MAX_GUIDANCE} (LCM works at 1-2)")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise UsageError(f"seed={self.seed}: --seed must be a non-negative integer below 2**63")


@dataclass(frozen=True)
class Noise:
    """Every random draw of one generation, so runs are reproducible and comparable with diffusers."""

    latents: np.ndarray  # (1, C, h, w): initial latents before init_noise_sigma
    posterior: np.ndarray  # (1, C, h, w): eps of the masked image's VAE posterior sample
    steps: tuple[np.ndarray, ...]  # (1, C, h, w) each: noise the LCM step injects on non-final steps

    @classmethod
    def from_seed(cls, seed: int, shape: tuple[int, int, int, int], steps: int) -> "Noise":
        rng = np.random.default_rng(seed)
        draw = lambda: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
        return cls(latents=draw(), posterior=draw(), steps=tuple(draw() for _ in range(max(steps - 1, 0))))

    def check(self, shape: tuple[int, ...], steps: int) -> None:
        for name, arr in (("latents", self.latents), ("posterior", self.posterior)):
            if arr.shape != shape:
                raise UsageError(f"noise.{name} has shape {arr.shape}; this generation needs {shape}")
        if len(self.steps) < steps - 1:
            raise UsageError(f"noise.steps has {len(self.steps)} arrays; {steps} steps need {steps - 1}")
        for i, arr in enumerate(self.steps[: steps - 1]):
            if arr.shape != shape:
                raise UsageError(f"noise.steps[{i}] has shape {arr.shape}; this generation needs {shape}")


@dataclass
class Result:
    image: np.ndarray  # uint8 HxWx3 at the input's size: the original subject over the new background
    alpha: np.ndarray  # float32 HxW: the compositing alpha (refined RMBG mask or the user's)
    inpaint_mask: np.ndarray  # uint8 HxW, 255 where the background was repainted
    generated: np.ndarray | None  # float32 hxwx3 in [0,1] at the generation size, before compositing
    seed: int | None
    generation_size: tuple[int, int] | None  # (width, height)
    backends: dict[str, str] = field(default_factory=dict)
    composite: CompositeReport | None = None  # what the composite did (runtime/compose.py)


class Pipeline:
    """Loads an exported folder once; replaces backgrounds for many images.

    Thread-safe: every call (``mask``, ``text_embeddings``, ``inpaint``, ``replace``) holds one
    lock, since the stages share engine buffers and the scheduler's state; run several
    Pipelines for parallel throughput.
    """

    def __init__(self, manifest: Manifest, stages: Stages) -> None:
        self.manifest = manifest
        self.stages = stages
        self.config: InpaintConfig | None = manifest.inpaint
        self.scheduler = LCMScheduler.from_config(self.config.scheduler) if self.config else None
        self._lock = threading.RLock()

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
    ) -> "Pipeline":
        """Open an exported folder on a backend, using `trt-bgswap build`'s engines when present.

        ``provider``: ``auto`` (TensorRT engines, then ONNX Runtime CUDA, then CPU), ``trt``,
        ``tensorrt`` / ``cuda`` (ONNX Runtime execution providers) or ``cpu``; ``facts``: what
        the machine offers (probed when None). ``device_graphs``: run the export's device graphs
        (VAE and RMBG with their pre/post-processing inside); None does so on TensorRT when the
        export has them. ``stages``: the work this pipeline does (``mask``, ``generate``): the
        other stage's models are not opened (a solid-colour run opens no UNet), and a masker
        left out opens on first use. ``engines`` overrides models with engines the caller made.
        """
        from trt_bgswap.runtime.loader import open_engines, resolve_backend

        check_stages(stages)
        folder = Path(folder)
        manifest = Manifest.load(folder)
        choice = resolve_backend(provider, facts)
        if device_graphs is None:
            device_graphs = choice.engine == "trt" and bool(device_graphs_in(manifest))
        names = models_to_open(manifest, device_graphs, stages)
        opened = open_engines(folder, manifest, choice, threads, names=names)
        replaced = {k: e for k, e in (engines or {}).items() if k in opened.engines}
        for k in replaced:
            opened.engines[k].close()
        opened.engines.update(engines or {})
        tokenizer = None
        if manifest.inpaint is not None and GENERATE_STAGE in stages:
            tokenizer = ClipTokenizer.from_dir(folder / manifest.inpaint.tokenizer_dir)

        def open_masker() -> MaskStage | None:
            return cls.load(folder, provider, threads, device_graphs=device_graphs, stages=(MASK_STAGE,), facts=facts).stages.masker

        lazy = open_masker if MASK_STAGE not in stages and any(n in manifest.models for n in models_to_open(manifest, device_graphs, (MASK_STAGE,))) else None
        assembled = assemble(manifest, opened.engines, tokenizer, lazy_masker=lazy)
        assembled.on_close.append(lambda: [r.close() for r in opened.shared])
        try:
            assembled.load()
        except BaseException:
            assembled.close()
            raise
        log.info("loaded %s (%s): %s", folder, choice.name, ", ".join(f"{k}={b}" for k, b in assembled.backends().items()))
        return cls(manifest, assembled)

    @classmethod
    def from_engines(cls, manifest: Manifest, engines: Mapping[str, Engine], tokenizer: ClipTokenizer | None) -> "Pipeline":
        """A pipeline over engines the caller opened (the benchmark's timed engines), assembled by the same rules."""
        stages = assemble(manifest, engines, tokenizer)
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
        """Whether this pipeline has (or opens on first use) a masker."""
        return self.stages.masker is not None

    def _inpaint_config(self) -> InpaintConfig:
        if self.config is None or self.stages.generator is None or self.stages.text_encoder is None:
            what = list(self.stages.missing) or ["the inpainting config"]
            raise ModelError(f"this model folder has no inpainting models ({', '.join(what)} missing); re-run `trt-bgswap export --inpaint ...`")
        return self.config

    def mask(self, rgb: np.ndarray) -> np.ndarray:
        """RMBG's soft alpha (float32 HxW in [0,1]) for an RGB uint8 image."""
        if self.stages.masker is None:
            raise ModelError("this model folder has no RMBG model; re-run `trt-bgswap export --rmbg ...` or pass a mask")
        with self._lock:
            return self.stages.masker.predict(rgb)

    def text_embeddings(self, prompt: str) -> np.ndarray:
        """(1, S, D) CLIP hidden states for a prompt, cached (the same prompt is encoded once)."""
        self._inpaint_config()
        assert self.stages.text_encoder is not None
        with self._lock:
            return self.stages.text_encoder.embeddings(prompt)

    def generation_size_for(self, width: int, height: int, options: GenerationOptions) -> tuple[int, int]:
        cfg = self._inpaint_config()
        if options.size is not None:
            check_generation_size(options.size[0], options.size[1], cfg.size_multiple)
            return options.size
        return generation_size(width, height, cfg.default_size, cfg.size_multiple)

    def inpaint(self, rgb: np.ndarray, mask_u8: np.ndarray, options: GenerationOptions, noise: Noise | None = None) -> np.ndarray:
        """Repaint where ``mask_u8`` is 255; float32 hxwx3 in [0,1] at the generation size."""
        cfg = self._inpaint_config()
        options.validate()
        assert self.scheduler is not None and self.stages.generator is not None
        with self._lock:
            width, height = self.generation_size_for(rgb.shape[1], rgb.shape[0], options)
            dims = pipeline_dims(1, height, width, cfg.vae_scale_factor)
            shape = (1, cfg.latent_channels, dims["h"], dims["w"])
            if noise is None:
                seed = options.seed if options.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
                noise = Noise.from_seed(seed, shape, options.steps)
            noise.check(shape, options.steps)
            masked, latent_mask = inpaint_inputs(rgb, mask_u8, width, height, (dims["h"], dims["w"]))
            cond = self.text_embeddings(options.prompt)
            guided = options.guidance > 1.0  # diffusers' batch order: [uncond, cond]
            embeddings = np.concatenate([self.text_embeddings(options.negative_prompt), cond], axis=0) if guided else cond
            self.scheduler.set_timesteps(options.steps)
            inputs = GenerationInputs(
                masked_image=masked,
                eps=noise.posterior,
                latents=noise.latents.astype(np.float32) * np.float32(self.scheduler.init_noise_sigma),
                step_noise=tuple(noise.steps[: options.steps - 1]),
                latent_mask=latent_mask,
                embeddings=embeddings,
                guidance=options.guidance,
            )
            return self.stages.generator.generate(self.scheduler, inputs)

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
    ) -> Result:
        """The whole job for one image: mask (or the given alpha), new background, composite.

        ``color_space``: the photo's ICC space; the masker and the generation see the photo in
        sRGB, and the new background (solid or generated, both sRGB) is converted into the
        photo's space before the subject is put back, so the output keeps the photo's profile.
        ``composite_options``: edges, alpha refinement (of the masker's alpha only), grain, light, shadow.
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise UsageError(f"image array must be uint8 HxWx3 RGB, got {rgb.dtype} {rgb.shape}")
        cs = color_space or ColorSpace()
        model_rgb = cs.to_srgb(rgb)
        mask_options = mask_options or MaskOptions()
        composite_options = composite_options or CompositeOptions()
        composite_options.validate()
        refinement = None
        if alpha is None:
            raw, refinement = self.refine_masker_alpha(model_rgb, self.mask(model_rgb), composite_options)
        else:
            raw = alpha
        if raw.shape != rgb.shape[:2]:
            raise UsageError(f"mask is {raw.shape[1]}x{raw.shape[0]} but the image is {rgb.shape[1]}x{rgb.shape[0]}; give a mask of the image's size")
        a = refine_alpha(raw, mask_options)
        repaint = inpaint_mask(a, mask_options)
        h, w = rgb.shape[:2]
        if background_color is not None:
            out, report = compose(rgb, solid_background(cs.color_from_srgb(background_color), w, h), a, composite_options)
            log.debug("%s", report.summary())
            return Result(out, a, repaint, None, None, None, self.backends(), dataclasses.replace(report, refinement=refinement))
        if options is None:
            raise UsageError("give a prompt (GenerationOptions) or a background colour")
        seed = options.seed if options.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
        options = GenerationOptions(options.prompt, options.negative_prompt, options.steps, options.guidance, seed, options.size)
        generated = self.inpaint(model_rgb, repaint, options, noise)
        background = cs.from_srgb(upscale_background(generated, w, h))
        out, report = compose(rgb, background, a, composite_options, seed=seed)  # the generation's seed seeds the grain
        log.debug("%s", report.summary())
        gsize = (generated.shape[1], generated.shape[0])
        report = dataclasses.replace(report, refinement=refinement)
        return Result(out, a, repaint, generated, seed if noise is None else None, gsize, self.backends(), report)

    def refine_masker_alpha(self, rgb: np.ndarray, alpha: np.ndarray, options: CompositeOptions) -> tuple[np.ndarray, Refinement | None]:
        """The masker's alpha sharpened at full resolution along the photo's edges, when ``options.refine_alpha``."""
        if self.manifest.rmbg is None:
            return alpha, None
        return refine_masker_alpha(rgb, alpha, self.manifest.rmbg.input_size, options)

    def backends(self) -> dict[str, str]:
        return self.stages.backends()
