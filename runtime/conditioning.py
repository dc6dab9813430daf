"""The conditioning stage: a prompt (or the negative prompt) -> everything the UNet is conditioned on.

One :class:`Conditioning` per prompt row: the encoder hidden states, plus the UNet's added
conditions by graph input name where the family has them. The pipeline asks a
:class:`Conditioner` for rows and stacks them; which conditioner runs is the assembler's decision
(:mod:`trt_bgswap.runtime.assemble`), made once from the manifest's family:

- :class:`ClipConditioner` (SD1, SD2): ``StableDiffusionInpaintPipeline.encode_prompt`` - the text
  encoder's last hidden state; no negative prompt is the empty prompt, encoded like any other.
- :class:`SdxlConditioner` (SDXL): ``StableDiffusionXLInpaintPipeline.encode_prompt`` and
  ``_get_add_time_ids`` (diffusers 0.42) - both encoders' penultimate hidden states concatenated on
  the feature axis (``text_encoder`` first), the second encoder's projected pooled output as
  ``text_embeds``, and ``time_ids`` = original size + crop top-left + target size, as (height, width)
  pairs, where original and target size are the generation size and the crop is (0, 0) (the
  pipeline's defaults). With ``force_zeros_for_empty_prompt`` (the SDXL inpainting model's
  ``model_index.json``) a missing negative prompt gives all-zero uncond rows; the runtime's empty
  negative prompt is diffusers' ``negative_prompt=None``. With ``requires_aesthetics_score`` the
  time ids end in the aesthetic score (6.0, negative 2.5: the pipeline's defaults) instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from trt_bgswap.errors import UsageError
from trt_bgswap.manifest import InpaintConfig
from trt_bgswap.runtime.text_encoder import TextEncoder
from trt_bgswap.specs import TextEncoderIO, UnetIO

CROP_TOP_LEFT = (0, 0)  # StableDiffusionXLInpaintPipeline.__call__'s crops_coords_top_left default
AESTHETIC_SCORE = 6.0  # its aesthetic_score default (used when requires_aesthetics_score)
NEGATIVE_AESTHETIC_SCORE = 2.5  # its negative_aesthetic_score default

Size = tuple[int, int]  # (width, height) of the generation


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on, for N rows: hidden states and added conditions by UNet input name."""

    hidden: np.ndarray  # (N, S, D) encoder_hidden_states
    added: Mapping[str, np.ndarray] = field(default_factory=dict)  # e.g. text_embeds (N, P), time_ids (N, T)

    @staticmethod
    def stack(rows: Sequence["Conditioning"]) -> "Conditioning":
        """Rows in order along the batch axis (the guided order [uncond..., cond...] is the caller's)."""
        if not rows:
            raise UsageError("no conditioning rows to stack")
        names = set(rows[0].added)
        if any(set(r.added) != names for r in rows):
            raise UsageError(f"conditioning rows carry different added conditions: {[sorted(r.added) for r in rows]}")
        return Conditioning(
            np.concatenate([r.hidden for r in rows]),
            {name: np.concatenate([r.added[name] for r in rows]) for name in rows[0].added},
        )


class Conditioner(Protocol):
    """The text stage of a family."""

    @property
    def backend(self) -> str: ...

    def prompt(self, text: str, size: Size) -> Conditioning:
        """One cond row for a prompt at a generation size."""
        ...

    def negative(self, text: str, size: Size) -> Conditioning:
        """One uncond row (classifier-free guidance) for a negative prompt; ``""`` means none was given."""
        ...

    def close(self) -> None: ...


class ClipConditioner:
    """SD1/SD2: the CLIP text encoder's last hidden state; the negative prompt is encoded like a prompt."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder

    @property
    def backend(self) -> str:
        return self.encoder.backend

    def prompt(self, text: str, size: Size) -> Conditioning:
        return Conditioning(self.encoder.embeddings(text))

    def negative(self, text: str, size: Size) -> Conditioning:
        return Conditioning(self.encoder.embeddings(text))

    def close(self) -> None:
        self.encoder.close()


class SdxlConditioner:
    """SDXL: two encoders' penultimate states concatenated, the pooled ``text_embeds`` and the size ``time_ids``."""

    def __init__(self, encoder: TextEncoder, encoder_2: TextEncoder, cfg: InpaintConfig) -> None:
        self.encoder, self.encoder_2, self.cfg = encoder, encoder_2, cfg

    @property
    def backend(self) -> str:
        return self.encoder_2.backend

    def time_ids(self, size: Size, negative: bool) -> np.ndarray:
        """(1, T) float32: original size, crop top-left, then the target size (or the aesthetic score)."""
        width, height = size
        tail: tuple[float, ...]
        if self.cfg.requires_aesthetics_score:
            tail = (NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE,)
        else:
            tail = (height, width)
        return np.array([[height, width, *CROP_TOP_LEFT, *tail]], dtype=np.float32)

    def _encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        first = self.encoder.outputs(text)[TextEncoderIO.PENULTIMATE]
        second = self.encoder_2.outputs(text)
        hidden = np.concatenate([first, second[TextEncoderIO.PENULTIMATE]], axis=-1)
        return hidden, second[TextEncoderIO.TEXT_EMBEDS]

    def prompt(self, text: str, size: Size) -> Conditioning:
        hidden, pooled = self._encode(text)
        return Conditioning(hidden, {UnetIO.TEXT_EMBEDS: pooled, UnetIO.TIME_IDS: self.time_ids(size, negative=False)})

    def negative(self, text: str, size: Size) -> Conditioning:
        hidden, pooled = self._encode(text)
        if not text and self.cfg.force_zeros_for_empty_prompt:
            hidden, pooled = np.zeros_like(hidden), np.zeros_like(pooled)
        return Conditioning(hidden, {UnetIO.TEXT_EMBEDS: pooled, UnetIO.TIME_IDS: self.time_ids(size, negative=True)})

    def close(self) -> None:
        self.encoder.close()
        self.encoder_2.close()
