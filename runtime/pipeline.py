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

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.manifest import InpaintConfig, Manifest
from trt_bgswap.runtime.composite import (
    check_generation_size,
    composite,
    generation_size,
    resize_mask_for_model,
    resize_rgb_for_model,
    solid_background,
    upscale_background,
)
from trt_bgswap.runtime.color_management import ColorSpace
from trt_bgswap.runtime.engine import Engine
from trt_bgswap.runtime.mask_ops import MaskOptions, inpaint_mask, refine_alpha
from trt_bgswap.runtime.masker import Masker
from trt_bgswap.runtime.resize import resize_nearest
from trt_bgswap.runtime.scheduler import LCMScheduler
from trt_bgswap.runtime.tokenizer import ClipTokenizer
from trt_bgswap.specs import pipeline_dims

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from trt_bgswap.runtime.device_pipeline import DeviceChain
    from trt_bgswap.runtime.trt_loop import TrtStepLoop as DeviceStepLoop

MAX_STEPS = 50
MAX_GUIDANCE = 30.0
PROMPT_CACHE_SIZE = 64
INPAINT_MODELS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
MASK_STAGE, GENERATE_STAGE = "mask", "generate"
STAGES = (MASK_STAGE, GENERATE_STAGE)
MASK_MODELS = ("rmbg", "rmbg_full")


@dataclass(frozen=True)
class GenerationOptions:
    """What to generate. The defaults are the LCM-LoRA's sweet spot: 4 steps, no guidance."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 4
    guidance: float = 1.0  # classifier-free guidance runs only above 1 (it doubles the UNet batch)
    seed: int | None = None  # None draws a fresh seed (reported in the result)
    size: tuple[int, int] | None = None  # (width, height) to generate at; None: the policy in composite.py

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


def _cast(spec_engine: Engine, name: str, arr: np.ndarray) -> np.ndarray:
    """Feed arrays in the dtype the graph declares (fp16 graphs may take fp16 inputs)."""
    want = spec_engine.spec.tensor(name).np_dtype
    return np.ascontiguousarray(arr, dtype=want)


class Pipeline:
    """Loads an exported folder once; replaces backgrounds for many images.

    Thread-safe: calls are serialised with a lock (one ONNX Runtime session per
    model is shared; run several Pipelines for parallel throughput).
    """

    def __init__(
        self,
        manifest: Manifest,
        engines: Mapping[str, Engine],
        masker: Masker | None,
        tokenizer: ClipTokenizer | None,
        step_loop: "DeviceStepLoop | None" = None,
        device_chain: "DeviceChain | None" = None,
    ) -> None:
        self.manifest = manifest
        self.step_loop = step_loop  # the TensorRT device loop over the fused unet_step graph
        # TensorRT: encoder -> loop -> decoder on the device, one download (runtime/device_pipeline.py)
        self.device_chain = device_chain
        self.engines = dict(engines)
        self.masker = masker
        self.tokenizer = tokenizer
        self.config: InpaintConfig | None = manifest.inpaint
        self._prompt_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.RLock()
        self.scheduler = LCMScheduler.from_config(self.config.scheduler) if self.config else None
        self._open_masker: Callable[[], Pipeline] | None = None  # opens the mask stage on first use when load() left it out

    @classmethod
    def without_models(cls) -> "Pipeline":
        """A pipeline that opens nothing: solid colours behind the caller's own masks."""
        return cls(Manifest(precision="none", opset=None, models={}, inpaint=None, rmbg=None), {}, None, None)

    @classmethod
    def with_masker(cls, masker: Masker) -> "Pipeline":
        """A pipeline around a masker opened on its own (an RMBG .onnx file): masks and solid colours."""
        return cls(Manifest(precision="none", opset=None, models={}, inpaint=None, rmbg=masker.cfg), {}, masker, None)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        provider: str = "auto",
        threads: int = 0,
        engines: Mapping[str, Engine] | None = None,
        device_graphs: bool | None = None,
        stages: Collection[str] = STAGES,
    ) -> "Pipeline":
        """Open an exported folder on a backend, using `trt-bgswap build`'s engines when present.

        ``stages``: which work this pipeline will do (``mask``, ``generate``); models of the other
        stage are not opened (a solid-colour run opens no UNet), and a later ``mask`` call opens
        the masker on first use.

        ``device_graphs``: run the export's device graphs (``export --device-graphs``: VAE and RMBG
        with their pre/post-processing inside) instead of the host-path models; ``None`` does so
        on TensorRT when the export has them (the generation then stays on the GPU until the image).

        ``provider``: ``auto`` (TensorRT engines, then ONNX Runtime CUDA, then CPU), ``trt``,
        ``tensorrt`` / ``cuda`` (ONNX Runtime execution providers) or ``cpu``. ``engines``
        overrides individual models with engines the caller made.
        """
        from trt_bgswap.runtime.device_pipeline import device_chain_for, device_graphs_in, models_to_open
        from trt_bgswap.runtime.loader import open_engines, resolve_backend

        folder = Path(folder)
        manifest = Manifest.load(folder)
        choice = resolve_backend(provider)
        if device_graphs is None:
            device_graphs = choice.engine == "trt" and bool(device_graphs_in(manifest))
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise UsageError(f"stages={sorted(stages)}: {unknown} unknown; choose from {list(STAGES)}")
        names = [n for n in models_to_open(manifest, device_graphs) if (MASK_STAGE if n in MASK_MODELS else GENERATE_STAGE) in stages]
        if "unet_step" in names:  # the fused step graph is what runs; the plain UNet would only take memory
            names = [n for n in names if n != "unet"]
        built: dict[str, Engine] = open_engines(folder, manifest, choice, threads, names=names)
        built.update(engines or {})
        step_loop = None
        chain = None
        if choice.engine == "trt" and "unet_step" in built and not (engines and "unet_step" in engines):
            from trt_bgswap.runtime.trt_loop import TrtStepLoop

            step = built.pop("unet_step")
            chain = device_chain_for(built, step, manifest.inpaint) if device_graphs else None
            step_loop = chain.loop if chain is not None else TrtStepLoop(step.spec, step.path, stream=step.stream, shared_activations=step.shared)
        for engine in built.values():
            engine.load()
        log.info("loaded %s (%s): %s", folder, choice.name, ", ".join(f"{k}={e.backend}" for k, e in built.items()))
        masker = None
        rmbg = built.pop("rmbg", None)
        if rmbg is not None and manifest.rmbg is not None:
            masker = Masker(rmbg, manifest.rmbg)
        tokenizer = None
        if manifest.inpaint is not None and GENERATE_STAGE in stages:
            tokenizer = ClipTokenizer.from_dir(folder / manifest.inpaint.tokenizer_dir)
        pipe = cls(manifest, built, masker, tokenizer, step_loop=step_loop, device_chain=chain)
        if MASK_STAGE not in stages:
            pipe._open_masker = lambda: cls.load(folder, provider, threads, device_graphs=device_graphs, stages=(MASK_STAGE,))
        return pipe

    # --- stages (public so benchmarks can time them one by one) ---

    def _require_inpaint(self) -> InpaintConfig:
        from trt_bgswap.runtime.device_pipeline import REPLACES

        replaced = {REPLACES[g] for g in REPLACES if g in self.engines}  # a device graph stands in for its host model
        if "unet_step" in self.engines or self.step_loop is not None:
            replaced.add("unet")  # the fused step graph stands in for the UNet
        missing = [m for m in INPAINT_MODELS if m not in self.engines and m not in replaced]
        if self.config is None or missing or self.tokenizer is None:
            raise ModelError(f"this model folder has no inpainting models ({missing or 'config'} missing); re-run `trt-bgswap export --inpaint ...`")
        return self.config

    def text_embeddings(self, prompt: str) -> np.ndarray:
        """(1, S, D) CLIP hidden states for a prompt, cached (the same prompt is encoded once)."""
        cached = self._prompt_cache.get(prompt)
        if cached is not None:
            self._prompt_cache.move_to_end(prompt)
            return cached
        self._require_inpaint()
        assert self.tokenizer is not None
        ids, _ = self.tokenizer.encode(prompt)  # the tokenizer warns when it truncates
        te = self.engines["text_encoder"]
        out = te(input_ids=_cast(te, "input_ids", ids[None]))["last_hidden_state"].astype(np.float32)
        self._prompt_cache[prompt] = out
        if len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return out

    @property
    def can_mask(self) -> bool:
        """Whether this pipeline has (or opens on first use) a masker."""
        if self._open_masker is not None:
            return self.manifest.rmbg is not None and any(m in self.manifest.models for m in MASK_MODELS)
        return self.masker is not None or "rmbg_full" in self.engines

    def mask(self, rgb: np.ndarray) -> np.ndarray:
        """RMBG's soft alpha (float32 HxW in [0,1]) for an RGB uint8 image."""
        if self._open_masker is not None:
            with self._lock:
                if self._open_masker is not None:
                    other = self._open_masker()
                    self.masker = other.masker
                    self.engines.update({k: e for k, e in other.engines.items() if k in MASK_MODELS})
                    self._open_masker = None
        if "rmbg_full" in self.engines:  # the device graph: pre/post-processing inside, the photo as it is
            from trt_bgswap.runtime.device_pipeline import mask_with

            return mask_with(self.engines["rmbg_full"], rgb)
        if self.masker is None:
            raise ModelError("this model folder has no RMBG model; re-run `trt-bgswap export --rmbg ...` or pass a mask")
        return self.masker.predict(rgb)

    def encode_masked_image(self, masked: np.ndarray, eps: np.ndarray) -> np.ndarray:
        cfg = self._require_inpaint()
        if "vae_encoder_sample" in self.engines:  # the device graph draws and scales inside
            enc = self.engines["vae_encoder_sample"]
            return enc(sample=_cast(enc, "sample", masked), eps=_cast(enc, "eps", eps))["masked_image_latents"]
        enc = self.engines["vae_encoder"]
        out = enc(sample=_cast(enc, "sample", masked))
        latents = out["latent_mean"].astype(np.float32) + out["latent_std"].astype(np.float32) * eps
        if cfg.vae_shift_factor is not None:
            latents = latents - np.float32(cfg.vae_shift_factor)
        return latents * np.float32(cfg.vae_scaling_factor)

    def unet(self, sample: np.ndarray, timestep: float, embeddings: np.ndarray) -> np.ndarray:
        unet = self.engines["unet"]
        b = sample.shape[0]
        return unet(
            sample=_cast(unet, "sample", sample),
            timestep=_cast(unet, "timestep", np.full((b,), timestep, dtype=np.float32)),
            encoder_hidden_states=_cast(unet, "encoder_hidden_states", embeddings),
        )["out_sample"].astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> float32 hxwx3 image in [0, 1]."""
        cfg = self._require_inpaint()
        if "vae_decoder_image" in self.engines:  # the device graph unscales and clamps inside
            from trt_bgswap.runtime.device_pipeline import image_hwc

            dec = self.engines["vae_decoder_image"]
            return image_hwc(dec(latents=_cast(dec, "latents", latents))["image"])
        z = latents / np.float32(cfg.vae_scaling_factor)
        if cfg.vae_shift_factor is not None:
            z = z + np.float32(cfg.vae_shift_factor)
        dec = self.engines["vae_decoder"]
        img = dec(latent_sample=_cast(dec, "latent_sample", z))["sample"].astype(np.float32)
        return np.clip(img[0] / 2.0 + 0.5, 0.0, 1.0).transpose(1, 2, 0)

    def generation_size_for(self, width: int, height: int, options: GenerationOptions) -> tuple[int, int]:
        cfg = self._require_inpaint()
        if options.size is not None:
            check_generation_size(options.size[0], options.size[1], cfg.size_multiple)
            return options.size
        return generation_size(width, height, cfg.default_size, cfg.size_multiple)

    def inpaint(
        self,
        rgb: np.ndarray,
        mask_u8: np.ndarray,
        options: GenerationOptions,
        noise: Noise | None = None,
    ) -> np.ndarray:
        """Repaint where ``mask_u8`` is 255; float32 hxwx3 in [0,1] at the generation size."""
        cfg = self._require_inpaint()
        options.validate()
        with self._lock:
            width, height = self.generation_size_for(rgb.shape[1], rgb.shape[0], options)
            dims = pipeline_dims(1, height, width, cfg.vae_scale_factor)
            shape = (1, cfg.latent_channels, dims["h"], dims["w"])
            if noise is None:
                seed = options.seed if options.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
                noise = Noise.from_seed(seed, shape, options.steps)
            noise.check(shape, options.steps)

            image = resize_rgb_for_model(rgb, width, height)
            mask = resize_mask_for_model(mask_u8, width, height)
            masked = image * (mask < 0.5)
            latent_mask = resize_nearest(mask, (dims["h"], dims["w"]))

            guided = options.guidance > 1.0
            cond = self.text_embeddings(options.prompt)
            embeddings = np.concatenate([self.text_embeddings(options.negative_prompt), cond], axis=0) if guided else cond

            assert self.scheduler is not None
            sched = self.scheduler
            sched.set_timesteps(options.steps)
            latents = noise.latents.astype(np.float32) * np.float32(sched.init_noise_sigma)
            if self.device_chain is not None:
                return self._generate_on_device(masked, latents, noise, latent_mask, embeddings, options.guidance)
            masked_latents = self.encode_masked_image(masked, noise.posterior)
            if self.step_loop is not None or "unet_step" in self.engines:
                latents = self._denoise_fused(latents, noise, latent_mask, masked_latents, embeddings, options.guidance)
            else:
                latents = self._denoise(latents, noise, latent_mask, masked_latents, embeddings, options.guidance)
            return self.decode(latents)

    def _denoise(
        self,
        latents: np.ndarray,
        noise: Noise,
        latent_mask: np.ndarray,
        masked_latents: np.ndarray,
        embeddings: np.ndarray,
        guidance: float,
    ) -> np.ndarray:
        """The LCM loop on the host: the UNet graph per step, the scheduler in numpy."""
        assert self.scheduler is not None
        sched = self.scheduler
        guided = embeddings.shape[0] == 2
        if guided:  # diffusers' batch order: [uncond, cond]
            latent_mask = np.concatenate([latent_mask] * 2, axis=0)
            masked_latents = np.concatenate([masked_latents] * 2, axis=0)
        timesteps = list(sched.timesteps)
        for i, t in enumerate(timesteps):
            x = np.concatenate([latents] * 2, axis=0) if guided else latents
            x = np.concatenate([x, latent_mask, masked_latents], axis=1)
            eps = self.unet(x, float(t), embeddings)
            if guided:
                uncond, text = eps[:1], eps[1:]
                eps = uncond + np.float32(guidance) * (text - uncond)
            step_noise = noise.steps[i] if i < len(timesteps) - 1 else None
            latents, _ = sched.step(eps, int(t), latents, noise=step_noise)
        return latents

    def _denoise_fused(
        self,
        latents: np.ndarray,
        noise: Noise,
        latent_mask: np.ndarray,
        masked_latents: np.ndarray,
        embeddings: np.ndarray,
        guidance: float,
    ) -> np.ndarray:
        """The LCM loop with the fused unet_step graph (guidance and the step inside the graph)."""
        from trt_bgswap.runtime.step_loop import DenoiseInputs, check_step_scheduler, denoise

        assert self.scheduler is not None and self.scheduler.coefficients is not None
        check_step_scheduler(self.scheduler.config)
        steps = len(self.scheduler.coefficients)
        inputs = DenoiseInputs(latents, tuple(noise.steps[: steps - 1]), latent_mask, masked_latents, embeddings, guidance)
        if self.step_loop is not None:
            return self.step_loop.denoise(self.scheduler.coefficients, inputs)
        return denoise(self.engines["unet_step"], self.scheduler.coefficients, inputs)

    def _generate_on_device(
        self,
        masked: np.ndarray,
        latents: np.ndarray,
        noise: Noise,
        latent_mask: np.ndarray,
        embeddings: np.ndarray,
        guidance: float,
    ) -> np.ndarray:
        """Encoder, loop and decoder on the GPU (runtime/device_pipeline.py); only the image comes back."""
        from trt_bgswap.runtime.device_pipeline import GenerationInputs, image_hwc
        from trt_bgswap.runtime.step_loop import check_step_scheduler

        assert self.scheduler is not None and self.scheduler.coefficients is not None and self.device_chain is not None
        check_step_scheduler(self.scheduler.config)
        steps = len(self.scheduler.coefficients)
        inputs = GenerationInputs(
            np.ascontiguousarray(masked, dtype=np.float32),
            np.ascontiguousarray(noise.posterior, dtype=np.float32),
            latents,
            tuple(noise.steps[: steps - 1]),
            latent_mask,
            embeddings,
            guidance,
        )
        return image_hwc(self.device_chain.generate(self.scheduler.coefficients, inputs))

    def replace(
        self,
        rgb: np.ndarray,
        options: GenerationOptions | None = None,
        mask_options: MaskOptions | None = None,
        alpha: np.ndarray | None = None,
        background_color: tuple[int, int, int] | None = None,
        noise: Noise | None = None,
        color_space: ColorSpace | None = None,
    ) -> Result:
        """The whole job for one image: mask (or the given alpha), new background, composite.

        ``color_space``: the photo's ICC space; the masker and the generation see the photo in
        sRGB, and the new background (solid or generated, both sRGB) is converted into the
        photo's space before the subject is put back, so the output keeps the photo's profile.
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise UsageError(f"image array must be uint8 HxWx3 RGB, got {rgb.dtype} {rgb.shape}")
        cs = color_space or ColorSpace()
        model_rgb = cs.to_srgb(rgb)
        mask_options = mask_options or MaskOptions()
        raw = self.mask(model_rgb) if alpha is None else alpha
        if raw.shape != rgb.shape[:2]:
            raise UsageError(f"mask is {raw.shape[1]}x{raw.shape[0]} but the image is {rgb.shape[1]}x{rgb.shape[0]}; give a mask of the image's size")
        a = refine_alpha(raw, mask_options)
        repaint = inpaint_mask(a, mask_options)
        h, w = rgb.shape[:2]
        if background_color is not None:
            out = composite(rgb, solid_background(cs.color_from_srgb(background_color), w, h), a)
            return Result(out, a, repaint, None, None, None, self.backends())
        if options is None:
            raise UsageError("give a prompt (GenerationOptions) or a background colour")
        seed = options.seed if options.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
        options = GenerationOptions(
            prompt=options.prompt,
            negative_prompt=options.negative_prompt,
            steps=options.steps,
            guidance=options.guidance,
            seed=seed,
            size=options.size,
        )
        generated = self.inpaint(model_rgb, repaint, options, noise)
        background = cs.from_srgb(upscale_background(generated, w, h))
        out = composite(rgb, background, a)
        gsize = (generated.shape[1], generated.shape[0])
        return Result(out, a, repaint, generated, seed if noise is None else None, gsize, self.backends())

    def backends(self) -> dict[str, str]:
        names = {k: e.backend for k, e in self.engines.items()}
        if self.device_chain is not None:
            names["unet_step"] = self.device_chain.backend
        if self.masker is not None:
            names["rmbg"] = self.masker.engine.backend
        return names
