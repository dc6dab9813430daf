"""Fuse LoRAs (the LCM-LoRA and the user's own) into the UNet and text encoder before export.

LoRA (Hu et al. 2021, arXiv:2106.09685) adds ``scale * (alpha / rank) * up @ down`` to a layer's
weight; LCM-LoRA (Luo et al. 2023, arXiv:2311.05556) is such an update for every attention,
feed-forward and ResNet layer of the SD1.5 UNet. The exported graphs carry the fused weights, so
they have no LoRA branch.

Loading and fusion go through diffusers' own machinery, the reference the parity tests compare
against: ``StableDiffusionLoraLoaderMixin.load_lora_weights`` (which converts every layout below to
PEFT keys and reads kohya alphas and PEFT's ``lora_adapter_metadata``), ``fuse_lora(lora_scale=...)``
and ``unload_lora_weights``. This module only recognises the layout first, so that a file diffusers
would load partly or silently ignore is refused with a one-line error, and checks afterwards that
every LoRA module in the file found its layer. The hand-written kohya merge this replaces gave
bit-identical weights on the tiny LCM-LoRA (measured: max abs difference 0.0 at scales 0.7, 1 and
1.3), but only by the coincidence of equal summation orders (PEFT builds a conv LoRA's kernel with
``conv2d``, we used a matmul); going through diffusers makes the weights diffusers' by construction
and covers every layout with one code path.

Layouts accepted (what ``load_lora_weights`` of diffusers 0.42 accepts for SD1.5, per component):

- ``kohya``: ``lora_unet_<module, dots as underscores>`` / ``lora_te_`` (or ``lora_te1_``) keys with
  ``.lora_down.weight``, ``.lora_up.weight`` and optional ``.alpha`` (no alpha means alpha = rank);
  latent-consistency/lcm-lora-sdv1-5, kohya-ss/sd-scripts, A1111 and ComfyUI files.
- ``peft``: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` and ``text_encoder.<module>...``,
  with or without PEFT's ``LoraConfig`` in the safetensors metadata (``lora_adapter_metadata``, which
  carries ``lora_alpha``; without it alpha = rank); ``save_lora_weights`` of current diffusers.
- ``diffusers-old``: ``unet.<module>.lora.down.weight`` / ``.lora.up.weight`` (diffusers 0.21-0.24
  LoRA layers, and today's training scripts after ``convert_state_dict_to_diffusers``), the
  attention-processor keys ``unet.<block>.attn1.processor.to_q_lora.down.weight`` (diffusers <= 0.20)
  and ``text_encoder.<module>.lora_linear_layer.down.weight``; no alphas (alpha = rank).

SDXL (issue 12): with ``text_encoder_2`` given, the host is ``StableDiffusionXLInpaintPipeline`` and its
``StableDiffusionXLLoraLoaderMixin`` (kohya ``lora_te1_``/``lora_te2_``, peft ``text_encoder_2.``), so
latent-consistency/lcm-lora-sdxl (kohya keys with alphas over the SDXL UNet, the same layout as the
SD1.5 one) and SDXL user LoRAs go through the same checks; a file with ``text_encoder_2`` weights is
refused for SD1/SD2 models, and a LoRA of another architecture fails the every-module-found check.

Fusion order: the LCM-LoRA first, then the user's LoRAs in the order given; each is loaded, fused at
its own scale and unloaded before the next (diffusers' ``fuse_lora(lora_scale=s)``), so a LoRA's
update is added to the weights its predecessors left.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.manifest import sha256_file

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_FILE_PICKLED = "pytorch_lora_weights.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # what the SD/SDXL loaders fuse into (diffusers' _lora_loadable_modules)
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
DIFFUSERS_PREFIXES = ("unet", "text_encoder", "text_encoder_2")
# suffix -> (layout, role); the longest matching suffix wins
DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": ("peft", "down"),
    ".lora_B.weight": ("peft", "up"),
    ".lora.down.weight": ("diffusers-old", "down"),
    ".lora.up.weight": ("diffusers-old", "up"),
    "_lora.down.weight": ("diffusers-old", "down"),  # attention processors: to_q_lora, to_k_lora, to_v_lora, to_out_lora
    "_lora.up.weight": ("diffusers-old", "up"),
    ".lora_linear_layer.down.weight": ("diffusers-old", "down"),
    ".lora_linear_layer.up.weight": ("diffusers-old", "up"),
}
# Recognised LoRA variants diffusers cannot fuse into SD1.5 exactly; named in the error.
REFUSED_MARKERS = {
    "dora_scale": "DoRA (kohya dora_scale; diffusers drops it and would fuse a different update)",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    "hada_w1": "LyCORIS LoHa (hada_w1_a/hada_w2_b)",
    "lokr_w1": "LyCORIS LoKr (lokr_w1/lokr_w2)",
    ".lora_mid.": "LyCORIS LoCon with a Tucker core (lora_mid)",
    "lora_B.bias": "a LoRA with biases (PEFT lora_bias)",
}
ACCEPTED = (
    "accepted LoRA formats: kohya (lora_unet_*/lora_te_* .lora_down/.lora_up/.alpha), "
    "peft/diffusers (unet.*/text_encoder.* .lora_A/.lora_B, with or without lora_adapter_metadata), "
    "older diffusers (unet.*.lora.down/.lora.up, unet.*.processor.to_q_lora.down, text_encoder.*.lora_linear_layer.down)"
)


@dataclass(frozen=True)
class LoraSource:
    """A LoRA to fuse: a file or a folder holding ``pytorch_lora_weights.safetensors``, at ``scale``."""

    path: Path
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser())
        if not math.isfinite(self.scale):
            raise UsageError(f"LoRA {self.path}: scale {self.scale} is not a finite number; give e.g. 0.8")


@dataclass(frozen=True)
class LoraFile:
    """What a LoRA file holds, read from its keys before anything is loaded into a model."""

    path: Path  # the weights file itself
    layouts: dict[str, str]  # component -> "kohya" | "peft" | "diffusers-old"
    modules: dict[str, int]  # component -> number of LoRA modules (down/up pairs) in the file
    adapter_metadata: bool = False  # PEFT's LoraConfig in the safetensors header

    @property
    def format(self) -> str:
        """One name when every component uses the same layout, else ``unet=peft,text_encoder=diffusers-old``."""
        names = set(self.layouts.values())
        if len(names) == 1:
            return names.pop()
        return ",".join(f"{c}={f}" for c, f in sorted(self.layouts.items()))


@dataclass(frozen=True)
class FusedLora:
    """One fused LoRA, as recorded in the export manifest."""

    file: LoraFile
    scale: float
    sha256: str
    touched: dict[str, int] = field(default_factory=dict)  # component -> layers changed

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.file.path.resolve()),
            "sha256": self.sha256,
            "scale": self.scale,
            "format": self.file.format,
            "adapter_metadata": self.file.adapter_metadata,
            "modules": dict(self.touched),
        }


def parse_lora_spec(text: str) -> LoraSource:
    """``FILE[:SCALE]`` -> LoraSource; an existing path that itself contains ':' is taken whole."""
    whole = Path(text).expanduser()
    head, sep, tail = text.rpartition(":")
    if whole.exists() or not sep or not head:
        return LoraSource(whole)
    try:
        scale = float(tail)
    except ValueError:
        raise UsageError(f"--lora {text!r}: {tail!r} after ':' is not a scale; write FILE or FILE:SCALE, e.g. style.safetensors:0.8") from None
    if not math.isfinite(scale):
        raise UsageError(f"--lora {text!r}: the scale must be a finite number, e.g. style.safetensors:0.8")
    return LoraSource(Path(head).expanduser(), scale)


def lora_file(src: str | Path, allow_pickle: bool = False) -> Path:
    """The LoRA weights file of a folder (diffusers' weight name) or a file path; pickles only if allowed."""
    src = Path(src).expanduser()
    if src.is_dir():
        path = src / LORA_FILE
        if not path.is_file() and (src / LORA_FILE_PICKLED).is_file():
            path = src / LORA_FILE_PICKLED
    else:
        path = src
    if not path.is_file():
        raise ModelError(
            f"{src}: no LoRA weights found (expected {LORA_FILE} in the folder); pass the .safetensors file itself"
        )
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelError(
            f"{path}: a pickled LoRA, which can run code when loaded; convert it to safetensors, or pass --allow-pickle "
            "(allow_pickle=True) if you trust the source"
        )
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise ModelError(f"{path}: LoRA weights must be a .safetensors file (or a pickled .bin with --allow-pickle)")
    return path


def _read_keys(path: Path) -> tuple[list[str], bool]:
    """The file's tensor names and whether PEFT adapter metadata is present, without loading the tensors."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys()), ADAPTER_METADATA_KEY in (f.metadata() or {})
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{path}: not a readable safetensors file ({e}); download the LoRA again") from e
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is one message
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}); download the LoRA again") from e
    if not isinstance(state, dict):
        raise ModelError(f"{path}: holds a {type(state).__name__}, not a LoRA state dict")
    return [str(k) for k in state], False


def _refuse(path: Path, found: str) -> ModelError:
    return ModelError(f"{path}: {found}; {ACCEPTED}")


def _classify(key: str) -> tuple[str, str, str, str]:
    """(component, layout, role, module) of one key, or ("", "", "", reason) when it fits no accepted layout."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            for suffix, role in KOHYA_SUFFIXES.items():
                if key.endswith(suffix):
                    return component, "kohya", role, key[: -len(suffix)]
            return "", "", "", f"a kohya-style key {key!r} with an unknown suffix"
    component, dot, rest = key.partition(".")
    if dot and component in DIFFUSERS_PREFIXES:
        matches = [s for s in DIFFUSERS_SUFFIXES if rest.endswith(s)]
        if matches:
            suffix = max(matches, key=len)
            layout, role = DIFFUSERS_SUFFIXES[suffix]
            return component, layout, role, key[: -len(suffix)]
        return "", "", "", f"a {component} key {key!r} that is not a LoRA matrix"
    if any(s in key for s in DIFFUSERS_SUFFIXES) or key.endswith(tuple(KOHYA_SUFFIXES)):
        return "", "", "", f"LoRA keys without a unet./text_encoder. prefix (e.g. {key!r}; diffusers < 0.17 UNet-only files, which diffusers no longer loads)"
    return "", "", "", f"an unrecognised key {key!r}"


def inspect_lora(src: str | Path, allow_pickle: bool = False, sdxl: bool = False) -> LoraFile:
    """Recognise a LoRA file's layout per component and count its modules; refuse what diffusers cannot fuse exactly."""
    path = lora_file(src, allow_pickle)
    keys, metadata = _read_keys(path)
    if not keys:
        raise _refuse(path, "the file holds no tensors")
    for marker, what in REFUSED_MARKERS.items():
        hit = next((k for k in keys if marker in k), None)
        if hit is not None:
            raise _refuse(path, f"found {what} in key {hit!r}, which is not a plain LoRA")
    layouts: dict[str, set[str]] = {}
    roles: dict[tuple[str, str], set[str]] = {}
    for key in keys:
        component, layout, role, module = _classify(key)
        if not component:
            raise _refuse(path, f"found {module}")
        layouts.setdefault(component, set()).add(layout)
        roles.setdefault((component, module), set()).add(role)
    if "kohya" in {f for fs in layouts.values() for f in fs} and any(fs != {"kohya"} for fs in layouts.values()):
        raise _refuse(path, "found kohya-style keys mixed with diffusers-style keys (diffusers converts a file only when every key is kohya-style)")
    mixed = {c: sorted(fs) for c, fs in layouts.items() if len(fs) > 1}
    if mixed:
        component, names = next(iter(mixed.items()))
        raise _refuse(path, f"found {component} keys in several layouts ({' and '.join(names)}), which diffusers loads only partly")
    if "text_encoder_2" in layouts and not sdxl:
        raise ModelError(
            f"{path}: the LoRA has text_encoder_2 weights, so it was made for SDXL; use a LoRA trained for this model's family"
        )
    counts = {c: 0 for c in layouts}
    for (component, module), have in roles.items():
        missing = {"down", "up"} - have
        if missing:
            raise ModelError(f"{path}: LoRA module {module!r} lacks its {'/'.join(sorted(missing))} matrix; the file is incomplete, download it again")
        counts[component] += 1
    return LoraFile(path=path, layouts={c: fs.pop() for c, fs in layouts.items()}, modules=counts, adapter_metadata=metadata)


class _DropExpected(logging.Filter):
    """Hide what this module reports itself: diffusers' "No LoRA keys associated to ..." for a component the
    LoRA does not change (layers are counted instead) and its multi-line "Loading ... was unsuccessful" (the
    cause goes into our one-line ModelError)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("No LoRA keys associated") or (message.startswith("Loading ") and "was unsuccessful" in message))


@contextlib.contextmanager
def _quiet_expected_warnings() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("diffusers.loaders.peft", "diffusers.loaders.lora_base")]
    quiet = _DropExpected()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def _adapter_layers(model: Any, adapter: str) -> int:
    """How many layers of ``model`` carry the named LoRA adapter (PEFT's tuner layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}))


def _host(unet: Any, text_encoder: Any, text_encoder_2: Any | None = None) -> Any:
    """A diffusers inpainting pipeline around just the LoRA-loadable components, for its LoRA API (SDXL's with ``text_encoder_2``)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    if text_encoder_2 is not None:
        return StableDiffusionXLInpaintPipeline(
            vae=None,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=None,
            tokenizer_2=None,
            unet=unet,
            scheduler=None,
            add_watermarker=False,
        )
    return StableDiffusionInpaintPipeline(
        vae=None,
        text_encoder=text_encoder,
        tokenizer=None,
        unet=unet,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def fuse_loras(
    unet: Any, text_encoder: Any | None, loras: Sequence[LoraSource], allow_pickle: bool = False, text_encoder_2: Any | None = None
) -> list[FusedLora]:
    """Fuse each LoRA, in order, into ``unet`` (and ``text_encoder``) in place with diffusers; returns what each touched.

    Every LoRA module of a file must land on a layer of the same shape: a LoRA made for another
    architecture is an error, not a silent partial merge. ``text_encoder=None`` accepts only
    UNet-only LoRAs.
    """
    sdxl = text_encoder_2 is not None
    files = [inspect_lora(src.path, allow_pickle, sdxl) for src in loras]  # all refused up front, before any fusion
    for file in files:
        if "text_encoder" in file.modules and text_encoder is None:
            raise ModelError(f"{file.path}: the LoRA also changes the text encoder; fuse it with the text encoder loaded too")
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    host = _host(unet, text_encoder, text_encoder_2)
    fused = []
    for i, (src, file) in enumerate(zip(loras, files)):
        adapter = f"lora_{i}"
        with _quiet_expected_warnings():
            try:
                host.load_lora_weights(str(file.path.parent), weight_name=file.path.name, adapter_name=adapter)
            except (ValueError, RuntimeError, KeyError, TypeError) as e:
                host.unload_lora_weights()
                raise ModelError(
                    f"{file.path}: diffusers could not load this {file.format} LoRA into the model ({_one_line(e)}); "
                    "it was made for another architecture (use a LoRA trained for this model's family)"
                ) from e
        touched = {c: _adapter_layers(models[c], adapter) for c in file.modules}
        for component, want in file.modules.items():
            got = touched[component]
            if got < want:
                host.unload_lora_weights()
                raise ModelError(
                    f"{file.path}: {want - got} of the LoRA's {want} {component} modules have no counterpart in this model "
                    "(it was made for another architecture; use a LoRA trained for this model's family)"
                )
            if got > want:
                host.unload_lora_weights()
                raise ModelError(
                    f"{file.path}: the LoRA's adapter config targets {got} {component} layers but the file holds weights for "
                    f"{want}; the file is incomplete or its lora_adapter_metadata is wrong"
                )
        present = [c for c in COMPONENTS if touched.get(c)]
        host.fuse_lora(components=present, lora_scale=src.scale, adapter_names=[adapter])
        host.unload_lora_weights()
        record = FusedLora(file=file, scale=src.scale, sha256=sha256_file(file.path), touched={c: touched[c] for c in present})
        log.info("fused LoRA %s (%s) at scale %g: %s", file.path, file.format, src.scale, ", ".join(f"{n} {c} layers" for c, n in record.touched.items()))
        fused.append(record)
    return fused


def same_loras(given: Iterable[LoraSource], recorded: Iterable[dict[str, Any]]) -> bool:
    """Whether an export's recorded user LoRAs are the ones given now (same files, same scales, same order)."""

    def key(path: str | Path, scale: float) -> tuple[str, float]:
        return os.path.realpath(path), float(scale)

    try:
        now = [key(lora_file(s.path, allow_pickle=True), s.scale) for s in given]
    except ModelError:
        return False
    return now == [key(r.get("path", ""), r.get("scale", math.nan)) for r in recorded]
