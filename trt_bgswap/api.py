"""The Python API for appliances: load once, replace backgrounds for many images.

    from trt_bgswap.api import BackgroundReplacer
    swapper = BackgroundReplacer("path/to/exported")          # loads every engine once
    out = swapper.replace(pil_image, "a sunny beach", seed=7)   # PIL in -> PIL out
    out.image.save("beach.png")

Arrays work too (uint8 HxWx3 or HxWx4 in, the same kind out). The CLI is a thin
layer over this class. Thread-safe: calls on one instance are serialised; for
parallel throughput use one instance per worker (each holds its own sessions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from trt_bgswap.colors import parse_color
from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.image_io import from_pil, read_image
from trt_bgswap.runtime.mask_ops import MaskOptions
from trt_bgswap.runtime.pipeline import GenerationOptions, Noise, Pipeline, Result

log = logging.getLogger(__name__)

ImageLike = Union[Image.Image, np.ndarray, str, Path]


@dataclass
class Output:
    """One result, in the kind of image the caller passed (PIL in -> PIL out, array in -> array out)."""

    image: Image.Image | np.ndarray  # the composite, at the input's size
    alpha: Image.Image | np.ndarray  # compositing alpha (8-bit L image, or float32 HxW in [0,1])
    cutout: Image.Image | np.ndarray  # RGBA subject on transparency
    seed: int | None
    generation_size: tuple[int, int] | None
    result: Result  # everything, as arrays


def _as_rgb(image: ImageLike, max_pixels: int | None) -> tuple[np.ndarray, bool]:
    """uint8 RGB array from any accepted input, and whether the caller gave PIL (to answer in kind)."""
    if isinstance(image, (str, Path)):
        return read_image(image, max_pixels=max_pixels).rgb, True
    if isinstance(image, Image.Image):  # same conversions as files: EXIF orientation, 16-bit and float scaling
        return from_pil(image, max_pixels=max_pixels).rgb, True
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise UsageError(f"image array has dtype {image.dtype}; pass uint8 RGB (HxWx3) or RGBA (HxWx4)")
        if image.ndim == 2:
            return np.repeat(image[..., None], 3, axis=2), False
        if image.ndim == 3 and image.shape[2] in (3, 4):
            return np.ascontiguousarray(image[..., :3]), False
        raise UsageError(f"image array has shape {image.shape}; pass HxW, HxWx3 or HxWx4")
    raise UsageError(f"unsupported image type {type(image).__name__}; pass a PIL image, a numpy array or a path")


def _as_alpha(mask: ImageLike, size: tuple[int, int]) -> np.ndarray:
    """A user mask (white = subject) as float32 HxW in [0,1] of the image's size."""
    if isinstance(mask, (str, Path)):
        loaded = read_image(mask)
        arr = loaded.alpha if loaded.alpha is not None and float(loaded.alpha.min()) < 1.0 else loaded.rgb.mean(axis=2) / 255.0
    elif isinstance(mask, Image.Image):
        loaded = from_pil(mask, name="<mask>")
        arr = loaded.alpha if loaded.alpha is not None else loaded.rgb.mean(axis=2) / 255.0
    elif isinstance(mask, np.ndarray):
        arr = mask.astype(np.float32)
        if arr.ndim == 3:
            arr = arr[..., 3] if arr.shape[2] == 4 else arr.mean(axis=2)
        if mask.dtype == np.uint8:
            arr = arr / 255.0
    else:
        raise UsageError(f"unsupported mask type {type(mask).__name__}; pass a PIL image, an array or a path")
    arr = np.asarray(arr, dtype=np.float32)
    if arr.shape != (size[1], size[0]):
        raise UsageError(
            f"mask is {arr.shape[1]}x{arr.shape[0]} but the image is {size[0]}x{size[1]}; give a mask of the same size"
        )
    return np.clip(arr, 0.0, 1.0)


class BackgroundReplacer:
    """Loads an exported model folder once; every option of `trt-bgswap run` is a keyword here."""

    def __init__(
        self,
        models: str | Path,
        provider: str = "auto",
        threads: int = 0,
        max_pixels: int | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        self.pipeline = pipeline if pipeline is not None else Pipeline.load(models, provider=provider, threads=threads)
        self.max_pixels = max_pixels

    def replace(
        self,
        image: ImageLike,
        prompt: str | None = None,
        *,
        negative_prompt: str = "",
        steps: int = 4,
        guidance: float = 1.0,
        seed: int | None = None,
        size: tuple[int, int] | None = None,
        bg_color: str | tuple[int, int, int] | None = None,
        mask: ImageLike | None = None,
        mask_options: MaskOptions | None = None,
        noise: Noise | None = None,
    ) -> Output:
        """Replace the background behind the subject: a prompt generates it, ``bg_color`` paints it."""
        rgb, as_pil = _as_rgb(image, self.max_pixels)
        if prompt is None and bg_color is None:
            raise UsageError("give a prompt for a generated background or bg_color for a solid one")
        color = parse_color(bg_color) if isinstance(bg_color, str) else bg_color
        alpha = _as_alpha(mask, (rgb.shape[1], rgb.shape[0])) if mask is not None else None
        options = None
        if color is None:
            options = GenerationOptions(
                prompt=prompt or "", negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed, size=size
            )
            options.validate()
        result = self.pipeline.replace(
            rgb, options, mask_options=mask_options, alpha=alpha, background_color=color, noise=noise
        )
        return self._output(result, as_pil, rgb)

    def mask(self, image: ImageLike) -> Image.Image | np.ndarray:
        """RMBG's soft alpha: an 8-bit L image for PIL/path input, float32 HxW for arrays."""
        rgb, as_pil = _as_rgb(image, self.max_pixels)
        alpha = self.pipeline.mask(rgb)
        return Image.fromarray(_alpha_u8(alpha), "L") if as_pil else alpha

    @staticmethod
    def _output(result: Result, as_pil: bool, rgb: np.ndarray) -> Output:
        cutout = np.dstack([rgb, _alpha_u8(result.alpha)])
        if as_pil:
            return Output(
                image=Image.fromarray(result.image, "RGB"),
                alpha=Image.fromarray(_alpha_u8(result.alpha), "L"),
                cutout=Image.fromarray(cutout, "RGBA"),
                seed=result.seed,
                generation_size=result.generation_size,
                result=result,
            )
        return Output(result.image, result.alpha, cutout, result.seed, result.generation_size, result)


def _alpha_u8(alpha: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)
