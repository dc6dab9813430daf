"""The Python API for appliances: load once, replace backgrounds for many images.

    from trt_bgswap.api import BackgroundReplacer
    swapper = BackgroundReplacer("path/to/exported")          # loads every engine once
    out = swapper.replace(pil_image, "a sunny beach", seed=7)   # PIL in -> PIL out
    out.image.save("beach.png")

Arrays work too (uint8 HxW, HxWx3 or HxWx4 in, arrays out); so do paths (read
with the same checks as the CLI: pixel cap, EXIF orientation, first frame of
an animation). The CLI is a thin layer over this class and takes the same
options. Thread-safe: calls on one instance are serialised by a lock (the
engines' buffers and the scheduler are shared), so two threads get exactly
what sequential calls with the same seeds give; for parallel throughput use
one instance per worker (each holds its own sessions).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from trt_bgswap.colors import RGB, parse_color
from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.memory import parse_bytes
from trt_bgswap.runtime.color_management import ColorSpace
from trt_bgswap.runtime.compose import CompositeOptions
from trt_bgswap.runtime.sizing import check_generation_size
from trt_bgswap.runtime.image_read import DEFAULT_MAX_PIXELS, MIN_SIDE, from_pil, read_image
from trt_bgswap.runtime.mask_ops import MaskOptions
from trt_bgswap.runtime.pipeline import STAGES, GenerationOptions, Noise, Pipeline, Result

log = logging.getLogger(__name__)

ImageLike = Union[Image.Image, np.ndarray, str, Path]


@dataclass
class Output:
    """One result, in the kind of image the caller passed (PIL or path in -> PIL out, array in -> array out)."""

    image: Image.Image | np.ndarray  # the composite, at the input's size
    alpha: Image.Image | np.ndarray  # compositing alpha (8-bit L image, or float32 HxW in [0,1])
    cutout: Image.Image | np.ndarray  # RGBA subject on transparency (alpha = the 8-bit compositing alpha)
    seed: int | None
    generation_size: tuple[int, int] | None  # (width, height) generated at; None for a solid colour
    result: Result  # everything, as arrays


def alpha_to_u8(alpha: np.ndarray) -> np.ndarray:
    """float alpha in [0,1] -> uint8 0..255, rounded (how masks and cut-outs are saved)."""
    return np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)


def _check_array_size(what: str, h: int, w: int, max_pixels: int | None) -> None:
    cap = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if min(h, w) < MIN_SIDE:
        raise UsageError(f"{what} is {w}x{h}; the minimum is {MIN_SIDE} px a side, upscale it first")
    if h * w > cap:
        raise UsageError(f"{what} is {w}x{h} = {h * w} px, above the limit of {cap} px; downscale it or raise max_pixels")


@dataclass(frozen=True)
class Photo:
    """An input as the pipeline takes it, with what came with it."""

    rgb: np.ndarray  # uint8 HxWx3
    alpha: np.ndarray | None  # float32 HxW when the input carries transparency (RGBA/LA/colour key)
    icc: bytes | None  # the ICC profile its pixels are in (None: sRGB)
    exif: bytes | None
    as_pil: bool  # answer with PIL images (PIL or path in) or arrays (array in)

    @property
    def cutout_alpha(self) -> np.ndarray | None:
        """The input's own alpha when it hides something (an all-opaque channel is no cut-out)."""
        return self.alpha if self.alpha is not None and float(self.alpha.min()) < 1.0 else None


def load_photo(path: str | Path, max_pixels: int | None = None) -> Photo:
    """Read a photo file once (with the CLI's checks) to run several jobs on it."""
    return _as_photo(path, max_pixels)


def _as_photo(image: "ImageLike | Photo", max_pixels: int | None) -> Photo:
    """uint8 RGB (+ its alpha, profile and EXIF) from any accepted input."""
    if isinstance(image, Photo):
        return image
    if isinstance(image, (str, Path)):
        loaded = read_image(image, max_pixels=max_pixels)
        return Photo(loaded.rgb, loaded.alpha, loaded.icc, loaded.exif, True)
    if isinstance(image, Image.Image):  # same conversions as files: EXIF orientation, 16-bit and float scaling
        loaded = from_pil(image, max_pixels=max_pixels)
        return Photo(loaded.rgb, loaded.alpha, loaded.icc, loaded.exif, True)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise UsageError(f"image array has dtype {image.dtype}; pass uint8 RGB (HxWx3), RGBA (HxWx4) or grey (HxW)")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if image.ndim == 2:
            _check_array_size("image array", image.shape[0], image.shape[1], max_pixels)
            return Photo(np.repeat(image[..., None], 3, axis=2), None, None, None, False)
        if image.ndim == 3 and image.shape[2] in (3, 4):
            _check_array_size("image array", image.shape[0], image.shape[1], max_pixels)
            alpha = image[..., 3].astype(np.float32) / 255.0 if image.shape[2] == 4 else None
            return Photo(np.ascontiguousarray(image[..., :3]), alpha, None, None, False)
        raise UsageError(f"image array has shape {image.shape}; pass HxW, HxWx3 or HxWx4")
    raise UsageError(f"unsupported image type {type(image).__name__}; pass a PIL image, a numpy array or a path")


def _as_alpha(mask: ImageLike, size: tuple[int, int]) -> np.ndarray:
    """A user mask (white = subject) as float32 HxW in [0,1] of the image's (width, height)."""
    label = "mask"
    if isinstance(mask, (str, Path)):
        label = f"mask {mask}"
        loaded = read_image(mask)
        arr = loaded.alpha if loaded.alpha is not None and float(loaded.alpha.min()) < 1.0 else loaded.rgb.mean(axis=2) / 255.0
    elif isinstance(mask, Image.Image):
        loaded = from_pil(mask, name="<mask>")
        arr = loaded.alpha if loaded.alpha is not None and float(loaded.alpha.min()) < 1.0 else loaded.rgb.mean(axis=2) / 255.0
    elif isinstance(mask, np.ndarray):
        if mask.dtype == np.uint8:
            arr = mask.astype(np.float32) / 255.0
        elif mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.floating):
            arr = mask.astype(np.float32)
        else:
            raise UsageError(f"mask array has dtype {mask.dtype}; pass uint8 (0..255), bool, or float in [0, 1]")
        if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
            arr = arr[..., 3] if arr.shape[2] == 4 else arr.mean(axis=2)
        if arr.ndim != 2:
            raise UsageError(f"mask array has shape {mask.shape}; pass HxW (or HxWx1/3/4) of the image's size")
        if not np.isfinite(arr).all():
            raise UsageError("mask array holds NaN or infinite values; pass values in [0, 1]")
    else:
        raise UsageError(f"unsupported mask type {type(mask).__name__}; pass a PIL image, an array or a path")
    arr = np.asarray(arr, dtype=np.float32)
    if arr.shape != (size[1], size[0]):
        raise UsageError(f"{label} is {arr.shape[1]}x{arr.shape[0]} but the image is {size[0]}x{size[1]}; give a mask of the same size")
    return np.clip(arr, 0.0, 1.0)


def _check_size_value(size: object) -> tuple[int, int] | None:
    if size is None:
        return None
    if (
        not isinstance(size, tuple)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        raise UsageError(f"size={size!r}: give (width, height) as two integers, e.g. (576, 448)")
    return size  # type: ignore[return-value]


class BackgroundReplacer:
    """Loads an exported model folder once; every option of `trt-bgswap run` is a keyword here."""

    def __init__(
        self,
        models: str | Path | None,
        provider: str = "auto",
        threads: int = 0,
        max_pixels: int | None = None,
        pipeline: Pipeline | None = None,
        stages: Collection[str] = STAGES,
        low_memory: bool | int = False,
        memory_budget: int | str | None = None,
    ) -> None:
        """``models``: an exported folder, or None for solid colours behind your own masks (nothing is loaded).

        ``stages``: the work this instance does (``mask``, ``generate``); the other stage's models are not opened.
        ``low_memory``: each model's session opens only while its stage runs (True), or a budget in bytes
        decides which stay open; results are identical, each request pays for opening sessions again.
        ``memory_budget``: the most host memory a generation may take ('6G' or bytes; default
        ``TRT_BGSWAP_MEMORY_BUDGET``, else what is free); larger sizes are refused before they run.
        """
        budget = parse_bytes(memory_budget, "memory_budget") if isinstance(memory_budget, str) else memory_budget
        if pipeline is None:
            pipeline = (
                Pipeline.without_models()
                if models is None
                else Pipeline.load(
                    Path(models).expanduser(), provider=provider, threads=threads, stages=stages, memory_budget=budget, low_memory=low_memory
                )
            )
        self.pipeline = pipeline
        self.max_pixels = max_pixels
        self._lock = threading.Lock()

    def close(self) -> None:
        """Free every session, engine and device buffer (the instance cannot be used afterwards)."""
        with self._lock:
            self.pipeline.close()

    def __enter__(self) -> "BackgroundReplacer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_options(
        self,
        prompt: str | None,
        *,
        negative_prompt: str = "",
        steps: int = 4,
        guidance: float = 1.0,
        seed: int | None = None,
        size: tuple[int, int] | None = None,
        bg_color: str | RGB | None = None,
        has_mask: bool = False,
    ) -> tuple[GenerationOptions | None, RGB | None]:
        """Validate options against the loaded models before any image is touched (a batch fails fast).

        Returns the generation options (None for a solid colour) and the parsed colour.
        """
        if prompt is None and bg_color is None:
            raise UsageError("give a prompt (--prompt) for a generated background or a colour (--bg-color) for a solid one")
        if prompt is not None and bg_color is not None:
            raise UsageError("a prompt and bg_color are alternatives (generated or solid background); give one of them")
        if not has_mask and not self.pipeline.can_mask:
            raise ModelError("the model folder has no RMBG model; pass your own mask (--mask / mask=) or re-export with --rmbg")
        if bg_color is not None:
            return None, parse_color(bg_color)
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise UsageError(f"prompt={prompt!r}, negative_prompt={negative_prompt!r}: prompts are strings")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise UsageError(f"guidance={guidance!r}: give a number between 0 and 30 (LCM works at 1-2)")
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise UsageError(f"steps={steps!r}: give an integer number of steps (LCM needs 2-8)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise UsageError(f"seed={seed!r}: give a non-negative integer")
        options = GenerationOptions(
            prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=float(guidance), seed=seed, size=_check_size_value(size)
        )
        options.validate()
        cfg = self.pipeline.config
        if cfg is None:
            raise ModelError("the model folder has no inpainting models; re-export with --inpaint, or use a solid colour (--bg-color)")
        if options.size is not None:
            check_generation_size(options.size[0], options.size[1], cfg.size_multiple)
            if self.pipeline.memory is not None:  # before any image: a size that cannot fit stops the batch
                self.pipeline.memory.check(options.size, options.guidance)
        return options, None

    def replace(
        self,
        image: "ImageLike | Photo",
        prompt: str | None = None,
        *,
        negative_prompt: str = "",
        steps: int = 4,
        guidance: float = 1.0,
        seed: int | None = None,
        size: tuple[int, int] | None = None,
        bg_color: str | RGB | None = None,
        mask: ImageLike | None = None,
        mask_options: MaskOptions | None = None,
        noise: Noise | None = None,
        use_alpha: bool = True,
        composite_options: CompositeOptions | None = None,
    ) -> Output:
        """Replace the background behind the subject: a prompt generates it, ``bg_color`` paints it.

        ``mask`` (white = subject) replaces RMBG; an input that is already a cut-out (its alpha
        hides something) is its own mask unless ``use_alpha=False``; ``mask_options`` refines
        either (threshold, grow, feather, band). ``seed`` None draws one (reported in the output).
        ``composite_options`` (:class:`~trt_bgswap.runtime.compose.CompositeOptions`): clean edges
        (default on), full-resolution refinement of RMBG's alpha (default on), grain, harmonize, shadow.
        A wide-gamut photo keeps its ICC profile: the new background is converted into its space.
        """
        options, color = self.check_options(
            prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance=guidance,
            seed=seed,
            size=size,
            bg_color=bg_color,
            has_mask=True,  # checked below, once the input's own alpha is known
        )
        if mask_options is not None:
            mask_options.validate()
        if composite_options is not None:
            composite_options.validate()
        photo = _as_photo(image, self.max_pixels)
        rgb = photo.rgb
        alpha = self._given_alpha(photo, mask, use_alpha)
        with self._lock:
            result = self.pipeline.replace(
                rgb, options, mask_options=mask_options, alpha=alpha, background_color=color, noise=noise, color_space=ColorSpace(photo.icc),
                composite_options=composite_options,
            )
        return self._output(result, photo)

    def _given_alpha(self, photo: Photo, mask: ImageLike | None, use_alpha: bool) -> np.ndarray | None:
        """The subject alpha the caller gave (a mask, or the input's own transparency), or None: the masker runs."""
        if mask is not None:
            return _as_alpha(mask, (photo.rgb.shape[1], photo.rgb.shape[0]))
        alpha = photo.cutout_alpha if use_alpha else None
        if alpha is not None:
            log.info("the input is a cut-out: its own alpha is the subject mask (use_alpha=False / --ignore-alpha runs the masker)")
        elif not self.pipeline.can_mask:
            raise ModelError("the model folder has no RMBG model; pass your own mask (--mask / mask=) or re-export with --rmbg")
        return alpha

    def source_alpha(
        self, image: "ImageLike | Photo", mask: ImageLike | None = None, use_alpha: bool = True, composite_options: CompositeOptions | None = None
    ) -> np.ndarray:
        """The subject's alpha before mask options (float32 HxW): the given mask, the input's own alpha, or RMBG's
        (refined at full resolution unless ``composite_options.refine_alpha`` is False).

        What ``replace(mask=...)`` takes: a batch computes it once for several results of one photo.
        """
        photo = _as_photo(image, self.max_pixels)
        alpha = self._given_alpha(photo, mask, use_alpha)
        if alpha is not None:
            return alpha
        srgb = ColorSpace(photo.icc).to_srgb(photo.rgb)
        with self._lock:
            refined, _ = self.pipeline.refine_masker_alpha(srgb, self.pipeline.mask(srgb), composite_options or CompositeOptions())
        return refined

    def mask(self, image: "ImageLike | Photo") -> Image.Image | np.ndarray:
        """RMBG's soft alpha: an 8-bit L image for PIL/path input, float32 HxW in [0,1] for arrays."""
        photo = _as_photo(image, self.max_pixels)
        with self._lock:
            alpha = self.pipeline.mask(ColorSpace(photo.icc).to_srgb(photo.rgb))
        return Image.fromarray(alpha_to_u8(alpha), "L") if photo.as_pil else alpha

    @staticmethod
    def _output(result: Result, photo: Photo) -> Output:
        a8 = alpha_to_u8(result.alpha)
        cutout = np.dstack([photo.rgb, a8])
        if photo.as_pil:
            image = Image.fromarray(result.image, "RGB")
            rgba = Image.fromarray(cutout, "RGBA")
            for im in (image, rgba):
                if photo.icc:
                    im.info["icc_profile"] = photo.icc
                if photo.exif:
                    im.info["exif"] = photo.exif
            return Output(image=image, alpha=Image.fromarray(a8, "L"), cutout=rgba, seed=result.seed, generation_size=result.generation_size, result=result)
        return Output(result.image, result.alpha, cutout, result.seed, result.generation_size, result)
