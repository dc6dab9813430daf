"""Model I/O tensor specs, declared once per model.

NVIDIA's TensorRT diffusion demo restates each model's shapes in several places
(input names, dynamic axes, sample inputs, optimization profiles, buffer sizes)
and they drift. Here a model's inputs and outputs are declared once, as names,
dtypes and dims (an int, or a symbol such as ``B`` or ``h``); ONNX dynamic axes,
TensorRT profiles, buffer sizes and input validation are all derived from it.

Symbols used by the built-in models:

- ``B``: batch (2x the images when classifier-free guidance runs)
- ``H``, ``W``: generation size in pixels; ``h``, ``w``: latent size
- ``S``: the RMBG network's square input size when the graph leaves it dynamic
- ``PH``, ``PW``: a photo's own size (``rmbg_full`` takes the photo as it is)

This module is imported by the lean runtime: numpy only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

Dim = Union[int, str]

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
# The same dtypes by their onnx.TensorProto names (the one map from spec dtypes to ONNX; no onnx import here).
ONNX_TYPES: dict[str, str] = {"float32": "FLOAT", "float16": "FLOAT16", "int32": "INT32", "int64": "INT64", "uint8": "UINT8", "bool": "BOOL"}

# --- Graph names: the manifest's model keys, the export's sub-folders and the build index's keys. ---

TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's second text encoder (OpenCLIP ViT-bigG with its projection)
UNET = "unet"
UNET_STEP = "unet_step"  # UNet + guidance + LCM step in one graph (export --fused-step)
VAE_ENCODER = "vae_encoder"
VAE_DECODER = "vae_decoder"
RMBG = "rmbg"
VAE_ENCODER_SAMPLE = "vae_encoder_sample"  # device graphs (export --device-graphs): host arithmetic inside
VAE_DECODER_IMAGE = "vae_decoder_image"
RMBG_FULL = "rmbg_full"

HOST_GRAPHS = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_ENCODER, VAE_DECODER, RMBG)
INPAINT_GRAPHS = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_ENCODER, VAE_DECODER)  # TEXT_ENCODER_2: SDXL only
DEVICE_GRAPHS = (VAE_ENCODER_SAMPLE, VAE_DECODER_IMAGE, RMBG_FULL)
# the host-path graph each device graph stands in for (not opened when its device graph runs)
DEVICE_GRAPH_REPLACES = {VAE_ENCODER_SAMPLE: VAE_ENCODER, VAE_DECODER_IMAGE: VAE_DECODER, RMBG_FULL: RMBG}
MASK_GRAPHS = (RMBG, RMBG_FULL)


# --- Tensor names, per graph (the spec functions below declare them; code refers to them here). ---


class TextEncoderIO:
    INPUT_IDS = "input_ids"
    HIDDEN_STATES = "last_hidden_state"
    PENULTIMATE = "penultimate_hidden_state"  # SDXL conditions on the layer before the last (diffusers' hidden_states[-2])
    TEXT_EMBEDS = "text_embeds"  # the projected pooled output (CLIPTextModelWithProjection): SDXL's text_encoder_2


class UnetIO:
    SAMPLE = "sample"
    TIMESTEP = "timestep"
    ENCODER_HIDDEN_STATES = "encoder_hidden_states"
    OUT_SAMPLE = "out_sample"
    # SDXL's added conditions (unet config addition_embed_type "text_time"): the pooled prompt and the size ids
    TEXT_EMBEDS = "text_embeds"
    TIME_IDS = "time_ids"


class StepIO:
    """unet_step: one whole LCM step; its inputs fall in two groups the device loop treats differently."""

    LATENTS = "latents"
    MASK = "mask"
    MASKED_IMAGE_LATENTS = "masked_image_latents"
    ENCODER_HIDDEN_STATES = "encoder_hidden_states"
    TIMESTEP = "timestep"
    GUIDANCE = "guidance"
    COEFFICIENTS = "coefficients"
    NOISE = "noise"
    PREV_LATENTS = "prev_latents"
    DENOISED = "denoised"
    LOOP = (LATENTS, NOISE, TIMESTEP, COEFFICIENTS, PREV_LATENTS, DENOISED)  # change at every step
    CONDITIONING = (MASK, MASKED_IMAGE_LATENTS, ENCODER_HIDDEN_STATES, GUIDANCE)  # fixed for a generation


class VaeEncoderIO:
    SAMPLE = "sample"
    MEAN = "latent_mean"
    STD = "latent_std"


class VaeDecoderIO:
    LATENTS = "latent_sample"
    SAMPLE = "sample"


class VaeEncoderSampleIO:
    SAMPLE = "sample"
    EPS = "eps"
    LATENTS = "masked_image_latents"


class VaeDecoderImageIO:
    LATENTS = "latents"
    IMAGE = "image"


class RmbgFullIO:
    IMAGE = "image"
    ALPHA = "alpha"


class SpecError(ValueError):
    """An array does not match the model's declared I/O spec."""


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: dtype and dims (ints are fixed, strings are symbols)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SpecError(f"{self.name}: dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        for d in self.shape:
            if isinstance(d, int) and d < 0:
                raise SpecError(f"{self.name}: negative dim {d}")

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def symbols(self) -> list[str]:
        return [d for d in self.shape if isinstance(d, str)]

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape for given symbol values."""
        out = []
        for d in self.shape:
            if isinstance(d, str):
                if d not in dims:
                    raise SpecError(f"{self.name}: no value given for dim {d!r} (have {sorted(dims)})")
                out.append(int(dims[d]))
            else:
                out.append(d)
        return tuple(out)

    def nbytes(self, dims: Mapping[str, int]) -> int:
        return int(np.prod(self.resolve(dims), dtype=np.int64)) * self.np_dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


@dataclass(frozen=True)
class ModelSpec:
    """A model's inputs and outputs; the single source of its shapes."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in (*self.inputs, *self.outputs):
            if t.name == name:
                return t
        raise SpecError(f"{self.name}: no tensor named {name!r} (have {self.input_names + self.output_names})")

    def symbols(self) -> list[str]:
        seen: dict[str, None] = {}
        for t in (*self.inputs, *self.outputs):
            for s in t.symbols():
                seen.setdefault(s, None)
        return list(seen)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s dynamic_axes for this spec."""
        axes: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, *self.outputs):
            sym = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if sym:
                axes[t.name] = sym
        return axes

    def input_shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.resolve(dims) for t in self.inputs}

    def output_shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.resolve(dims) for t in self.outputs}

    def infer_dims(self, arrays: Mapping[str, np.ndarray], tensors: Iterable[TensorSpec] | None = None) -> dict[str, int]:
        """Check arrays against the spec and return the symbol values they imply.

        Raises SpecError naming the tensor, what was expected and what came.
        """
        dims: dict[str, int] = {}
        specs = list(self.inputs if tensors is None else tensors)
        missing = [t.name for t in specs if t.name not in arrays]
        if missing:
            raise SpecError(f"{self.name}: missing inputs {missing}; expected {[t.name for t in specs]}")
        extra = sorted(set(arrays) - {t.name for t in specs})
        if extra and tensors is None:
            raise SpecError(f"{self.name}: unexpected inputs {extra}; expected {[t.name for t in specs]}")
        for t in specs:
            a = arrays[t.name]
            if a.dtype != t.np_dtype:
                raise SpecError(f"{self.name}.{t.name}: dtype {a.dtype} but the model takes {t.dtype}")
            if a.ndim != len(t.shape):
                raise SpecError(f"{self.name}.{t.name}: shape {a.shape} but the model takes rank {len(t.shape)} {t.shape}")
            for axis, (want, got) in enumerate(zip(t.shape, a.shape)):
                if isinstance(want, int):
                    if want != got:
                        raise SpecError(f"{self.name}.{t.name}: dim {axis} is {got}, the model takes {want} (shape {t.shape})")
                else:
                    if dims.setdefault(want, int(got)) != got:
                        raise SpecError(
                            f"{self.name}.{t.name}: dim {axis} ({want}) is {got} but another input set {want}={dims[want]}"
                        )
        return dims

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ModelSpec":
        return cls(
            name=d["name"],
            inputs=tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in d["outputs"]),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


# --- The built-in models. Channel counts and sizes come from the model configs. ---


def text_encoder_spec(
    max_length: int,
    hidden_size: int,
    hidden_output: str = TextEncoderIO.HIDDEN_STATES,
    projection_dim: int | None = None,
    name: str = TEXT_ENCODER,
) -> ModelSpec:
    """CLIP text encoder: token ids in (int32, friendlier to TensorRT), the hidden states out.

    ``hidden_output`` names which hidden states (the last, or SDXL's penultimate); ``projection_dim``
    adds the projected pooled output ``text_embeds`` (SDXL's ``text_encoder_2``).
    """
    outputs = [TensorSpec(hidden_output, "float32", ("B", max_length, hidden_size))]
    if projection_dim is not None:
        outputs.append(TensorSpec(TextEncoderIO.TEXT_EMBEDS, "float32", ("B", projection_dim)))
    return ModelSpec(name, inputs=(TensorSpec(TextEncoderIO.INPUT_IDS, "int32", ("B", max_length)),), outputs=tuple(outputs))


def unet_spec(
    in_channels: int,
    out_channels: int,
    max_length: int,
    hidden_size: int,
    dtype: str = "float32",
    added: tuple[int, int] | None = None,
) -> ModelSpec:
    """Inpainting UNet: 9 input channels = latents + mask + masked-image latents.

    ``added`` = (text_embeds width, number of time ids) for SDXL's added conditions
    (``addition_embed_type`` "text_time"), one row per batch row like the hidden states.
    """
    inputs = [
        TensorSpec(UnetIO.SAMPLE, dtype, ("B", in_channels, "h", "w")),
        TensorSpec(UnetIO.TIMESTEP, dtype, ("B",)),
        TensorSpec(UnetIO.ENCODER_HIDDEN_STATES, dtype, ("B", max_length, hidden_size)),
    ]
    if added is not None:
        inputs += [TensorSpec(UnetIO.TEXT_EMBEDS, dtype, ("B", added[0])), TensorSpec(UnetIO.TIME_IDS, dtype, ("B", added[1]))]
    return ModelSpec(UNET, inputs=tuple(inputs), outputs=(TensorSpec(UnetIO.OUT_SAMPLE, dtype, ("B", out_channels, "h", "w")),))


def unet_step_spec(latent_channels: int, max_length: int, hidden_size: int, num_coefficients: int) -> ModelSpec:
    """One whole LCM denoising step (UNet + guidance + scheduler arithmetic) as one graph.

    The latents stay at batch 1; only the text embeddings carry ``B`` (2 when
    classifier-free guidance runs, batch order [uncond, cond]). ``coefficients`` is
    one row of the scheduler's per-step table (``runtime.scheduler.COEFFICIENT_NAMES``
    order), so the same graph serves every step. float32 I/O at any precision.
    """
    latent_shape: tuple[Dim, ...] = (1, latent_channels, "h", "w")
    return ModelSpec(
        UNET_STEP,
        inputs=(
            TensorSpec(StepIO.LATENTS, "float32", latent_shape),
            TensorSpec(StepIO.MASK, "float32", (1, 1, "h", "w")),
            TensorSpec(StepIO.MASKED_IMAGE_LATENTS, "float32", latent_shape),
            TensorSpec(StepIO.ENCODER_HIDDEN_STATES, "float32", ("B", max_length, hidden_size)),
            TensorSpec(StepIO.TIMESTEP, "float32", (1,)),
            TensorSpec(StepIO.GUIDANCE, "float32", (1,)),
            TensorSpec(StepIO.COEFFICIENTS, "float32", (num_coefficients,)),
            TensorSpec(StepIO.NOISE, "float32", latent_shape),
        ),
        outputs=(
            TensorSpec(StepIO.PREV_LATENTS, "float32", latent_shape),
            TensorSpec(StepIO.DENOISED, "float32", latent_shape),
        ),
    )


def vae_encoder_spec(image_channels: int, latent_channels: int, dtype: str = "float32") -> ModelSpec:
    """VAE encoder: the posterior's mean and std, so the caller controls the sample drawn."""
    return ModelSpec(
        VAE_ENCODER,
        inputs=(TensorSpec(VaeEncoderIO.SAMPLE, dtype, ("B", image_channels, "H", "W")),),
        outputs=(
            TensorSpec(VaeEncoderIO.MEAN, dtype, ("B", latent_channels, "h", "w")),
            TensorSpec(VaeEncoderIO.STD, dtype, ("B", latent_channels, "h", "w")),
        ),
    )


def vae_decoder_spec(image_channels: int, latent_channels: int, dtype: str = "float32") -> ModelSpec:
    return ModelSpec(
        VAE_DECODER,
        inputs=(TensorSpec(VaeDecoderIO.LATENTS, dtype, ("B", latent_channels, "h", "w")),),
        outputs=(TensorSpec(VaeDecoderIO.SAMPLE, dtype, ("B", image_channels, "H", "W")),),
    )


def rmbg_spec(input_size: int | None, input_name: str = "input", output_name: str = "output") -> ModelSpec:
    """RMBG / IS-Net: normalised RGB in, the main (sigmoid) mask out. Side outputs are not part of the spec."""
    s: Dim = input_size if input_size is not None else "S"
    return ModelSpec(
        RMBG,
        inputs=(TensorSpec(input_name, "float32", ("B", 3, s, s)),),
        outputs=(TensorSpec(output_name, "float32", ("B", 1, s, s)),),
    )


# --- Device-graph variants: the host arithmetic around a model moved into its graph (export --device-graphs). ---


def vae_encoder_sample_spec(image_channels: int, latent_channels: int) -> ModelSpec:
    """VAE encoder + posterior draw + scaling: masked image and eps in, UNet-ready masked-image latents out."""
    return ModelSpec(
        VAE_ENCODER_SAMPLE,
        inputs=(
            TensorSpec(VaeEncoderSampleIO.SAMPLE, "float32", ("B", image_channels, "H", "W")),
            TensorSpec(VaeEncoderSampleIO.EPS, "float32", ("B", latent_channels, "h", "w")),
        ),
        outputs=(TensorSpec(VaeEncoderSampleIO.LATENTS, "float32", ("B", latent_channels, "h", "w")),),
    )


def vae_decoder_image_spec(image_channels: int, latent_channels: int) -> ModelSpec:
    """Unscaling + VAE decoder + [-1, 1] -> [0, 1] clamp: scaled latents in, the image (NCHW, float32) out."""
    return ModelSpec(
        VAE_DECODER_IMAGE,
        inputs=(TensorSpec(VaeDecoderImageIO.LATENTS, "float32", ("B", latent_channels, "h", "w")),),
        outputs=(TensorSpec(VaeDecoderImageIO.IMAGE, "float32", ("B", image_channels, "H", "W")),),
    )


def rmbg_full_spec(batch: Dim = "B") -> ModelSpec:
    """RMBG with its pre/post-processing inside: a uint8 NHWC photo of any size ``PH`` x ``PW`` in, its alpha out.

    uint8 NHWC is what the image decoder yields: the host neither transposes nor converts,
    and the upload is a quarter of a float32 one. ``batch`` is the net's own (1 for published
    graphs that fix it).
    """
    return ModelSpec(
        RMBG_FULL,
        inputs=(TensorSpec(RmbgFullIO.IMAGE, "uint8", (batch, "PH", "PW", 3)),),
        outputs=(TensorSpec(RmbgFullIO.ALPHA, "float32", (batch, 1, "PH", "PW")),),
    )


def pipeline_dims(
    batch: int,
    height: int,
    width: int,
    vae_scale_factor: int,
) -> dict[str, int]:
    """Every symbol's value for one generation size; the one place latent sizes are computed."""
    if height % vae_scale_factor or width % vae_scale_factor:
        raise SpecError(f"size {width}x{height} is not a multiple of the VAE's downsampling factor {vae_scale_factor}")
    return {
        "B": batch,
        "H": height,
        "W": width,
        "h": height // vae_scale_factor,
        "w": width // vae_scale_factor,
    }
