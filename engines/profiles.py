"""TensorRT optimization profiles (min/opt/max input shapes) derived from the models' I/O specs.

A TensorRT engine built from a graph with dynamic axes needs, for every input,
the smallest, the tuned-for and the largest shape it must accept
(``IOptimizationProfile.set_shape(name, min, opt, max)``; see NVIDIA's
"Working with Dynamic Shapes" in the TensorRT developer guide). NVIDIA's
diffusion demo writes these by hand per model; here they follow from
:mod:`trt_bgswap.specs`: only symbolic dims (``B``, ``H``, ``h``, ...) vary,
fixed dims stay as declared, and every latent size comes from
:func:`trt_bgswap.specs.pipeline_dims`.

By default each generation size gets its own *static* profile (min = opt = max),
which lets TensorRT pick the fastest kernels and lets the runtime capture CUDA
graphs; ``dynamic`` asks for one profile spanning a size range instead.

numpy-free and TensorRT-free: unit-tested on CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.trt_shapes import ShapeProfile, TensorProfile
from trt_bgswap.specs import ModelSpec, pipeline_dims

Size = tuple[int, int]  # (width, height) in pixels, as the CLI's --size WxH

# Models whose batch doubles when classifier-free guidance runs (batch order [uncond, cond]);
# the pipeline runs every other model at batch 1 (see runtime/pipeline.py).
GUIDED_BATCH_MODELS: tuple[str, ...] = ("unet", "unet_step")


@dataclass(frozen=True)
class DimRange:
    """One symbol's min/opt/max value."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise UsageError(f"dim range min={self.min} opt={self.opt} max={self.max}: need 1 <= min <= opt <= max")

    @classmethod
    def fixed(cls, value: int) -> "DimRange":
        return cls(value, value, value)


def profile_from_ranges(spec: ModelSpec, ranges: Mapping[str, DimRange]) -> ShapeProfile:
    """The profile of ``spec``'s inputs when each symbol takes its min/opt/max; fixed dims never vary."""
    tensors = []
    for t in spec.inputs:
        missing = list(dict.fromkeys(s for s in t.symbols() if s not in ranges))
        if missing:
            raise UsageError(f"{spec.name}.{t.name}: no range given for dims {missing} (have {sorted(ranges)})")
        tensors.append(
            TensorProfile(
                t.name,
                t.resolve({s: r.min for s, r in ranges.items()}),
                t.resolve({s: r.opt for s, r in ranges.items()}),
                t.resolve({s: r.max for s, r in ranges.items()}),
            )
        )
    return ShapeProfile(tuple(tensors))


@dataclass(frozen=True)
class GenerationShapes:
    """What the engines must serve: generation sizes, batch sizes, and optionally a dynamic size range.

    ``sizes`` are (width, height); the first is the size TensorRT tunes for
    (``opt``). ``batches`` lists the batch sizes of the guided models (1, and 2
    when classifier-free guidance is used); the first is tuned for.
    ``dynamic`` = ((min_w, min_h), (max_w, max_h)) builds one profile over
    that range instead of one static profile per size.
    """

    sizes: tuple[Size, ...]
    batches: tuple[int, ...] = (1,)
    dynamic: tuple[Size, Size] | None = None

    def __post_init__(self) -> None:
        if not self.sizes:
            raise UsageError("no generation size given; pass --size WxH (e.g. 512x512)")
        if not self.batches or any(b < 1 for b in self.batches):
            raise UsageError(f"batches={self.batches}: give one or more batch sizes >= 1")
        if self.dynamic is not None:
            (lo_w, lo_h), (hi_w, hi_h) = self.dynamic
            if lo_w > hi_w or lo_h > hi_h:
                raise UsageError(f"--dynamic {lo_w}x{lo_h}..{hi_w}x{hi_h}: the minimum exceeds the maximum")
            for w, h in self.sizes:
                if not (lo_w <= w <= hi_w and lo_h <= h <= hi_h):
                    raise UsageError(
                        f"--size {w}x{h} lies outside --dynamic {lo_w}x{lo_h}..{hi_w}x{hi_h}; widen the range or change the size"
                    )

    def check_multiple(self, multiple: int) -> None:
        """Every size must divide by the model's size multiple (VAE x UNet downsampling)."""
        corners = list(self.sizes) + (list(self.dynamic) if self.dynamic else [])
        for w, h in corners:
            if w % multiple or h % multiple:
                raise UsageError(f"size {w}x{h} is not a multiple of {multiple}; round it to a multiple of {multiple}")


def parse_size_range(text: str) -> tuple[Size, Size]:
    """``--dynamic`` syntax: ``MIN..MAX`` where each side is ``N`` (square) or ``WxH``; e.g. ``256..768``, ``512x384..1024x768``."""
    parts = text.split("..")
    corners = []
    try:
        if len(parts) != 2:
            raise ValueError
        for p in parts:
            w, sep, h = p.strip().lower().partition("x")
            corners.append((int(w), int(h) if sep else int(w)))
    except ValueError:
        raise UsageError(f"--dynamic {text!r}: write MIN..MAX with sizes as N or WxH, e.g. 256..768 or 512x384..1024x768") from None
    if any(v < 1 for c in corners for v in c):
        raise UsageError(f"--dynamic {text!r}: sizes must be positive")
    return corners[0], corners[1]


def _size_dims(batch: int, size: Size, vae_scale_factor: int) -> dict[str, int]:
    width, height = size
    return pipeline_dims(batch, height, width, vae_scale_factor)


def _ranges(lo: Mapping[str, int], opt: Mapping[str, int], hi: Mapping[str, int]) -> dict[str, DimRange]:
    return {k: DimRange(lo[k], opt[k], hi[k]) for k in opt}


def model_profiles(
    spec: ModelSpec,
    shapes: GenerationShapes,
    vae_scale_factor: int,
    extra_dims: Mapping[str, int] | None = None,
) -> list[ShapeProfile]:
    """Optimization profiles for one model of the pipeline.

    ``extra_dims`` fixes symbols that do not follow the generation size (RMBG's
    input side ``S`` comes from its own config). Models not in
    :data:`GUIDED_BATCH_MODELS` run at batch 1. Profiles that come out equal
    (the text encoder does not depend on the size) are kept once.
    """
    extra = dict(extra_dims or {})
    batches = shapes.batches if spec.name in GUIDED_BATCH_MODELS else (1,)
    if shapes.dynamic is None:
        dim_sets = [
            {**_size_dims(b, s, vae_scale_factor), **extra} for s in shapes.sizes for b in batches
        ]
        candidates = [profile_from_ranges(spec, {k: DimRange.fixed(v) for k, v in d.items()}) for d in dim_sets]
    else:
        lo = {**_size_dims(min(batches), shapes.dynamic[0], vae_scale_factor), **extra}
        opt = {**_size_dims(batches[0], shapes.sizes[0], vae_scale_factor), **extra}
        hi = {**_size_dims(max(batches), shapes.dynamic[1], vae_scale_factor), **extra}
        candidates = [profile_from_ranges(spec, _ranges(lo, opt, hi))]
    unique: list[ShapeProfile] = []
    for p in candidates:
        if p not in unique:
            unique.append(p)
    return unique


def envelope(profiles: Sequence[ShapeProfile]) -> ShapeProfile:
    """One profile covering them all (min of mins, max of maxes, the first profile's opt).

    ONNX Runtime's TensorRT execution provider takes a single explicit range;
    this is it.
    """
    if not profiles:
        raise UsageError("no profiles to combine")
    first = profiles[0]
    tensors = []
    for t in first.tensors:
        all_t = [p.tensor(t.name) for p in profiles]
        tensors.append(
            TensorProfile(
                t.name,
                tuple(min(x) for x in zip(*(a.min for a in all_t))),
                t.opt,
                tuple(max(x) for x in zip(*(a.max for a in all_t))),
            )
        )
    return ShapeProfile(tuple(tensors))
