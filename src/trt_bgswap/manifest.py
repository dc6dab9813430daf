"""The exported folder's manifest: what it was made from and how to run it.

An exported folder mirrors Hugging Face's ONNX diffusion layout
(``text_encoder/``, ``unet/``, ``vae_encoder/``, ``vae_decoder/``, each with a
``model.onnx``) plus ``rmbg/``, ``tokenizer/`` and ``manifest.json``. The
manifest records the sources (with hashes), precision, opset and library
versions, every model's I/O spec, and the constants the runtime needs, read
from the models' own configs (VAE scaling factor, latent channels, downsampling
factor, scheduler config). The runtime reads only this file and the graphs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import write_text_atomic
from trt_bgswap.errors import ModelError
from trt_bgswap.specs import ModelSpec

MANIFEST_NAME = "manifest.json"
FORMAT = "trt-bgswap-export"
FORMAT_VERSION = 1
MODEL_NAMES = ("text_encoder", "unet", "vae_encoder", "vae_decoder", "rmbg")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class InpaintConfig:
    """Constants of the inpainting model, read from its diffusers configs (never literals)."""

    vae_scaling_factor: float  # vae/config.json "scaling_factor" (0.18215 for SD1.5)
    vae_shift_factor: float | None  # SD1.5 has none; kept for families that do
    vae_scale_factor: int  # pixel -> latent downsampling: 2 ** (len(vae block_out_channels) - 1)
    latent_channels: int  # vae/config.json "latent_channels"
    unet_in_channels: int  # 9 for inpainting UNets: latents + mask + masked-image latents
    size_multiple: int  # generation sizes must divide by this: VAE factor x UNet downsampling
    default_size: int  # unet sample_size x vae_scale_factor (512 for SD1.5)
    max_length: int  # tokenizer model_max_length / text encoder positions (77)
    scheduler: dict[str, Any]  # the pipeline's scheduler_config.json, for the LCM scheduler
    tokenizer_dir: str = "tokenizer"
    # --- the model family (trt_bgswap.families) and what only some families have; defaults are SD1's ---
    family: str = "sd1"  # decided from the model's configs at export (families.family_of)
    tokenizer_2_dir: str | None = None  # SDXL: the second text encoder's tokenizer (pads with "!")
    force_zeros_for_empty_prompt: bool = False  # SDXL model_index.json: no negative prompt -> zero uncond rows
    requires_aesthetics_score: bool = False  # SDXL model_index.json: time ids carry an aesthetic score, not the target size

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "InpaintConfig":
        return cls(**d)


@dataclass(frozen=True)
class RmbgConfig:
    """RMBG pre/post-processing constants (RMBG-1.4: 1024x1024, x/255 - 0.5, std 1)."""

    input_size: tuple[int, int]  # (height, width) the net takes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_name: str
    output_name: str  # the main mask output; published ONNX files may carry side outputs too
    masker: str = "rmbg-1.4"  # the registry variant whose pre/post-processing and licence apply (runtime/masker.py)
    postprocess: str = "minmax"  # "minmax" (RMBG-1.4), "sigmoid" (logits: BiRefNet), "clip" (a graph that ends in its sigmoid)

    def to_json(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "input_name": self.input_name,
            "output_name": self.output_name,
            "masker": self.masker,
            "postprocess": self.postprocess,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RmbgConfig":
        return cls(
            input_size=tuple(d["input_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            input_name=d["input_name"],
            output_name=d["output_name"],
            masker=d.get("masker", "rmbg-1.4"),  # exports before issue 12 are RMBG-1.4's
            postprocess=d.get("postprocess", "minmax"),
        )


@dataclass(frozen=True)
class ModelEntry:
    file: str  # relative to the export folder
    sha256: str
    precision: str
    spec: ModelSpec

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "precision": self.precision, "spec": self.spec.to_json()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ModelEntry":
        return cls(file=d["file"], sha256=d["sha256"], precision=d["precision"], spec=ModelSpec.from_json(d["spec"]))


@dataclass
class Manifest:
    precision: str
    opset: int | None
    models: dict[str, ModelEntry]
    inpaint: InpaintConfig | None
    rmbg: RmbgConfig | None
    sources: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)  # trt_bgswap.memory facts, measured by the exporter

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": self.created,
            "precision": self.precision,
            "opset": self.opset,
            "versions": self.versions,
            "sources": self.sources,
            "models": {k: v.to_json() for k, v in self.models.items()},
            "inpaint": self.inpaint.to_json() if self.inpaint else None,
            "rmbg": self.rmbg.to_json() if self.rmbg else None,
            "extra": self.extra,
            "memory": self.memory,
        }

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        write_text_atomic(path, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise ModelError(
                f"{folder}: no {MANIFEST_NAME} here; this is not an exported model folder "
                f"(make one with `trt-bgswap export ... --out {folder}`)"
            )
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: unreadable manifest ({e}); re-run `trt-bgswap export`") from e
        if d.get("format") != FORMAT:
            raise ModelError(f"{path}: not a trt-bgswap manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise ModelError(
                f"{path}: manifest format version {d.get('format_version')} but this trt-bgswap reads "
                f"{FORMAT_VERSION}; re-run `trt-bgswap export`"
            )
        try:
            return cls(
                precision=d["precision"],
                opset=d.get("opset"),
                models={k: ModelEntry.from_json(v) for k, v in d["models"].items()},
                inpaint=InpaintConfig.from_json(d["inpaint"]) if d.get("inpaint") else None,
                rmbg=RmbgConfig.from_json(d["rmbg"]) if d.get("rmbg") else None,
                sources=d.get("sources", {}),
                versions=d.get("versions", {}),
                created=d.get("created", ""),
                extra=d.get("extra", {}),
                memory=d.get("memory", {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{path}: malformed manifest ({e!r}); re-run `trt-bgswap export`") from e

    def model_path(self, folder: str | Path, name: str) -> Path:
        if name not in self.models:
            raise ModelError(f"{folder}: the export has no {name!r} model (has {sorted(self.models)})")
        return Path(folder) / self.models[name].file
