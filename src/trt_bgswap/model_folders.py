"""Which exported folder a job runs on, and exporting one from model sources when there is none yet.

The policy the CLI's ``run`` and the Python API share:

- a folder holding a ``manifest.json`` is used as it is; sources named again must be the
  ones it was exported from (another source is refused, never silently ignored);
- a missing or empty folder with sources given is exported once, then reused;
- a model the job has no use for is left out of an automatic export (a solid colour needs
  no inpainting models, the user's own mask no RMBG), and a model not named is the
  registry default (:data:`trt_bgswap.registry.DEFAULTS`).

Sources are local paths, hub ids (``org/name[@revision]``) or registry names; ``"none"``
leaves a model out. Exporting imports the export stack (torch) lazily.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trt_bgswap.errors import UsageError
from trt_bgswap.manifest import MANIFEST_NAME, Manifest
from trt_bgswap.registry import DEFAULTS, VARIANTS

if TYPE_CHECKING:
    from trt_bgswap.export.lora import LoraSource

log = logging.getLogger(__name__)

NONE = "none"  # a source value that leaves that model out
FAMILY_LCM_LORA = "family"  # the LCM-LoRA default: the registry's LCM-LoRA for the inpainting model's family, read from its configs
FAMILY_TINY_VAE = "family"  # the --taesd default: the registry's tiny autoencoder for that family (taesd, taesdxl)


@dataclass(frozen=True)
class SourceSlot:
    """One model an export is made from: its registry family, CLI option and keyword."""

    family: str
    option: str
    key: str
    what: str  # what a local source of it looks like, for help texts


SOURCE_SLOTS = (
    SourceSlot("sd-inpainting", "--inpaint", "inpaint", "SD inpainting diffusers folder"),
    SourceSlot("lcm-lora", "--lcm-lora", "lcm_lora", "LCM-LoRA safetensors (file or folder)"),
    SourceSlot("rmbg", "--rmbg", "rmbg", "RMBG ONNX file or safetensors folder"),
)


def source_value(value: str | None) -> str | None:
    """A source as given, or None when it is absent or ``none``."""
    return None if value is None or value.strip().lower() == NONE else value


def with_defaults(given: dict[str, str], need_inpaint: bool, need_rmbg: bool) -> dict[str, str]:
    """A model not named is the registry default, unless the job has no use for it (the LCM-LoRA goes with inpainting)."""
    sources = dict(given)
    sources.setdefault("inpaint", DEFAULTS["sd-inpainting"] if need_inpaint else NONE)
    sources.setdefault("lcm_lora", NONE if source_value(sources["inpaint"]) is None else FAMILY_LCM_LORA)
    sources.setdefault("rmbg", DEFAULTS["rmbg"] if need_rmbg else NONE)
    return sources


def export_sources(
    sources: dict[str, str | None],
    out: Path,
    *,
    precision: str = "fp32",
    opset: int = 17,
    offline: bool = False,
    allow_pickle: bool = False,
    overwrite: bool = False,
    fused_step: bool = False,
    device_graphs: bool = False,
    loras: Sequence["LoraSource"] = (),
    masker: str | None = None,
    vae_src: Path | None = None,
    tiny_vae: str | None = None,
) -> Manifest:
    """Resolve the sources (local paths, hub ids, registry names; 'none' leaves one out) and export them to ``out``.

    ``loras`` (local files, ``--lora``) are fused after the LCM-LoRA, in order (:mod:`trt_bgswap.export.lora`).
    ``tiny_vae``: a tiny autoencoder (TAESD: a folder, hub id, registry name, or ``"family"`` for the
    inpainting model's own) exported in place of the VAE (``--vae tiny``).
    """
    from trt_bgswap.export.exporter import export_models
    from trt_bgswap.export.sources import resolve

    values = {slot.key: source_value(sources.get(slot.key)) for slot in SOURCE_SLOTS}
    if values["inpaint"] is None and values["lcm_lora"] is not None:  # checked before anything is downloaded
        raise UsageError("--lcm-lora is fused into the inpainting model: give --inpaint SRC too, or --lcm-lora none")
    if values["inpaint"] is None and loras:
        raise UsageError("--lora is fused into the inpainting model: give --inpaint SRC too")
    if values["inpaint"] is None and values["rmbg"] is None:
        raise UsageError("nothing to export: give --inpaint SRC, --rmbg SRC or both (a local folder, a hub id or a registry name)")
    resolved: dict[str, Path | None] = {}
    for slot in SOURCE_SLOTS:
        value = values[slot.key]
        if value == FAMILY_LCM_LORA and slot.key == "lcm_lora":
            value = family_lcm_lora(resolved["inpaint"])
        resolved[slot.key] = None if value is None else resolve(value, family=slot.family, offline=offline, allow_pickle=allow_pickle).path
    tiny_vae_src = None
    if tiny_vae is not None:
        tiny_vae_src = resolve(family_tiny_vae(resolved["inpaint"], tiny_vae), family="tiny-vae", offline=offline, allow_pickle=allow_pickle).path
    return export_models(
        resolved["inpaint"],
        resolved["lcm_lora"],
        resolved["rmbg"],
        out,
        precision=precision,
        opset=opset,
        overwrite=overwrite,
        fused_step=fused_step,
        device_graphs=device_graphs,
        loras=loras,
        allow_pickle=allow_pickle,
        masker=masker,
        vae_src=vae_src,
        tiny_vae_src=tiny_vae_src,
    )


def family_lcm_lora(inpaint: Path | None) -> str:
    """The registry's LCM-LoRA for the family of a resolved inpainting source (SD1.5's, SDXL's); refused where none is published."""
    from trt_bgswap.export.exporter import validate_inpaint_source

    if inpaint is None:
        raise UsageError("--lcm-lora family: the LCM-LoRA follows the inpainting model; give --inpaint SRC too")
    family = validate_inpaint_source(inpaint)["family"]
    if family.lcm_lora is None:
        raise UsageError(
            f"{inpaint} is {family.description}, for which no LCM-LoRA is published; give --lcm-lora FILE (one trained for it) "
            "or --lcm-lora none (then use more --steps: the model is not distilled)"
        )
    log.info("%s: %s, so the LCM-LoRA is %s", inpaint, family.description, family.lcm_lora)
    return family.lcm_lora


def family_tiny_vae(inpaint: Path | None, tiny_vae: str) -> str:
    """The tiny autoencoder to export for ``--taesd``: the family's own for ``"family"``; a registry one of another family refused.

    TAESD and TAESDXL share one architecture and config, so only the inpainting model's configs can
    tell which latents a tiny autoencoder must decode; a wrong one runs and paints garbage.
    """
    from trt_bgswap.export.exporter import validate_inpaint_source

    if inpaint is None:
        raise UsageError("--vae tiny replaces the inpainting model's VAE: give --inpaint SRC too")
    base = tiny_vae.partition("@")[0]
    named = next((v for v in VARIANTS.values() if base in (v.name, v.repo_id)), None)
    if tiny_vae != FAMILY_TINY_VAE and (named is None or named.family != "tiny-vae"):
        return tiny_vae  # a folder or another hub id: its latent API is checked against the VAE's when it is exported
    family = validate_inpaint_source(inpaint)["family"]
    wanted = VARIANTS[family.tiny_vae]
    if named is not None and named.name != wanted.name:
        raise UsageError(
            f"--taesd {tiny_vae}: {named.repo_id} decodes another family's latents, and {inpaint} is {family.description}; "
            f"give --taesd {wanted.name} ({wanted.repo_id}) or leave --taesd out"
        )
    if tiny_vae == FAMILY_TINY_VAE:
        log.info("%s: %s, so the tiny autoencoder is %s", inpaint, family.description, wanted.name)
        return wanted.name
    return tiny_vae


def recorded_matches(value: str, recorded: dict[str, object] | None) -> bool:
    """Whether a source given again is the one an export was made from (a local path, a hub id or a registry name)."""
    if recorded is None:
        return False
    path = Path(str(recorded.get("path", "")))
    local = Path(value).expanduser()
    if local.exists():
        given = local.resolve()
        return path == given or given in path.parents
    base = value.partition("@")[0]
    repo_id = VARIANTS[base].repo_id if base in VARIANTS else base
    return f"models--{repo_id.replace('/', '--')}" in path.parts


def check_sources_match(folder: Path, given: dict[str, str]) -> None:
    """Refuse sources that differ from the ones ``folder`` was exported from."""
    recorded = Manifest.load(folder).sources
    for slot in SOURCE_SLOTS:
        value = source_value(given.get(slot.key))
        if value is not None and not recorded_matches(value, recorded.get(slot.family)):
            was = (recorded.get(slot.family) or {}).get("path", "nothing")
            raise UsageError(
                f"{folder} already holds models exported from {was} for {slot.option}, not {value}; "
                f"pass --models NEWDIR to export these sources there, or delete {folder} to re-export"
            )


def check_loras_match(folder: Path, loras: Sequence["LoraSource"]) -> None:
    """Refuse --lora files (or scales, or an order) other than the ones ``folder`` was exported with."""
    from trt_bgswap.export.lora import same_loras  # pure Python: no torch

    recorded = Manifest.load(folder).sources.get("loras", [])
    if not same_loras(loras, recorded):
        was = ", ".join(f"{r.get('path')}:{r.get('scale')}" for r in recorded) or "no --lora"
        raise UsageError(
            f"{folder} already holds models exported with {was}, not the --lora given; "
            f"pass --models NEWDIR to export with these LoRAs there, or delete {folder} to re-export"
        )


def is_export(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).is_file()


def check_model_folder(folder: Path, given: dict[str, str], loras: Sequence["LoraSource"] = ()) -> None:
    """The checks of :func:`folder_for_job` that need no export: run before any image is read or model loaded."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--models {folder}: is a file, not a folder; give the folder an export was written to (or a new one)")
    if is_export(folder):
        if given:
            check_sources_match(folder, given)
        if loras:
            check_loras_match(folder, loras)
        return
    if not given and not loras:
        raise UsageError(
            f"{folder} holds no exported models; make them with `trt-bgswap export --out {folder}` (hub ids or local folders), "
            f"give `run` the sources (--inpaint/--lcm-lora/--rmbg) to export them there now, "
            f"or `trt-bgswap tiny-models DIR` and export those for an offline smoke test"
        )
    if folder.exists() and any(folder.iterdir()):
        raise UsageError(f"--models {folder}: the folder is not empty and holds no export (no manifest.json); give an empty or new folder")


def folder_for_job(
    folder: Path,
    given: dict[str, str],
    *,
    need_inpaint: bool,
    need_rmbg: bool,
    opset: int = 17,
    offline: bool = False,
    allow_pickle: bool = False,
    loras: Sequence["LoraSource"] = (),
    masker: str | None = None,
) -> Path:
    """The exported folder a job loads: ``folder`` as it is, or exported there now from ``given`` sources (and ``loras``)."""
    check_model_folder(folder, given, loras)
    if is_export(folder):
        log.info("using the exported models in %s", folder)
        return folder
    sources = with_defaults(given, need_inpaint=need_inpaint, need_rmbg=need_rmbg)
    log.info("no exported models in %s yet: exporting them once (later runs reuse them)", folder)
    if folder.exists():
        folder.rmdir()  # empty: the exporter moves its finished folder into place
    export_sources(sources, folder, opset=opset, offline=offline, allow_pickle=allow_pickle, loras=loras, masker=masker)
    return folder


MASKER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # an RMBG model folder in its PyTorch format


def exported_masker(model: Path) -> Path:
    """An RMBG model folder in its PyTorch format, exported once into the cache (keyed by its files' content) and reused."""
    from trt_bgswap.manifest import sha256_file
    from trt_bgswap.paths import models_dir

    files = sorted(f for f in model.iterdir() if f.is_file() and f.name in {"config.json", "preprocessor_config.json", *MASKER_WEIGHTS})
    digest = hashlib.sha256("".join(f"{f.name}:{sha256_file(f)}\n" for f in files).encode()).hexdigest()[:16]
    out = models_dir() / f"rmbg-{digest}"
    if is_export(out):
        log.info("using %s, exported earlier from %s", out, model)
        return out
    log.info("exporting the RMBG model in %s once to %s (later runs reuse it)", model, out)
    export_sources({"inpaint": NONE, "lcm_lora": NONE, "rmbg": str(model)}, out)
    return out


def masker_source(src: str | None) -> Path:
    """Where `mask --rmbg SRC` finds its model: an .onnx file, an exported folder, a model folder or a hub id/registry name."""
    from trt_bgswap.paths import default_export_dir

    if src is None:
        folder = default_export_dir()
        if not is_export(folder):
            raise UsageError(f"no --rmbg given and {folder} holds no exported models; give --rmbg SRC (an .onnx file, a folder or a hub id)")
        return folder
    p = Path(src).expanduser()
    if p.is_file() and p.suffix.lower() == ".onnx":
        return p
    if is_export(p):
        return p
    if p.is_dir() and (p / "onnx" / "model.onnx").is_file():
        return p / "onnx" / "model.onnx"
    if p.is_dir() and (p / "config.json").is_file() and any((p / w).is_file() for w in MASKER_WEIGHTS):
        return exported_masker(p)
    if p.is_dir():
        raise UsageError(
            f"--rmbg {src}: no RMBG model here; give an .onnx file, an exported folder, a folder with onnx/model.onnx, "
            f"or an RMBG model folder (config.json + {' or '.join(MASKER_WEIGHTS)})"
        )
    if p.exists():
        raise UsageError(f"--rmbg {src}: not an ONNX file; give an .onnx file, an exported folder or a hub id")
    from trt_bgswap.export.sources import resolve

    return masker_source(str(resolve(src, family="rmbg").path))
