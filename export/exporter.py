"""Build a whole exported folder: the SD1.5 inpainting models (LCM-LoRA fused), RMBG, tokenizer, manifest.

The layout mirrors Hugging Face's ONNX diffusion pipelines (``text_encoder/``, ``unet/``,
``vae_encoder/``, ``vae_decoder/`` each with ``model.onnx``) plus ``rmbg/``, ``tokenizer/``
and ``manifest.json`` (see :mod:`trt_bgswap.manifest`). Constants the runtime needs are read
from the source's own configs into :class:`~trt_bgswap.manifest.InpaintConfig`. The folder is
built in a temporary directory beside ``out_dir`` and renamed into place at the end, so a
crash or an error never leaves a half export where the runtime would look.

Precision: ``precision="fp16"`` converts the text encoder and UNet (and RMBG) to fp16 with
fp32 I/O; the VAE stays fp32 unless ``vae_precision="fp16"`` is given, because SD1.5's VAE
overflows float16 at real sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trt_bgswap.atomic import make_staging_dir, require_free_space
from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.export.onnx_export import DATA_FILE, DEFAULT_OPSET, check_precision, require_export_stack
from trt_bgswap.export.vae import vae_source_config
from trt_bgswap.families import SDXL, family_of
from trt_bgswap.specs import TEXT_ENCODER_2
from trt_bgswap.manifest import InpaintConfig, Manifest, ModelEntry, RmbgConfig, sha256_file

if TYPE_CHECKING:
    from trt_bgswap.export.lora import LoraSource

log = logging.getLogger(__name__)

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # on top of SD_COMPONENTS
SD_WEIGHTS = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}
PICKLED = {
    "unet": "diffusion_pytorch_model.bin",
    "vae": "diffusion_pytorch_model.bin",
    "text_encoder": "pytorch_model.bin",
    "text_encoder_2": "pytorch_model.bin",
}
RMBG_WEIGHT_PATTERNS = ("*.safetensors", "*.onnx", "*.pth")  # whatever RMBG weights the source folder holds
VERSION_PACKAGES = ("trt-bgswap", "torch", "diffusers", "transformers", "peft", "onnx", "onnxruntime", "safetensors")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable JSON ({e}); download the model again") from e


def _weight_files(folder: Path, component: str) -> list[Path]:
    """The component's safetensors weights (single file or shards), or a ModelError with the fix."""
    sub = folder / component
    single = sub / SD_WEIGHTS[component]
    if single.is_file():
        return [single]
    index = sub / (SD_WEIGHTS[component] + ".index.json")
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (sub / s).is_file()]
        if missing or not shards:
            raise ModelError(f"{index}: shards {missing or '(none listed)'} are missing; download the model again")
        return [sub / s for s in shards]
    if (sub / PICKLED[component]).is_file() or any(sub.glob("*.bin")):
        raise ModelError(
            f"{sub}: only pickled weights ({PICKLED[component]}) are here and they are not loaded (unsafe); convert the "
            "pipeline once with diffusers: DiffusionPipeline.from_pretrained(path).save_pretrained(path, safe_serialization=True)"
        )
    raise ModelError(f"{sub}: no {SD_WEIGHTS[component]}; download the model's safetensors weights")


def validate_inpaint_source(src: str | Path) -> dict[str, Any]:
    """Check a diffusers SD-inpainting folder before any heavy work; returns its configs by component."""
    src = Path(src)
    if not (src / "model_index.json").is_file():
        raise ModelError(
            f"{src}: no model_index.json; this is not a diffusers pipeline folder (download "
            "stable-diffusion-v1-5/stable-diffusion-inpainting, or give its local snapshot folder)"
        )
    index = _read_json(src / "model_index.json")
    unet_config = _read_json(src / "unet" / "config.json") if (src / "unet" / "config.json").is_file() else {}
    te_config = _read_json(src / "text_encoder" / "config.json") if (src / "text_encoder" / "config.json").is_file() else None
    family = family_of(index, unet_config, te_config, str(src)) if unet_config else None
    wanted = SD_COMPONENTS + (SDXL_COMPONENTS if family is not None and family.name == SDXL else ())
    missing = [c for c in wanted if not index.get(c) or index[c][0] is None or not (src / c).is_dir()]
    if missing or family is None:
        raise ModelError(f"{src}: the pipeline lacks {missing or ['unet']}; download the complete model ({', '.join(wanted)})")
    configs = {
        "model_index": index,
        "family": family,
        "unet": unet_config,
        "vae": _read_json(src / "vae" / "config.json"),
        "text_encoder": te_config,
        "scheduler": _read_json(src / "scheduler" / "scheduler_config.json"),
        "tokenizer": _read_json(src / "tokenizer" / "tokenizer_config.json"),
    }
    if family.name == SDXL:
        configs["text_encoder_2"] = _read_json(src / "text_encoder_2" / "config.json")
        configs["tokenizer_2"] = _read_json(src / "tokenizer_2" / "tokenizer_config.json")
    latent = int(configs["vae"].get("latent_channels", 4))
    want = 2 * latent + 1
    got = configs["unet"].get("in_channels")
    if got != want:
        raise ModelError(
            f"{src}: unet in_channels={got}, an inpainting UNet takes {want} (latents + mask + masked-image latents); "
            "this looks like a text-to-image model, use stable-diffusion-v1-5/stable-diffusion-inpainting"
        )
    for component in weight_components(configs):
        _weight_files(src, component)
    return configs


def weight_components(configs: dict[str, Any]) -> tuple[str, ...]:
    """The components whose weights the family's export reads."""
    return tuple(c for c in SD_WEIGHTS if c != "text_encoder_2" or configs["family"].name == SDXL)


def _max_length(te: dict[str, Any], tok: dict[str, Any]) -> int:
    positions = int(te["max_position_embeddings"])
    max_length = int(tok.get("model_max_length", positions))
    return min(max_length, positions)  # some tokenizer configs carry a huge placeholder


def inpaint_config(configs: dict[str, Any]) -> InpaintConfig:
    """The runtime's constants, from the source's configs (never literals)."""
    vae, unet, te, tok = configs["vae"], configs["unet"], configs["text_encoder"], configs["tokenizer"]
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    unet_factor = 2 ** (len(unet["down_block_types"]) - 1)  # diffusers: every down block but the last halves
    if vae.get("latents_mean") is not None or vae.get("latents_std") is not None:
        raise ModelError("the VAE config has latents_mean/latents_std (a per-channel latent normalisation); SD1/SD2/SDXL VAEs have none")
    max_length = _max_length(te, tok)
    family, index = configs["family"], configs["model_index"]
    sdxl: dict[str, Any] = {}
    if family.name == SDXL:
        if _max_length(configs["text_encoder_2"], configs["tokenizer_2"]) != max_length:
            raise ModelError("the two text encoders' sequence lengths differ; diffusers concatenates them per token, so they must agree")
        sdxl = {
            "tokenizer_2_dir": "tokenizer_2",
            # StableDiffusionXLInpaintPipeline.__init__ defaults, overridden by the pipeline's model_index.json
            "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
            "requires_aesthetics_score": bool(index.get("requires_aesthetics_score", False)),
        }
    return InpaintConfig(
        family=family.name,
        **sdxl,
        vae_scaling_factor=float(vae["scaling_factor"]),
        vae_shift_factor=None if vae.get("shift_factor") is None else float(vae["shift_factor"]),
        vae_scale_factor=vae_factor,
        latent_channels=int(vae["latent_channels"]),
        unet_in_channels=int(unet["in_channels"]),
        size_multiple=vae_factor * unet_factor,
        default_size=int(unet["sample_size"]) * vae_factor,
        max_length=max_length,
        scheduler=dict(configs["scheduler"]),
    )


def _hash_files(root: Path, files: list[Path]) -> dict[str, str]:
    return {str(f.relative_to(root)): sha256_file(f) for f in files}


def library_versions() -> dict[str, str]:
    versions = {}
    for name in VERSION_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def _move_into_place(stage: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder over ``out_dir``; an old export is removed only after the swap."""
    if not out_dir.exists():
        os.replace(stage, out_dir)
        return
    if not overwrite:
        raise UsageError(f"{out_dir} already exists; choose another --out or pass overwrite=True (--force) to replace it")
    if not (out_dir / "manifest.json").is_file():
        raise UsageError(f"{out_dir} exists and is not an exported folder (no manifest.json); refusing to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    os.replace(out_dir, old / "export")
    os.replace(stage, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def export_models(
    inpaint_src: Path | None,
    lcm_lora_src: Path | None,
    rmbg_src: Path | None,
    out_dir: Path,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    vae_precision: str | None = None,
    lora_scale: float = 1.0,
    external_data: bool | None = None,
    overwrite: bool = False,
    fused_step: bool = False,
    device_graphs: bool = False,
    loras: Sequence["LoraSource"] = (),
    allow_pickle: bool = False,
    vae_src: Path | None = None,
    masker: str | None = None,
    tiny_vae_src: Path | None = None,
) -> Manifest:
    """Export everything given into ``out_dir`` and return its manifest.

    ``loras`` are the user's own LoRAs, fused after the LCM-LoRA (at ``lora_scale``) in the order
    given, each at its own scale, into the UNet and, where they have one, the text encoder
    (:mod:`.lora`); the manifest's ``sources`` records each (``lcm-lora``, then ``loras`` in order).
    ``allow_pickle`` accepts pickled ``.bin`` LoRA files.

    ``fused_step`` also exports ``unet_step/``: the UNet with classifier-free guidance and the
    LCM step inside one graph, which the TensorRT device loop runs without host round trips.
    ``device_graphs`` also writes ``vae_encoder_sample/``, ``vae_decoder_image/`` and ``rmbg_full/``:
    the VAE and RMBG graphs with the pipeline's host arithmetic inside (:mod:`.device_graphs`).
    ``masker`` names the masker variant (``--masker``: rmbg-1.4, birefnet, rmbg-2.0) where the files cannot tell.
    ``tiny_vae_src`` (``--vae tiny``): a tiny autoencoder (TAESD) folder exported as the VAE graphs
    instead of the model's own VAE, its scaling from its own config (:mod:`.taesd`).
    ``vae_precision=None`` keeps the VAE in fp32 (SD's and SDXL's VAEs overflow float16; their configs
    say ``force_upcast``) unless the VAE's own config says ``force_upcast: false`` (an fp16-safe VAE such as
    madebyollin/sdxl-vae-fp16-fix, given as ``vae_src`` (``--vae-src``): a diffusers ``AutoencoderKL`` folder that replaces
    the pipeline's VAE), in which case it follows ``precision``. ``external_data=None`` puts weights in
    ``model.onnx_data`` only for graphs near protobuf's 2 GB limit.

    The model family (SD1, SD2, SDXL: :mod:`trt_bgswap.families`) is read from the source's configs;
    SDXL adds ``text_encoder_2/`` and ``tokenizer_2/`` and the UNet's added-condition inputs. The fused
    step and device graphs implement the SD1/SD2 UNet signature only and are refused for SDXL.
    """
    require_export_stack()
    check_precision(precision)
    if vae_precision is not None:
        check_precision(vae_precision)
    if inpaint_src is None and rmbg_src is None:
        raise UsageError("nothing to export: give an SD-inpainting source, an RMBG source, or both")
    if lcm_lora_src is not None and inpaint_src is None:
        raise UsageError("an LCM-LoRA needs the SD-inpainting model it is fused into")
    if loras and inpaint_src is None:
        raise UsageError("a LoRA (--lora) needs the SD-inpainting model it is fused into: give --inpaint SRC too")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UsageError(f"{out_dir} already exists; choose another --out or pass overwrite=True (--force) to replace it")
    if out_dir.exists() and not (out_dir / "manifest.json").is_file():
        raise UsageError(f"{out_dir} exists and is not an exported folder (no manifest.json); refusing to replace it")
    configs = validate_inpaint_source(inpaint_src) if inpaint_src is not None else None
    sdxl = configs is not None and configs["family"].name == SDXL
    if sdxl and (fused_step or device_graphs):
        raise UsageError(
            "--fused-step/--device-graphs implement the SD1/SD2 UNet (no added conditions); an SDXL export runs the UNet graph "
            "with its text_embeds/time_ids inputs on every backend: leave those flags out"
        )
    if vae_src is not None and tiny_vae_src is not None:
        raise UsageError("--vae-src DIR and --vae tiny both replace the VAE: give one of them")
    if vae_src is not None and inpaint_src is None:
        raise UsageError("--vae-src replaces the inpainting model's VAE: give --inpaint SRC too")
    vae_config = vae_source_config(vae_src) if vae_src is not None else (configs or {}).get("vae", {})
    if vae_src is not None and configs is not None:
        if int(vae_config.get("latent_channels", 4)) != int(configs["vae"].get("latent_channels", 4)):
            raise ModelError(f"--vae-src {vae_src}: latent_channels {vae_config.get('latent_channels')} differs from the model's VAE's; give a VAE of this model's family")
        configs = {**configs, "vae": vae_config}  # the runtime's VAE constants (scaling factor, downsampling) are the replacement's
    vae_precision = vae_precision or (precision if vae_config.get("force_upcast", True) is False else "fp32")
    if tiny_vae_src is not None:
        from trt_bgswap.export.taesd import check_matches_vae, latent_api, read_taesd_config

        if configs is None:
            raise UsageError("a tiny autoencoder (--vae tiny) replaces the VAE of an inpainting model: give --inpaint SRC too")
        check_matches_vae(tiny_vae_src, read_taesd_config(tiny_vae_src), *latent_api(configs["vae"]))  # before any heavy work
    lora_sources: list[LoraSource] = []
    if inpaint_src is not None and (lcm_lora_src is not None or loras):
        from trt_bgswap.export.lora import LoraSource, inspect_lora, lora_file

        if lcm_lora_src is not None:
            lora_sources.append(LoraSource(lora_file(lcm_lora_src, allow_pickle), lora_scale))
        lora_sources += loras
        for lora in lora_sources:  # a file in a layout we cannot fuse fails now, before any heavy work
            inspect_lora(lora.path, allow_pickle, sdxl)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = make_staging_dir(out_dir.parent, f".{out_dir.name}.")
    try:
        models: dict[str, ModelEntry] = {}
        sources: dict[str, Any] = {}
        inpaint = None
        rmbg_config: RmbgConfig | None = None
        if inpaint_src is not None and configs is not None:
            from trt_bgswap.export.lora import fuse_loras
            from trt_bgswap.export.text_encoder import export_text_encoder_module, load_text_encoder
            from trt_bgswap.export.unet import export_unet_module, load_unet
            from trt_bgswap.export.vae import export_vae

            inpaint_src = Path(inpaint_src)
            inpaint = inpaint_config(configs)
            if tiny_vae_src is not None:
                from trt_bgswap.export.taesd import tiny_vae_inpaint

                inpaint, sources["taesd"] = tiny_vae_inpaint(tiny_vae_src, inpaint)
            log.info("exporting %s (%s, opset %d)", inpaint_src, precision, opset)
            weights = [f for c in weight_components(configs) for f in _weight_files(inpaint_src, c)]
            sources["sd-inpainting"] = {"path": str(inpaint_src.resolve()), "sha256": _hash_files(inpaint_src, weights), "family": inpaint.family}
            text_encoder, unet = load_text_encoder(inpaint_src), load_unet(inpaint_src)
            text_encoder_2 = None
            if sdxl:
                from trt_bgswap.export.text_encoder_2 import load_text_encoder_2

                text_encoder_2 = load_text_encoder_2(inpaint_src)
            log.info("%s: fusing %d LoRA(s): LCM-LoRA first, then --lora in the order given", inpaint.family, len(lora_sources))
            fused = fuse_loras(unet, text_encoder, lora_sources, allow_pickle, text_encoder_2=text_encoder_2)
            if lcm_lora_src is not None:
                lcm, fused = fused[0], fused[1:]
                sources["lcm-lora"] = {**lcm.to_json(), "sha256": {lcm.file.path.name: lcm.sha256}}
            if fused:
                sources["loras"] = [f.to_json() for f in fused]
            log.info("[1/4] text encoder")
            models["text_encoder"] = export_text_encoder_module(text_encoder, stage / "text_encoder", precision, opset, penultimate=sdxl)
            del text_encoder
            text_embeds_dim = None
            if text_encoder_2 is not None:
                from trt_bgswap.export.text_encoder_2 import export_text_encoder_2_module

                log.info("[1b/4] text encoder 2 (SDXL)")
                models[TEXT_ENCODER_2] = export_text_encoder_2_module(text_encoder_2, stage / TEXT_ENCODER_2, precision, opset)
                text_embeds_dim = int(text_encoder_2.config.projection_dim)
                del text_encoder_2
            log.info("[2/4] unet")
            models["unet"] = export_unet_module(unet, stage / "unet", inpaint.max_length, precision, opset, external_data, text_embeds_dim)
            if fused_step:
                from trt_bgswap.export.unet_step import export_unet_step_module
                from trt_bgswap.runtime.scheduler import LCMConfig
                from trt_bgswap.runtime.denoise import check_step_scheduler

                check_step_scheduler(LCMConfig.from_dict(configs["scheduler"]))
                log.info("[2b/4] unet_step: UNet + guidance + LCM step in one graph")
                models["unet_step"] = export_unet_step_module(unet, stage / "unet_step", inpaint.max_length, precision, opset, external_data)
            del unet
            if tiny_vae_src is not None:
                from trt_bgswap.export.taesd import export_taesd

                log.info("[3/4] vae encoder + [4/4] vae decoder: the tiny autoencoder %s (%s)", tiny_vae_src, vae_precision)
                models["vae_encoder"], models["vae_decoder"] = export_taesd(tiny_vae_src, stage / "vae_encoder", stage / "vae_decoder", vae_precision, opset)
            else:
                log.info("[3/4] vae encoder + [4/4] vae decoder (%s)", vae_precision)
                if vae_src is not None:
                    sources["vae"] = {"path": str(Path(vae_src).resolve()), "sha256": _hash_files(Path(vae_src), sorted(Path(vae_src).rglob("*.safetensors")))}
                models["vae_encoder"], models["vae_decoder"] = export_vae(
                    vae_src if vae_src is not None else inpaint_src, stage / "vae_encoder", stage / "vae_decoder", vae_precision, opset
                )
            _copy_tokenizer(inpaint_src / "tokenizer", stage / inpaint.tokenizer_dir)
            if inpaint.tokenizer_2_dir is not None:
                _copy_tokenizer(inpaint_src / "tokenizer_2", stage / inpaint.tokenizer_2_dir)
        if rmbg_src is not None:
            from trt_bgswap.export.rmbg import export_rmbg

            log.info("rmbg: exporting %s", rmbg_src)
            models["rmbg"], rmbg_config = export_rmbg(Path(rmbg_src), stage, precision, opset, masker)  # writes stage/rmbg/
            rmbg_src = Path(rmbg_src)
            rmbg_files = (
                sorted(f for pattern in RMBG_WEIGHT_PATTERNS for f in rmbg_src.rglob(pattern)) if rmbg_src.is_dir() else [rmbg_src]
            )
            root = rmbg_src if rmbg_src.is_dir() else rmbg_src.parent
            sources["rmbg"] = {"path": str(rmbg_src.resolve()), "sha256": _hash_files(root, rmbg_files)}
        if device_graphs:
            from trt_bgswap.export.device_graphs import export_device_graphs

            log.info("device graphs: the VAE and RMBG graphs with their pre/post-processing inside")
            models.update(export_device_graphs(stage, models, inpaint, rmbg_config))
        data_hashes = {
            name: sha256_file((stage / entry.file).with_name(DATA_FILE))
            for name, entry in models.items()
            if (stage / entry.file).with_name(DATA_FILE).is_file()
        }
        manifest = Manifest(
            precision=precision,
            opset=opset,
            models=models,
            inpaint=inpaint,
            rmbg=rmbg_config,
            sources=sources,
            versions=library_versions(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            extra={
                "vae_precision": vae_precision if inpaint is not None else None,
                "vae": ("tiny" if tiny_vae_src is not None else "full") if inpaint is not None else None,
                "lora_scale": lora_scale if lcm_lora_src is not None and inpaint is not None else None,
                "external_data_sha256": data_hashes,
            },
        )
        from trt_bgswap.export.memory_facts import export_memory_facts
        from trt_bgswap.memory import facts_to_json

        log.info("measuring each graph's memory facts (what a generation size costs)")
        manifest.memory = facts_to_json(export_memory_facts(stage, manifest))
        manifest.save(stage)
        _move_into_place(stage, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info("export complete: %s (%s)", out_dir, ", ".join(models))
    return manifest


def with_tiny_vae(export_dir: str | Path, src: str | Path, out_dir: str | Path, opset: int = DEFAULT_OPSET) -> Manifest:
    """A copy of an export whose VAE graphs are the tiny autoencoder's; replaces ``out_dir``.

    What ``export --vae tiny`` makes, without exporting the UNet and text encoder again (the
    benchmark's ``--vae tiny`` rows). The VAE device graphs, made from the full VAE, are left out.
    """
    from trt_bgswap.export.taesd import export_taesd, tiny_vae_inpaint
    from trt_bgswap.specs import VAE_DECODER, VAE_DECODER_IMAGE, VAE_ENCODER, VAE_ENCODER_SAMPLE

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    manifest = Manifest.load(export_dir)
    if manifest.inpaint is None:
        raise ModelError(f"{export_dir}: the export has no inpainting models; the tiny autoencoder replaces their VAE")
    inpaint, source = tiny_vae_inpaint(src, manifest.inpaint)
    stage = make_staging_dir(out_dir.parent, f".{out_dir.name}.")
    try:
        dropped = {VAE_ENCODER, VAE_DECODER, VAE_ENCODER_SAMPLE, VAE_DECODER_IMAGE}
        keep = [Path(e.file).parts[0] for n, e in manifest.models.items() if n not in dropped] + [inpaint.tokenizer_dir]
        parts = list(dict.fromkeys(keep))
        need = sum(f.stat().st_size for part in parts for f in (export_dir / part).rglob("*") if f.is_file())
        require_free_space(out_dir.parent, need, "the --vae tiny copy of the export", "free some space or choose another folder")
        for part in parts:
            # copied, not hard-linked: onnx refuses external weights with several links ("potential hardlink attack"),
            # so every onnx.load of the copy (build, FLOP counting) would fail
            shutil.copytree(export_dir / part, stage / part)
        models = {n: e for n, e in manifest.models.items() if n not in dropped}
        models[VAE_ENCODER], models[VAE_DECODER] = export_taesd(src, stage / VAE_ENCODER, stage / VAE_DECODER, manifest.extra.get("vae_precision") or "fp32", opset)
        extra = {**manifest.extra, "vae": "tiny"}
        dataclasses.replace(manifest, models=models, inpaint=inpaint, sources={**manifest.sources, "taesd": source}, extra=extra).save(stage)
        _move_into_place(stage, out_dir, overwrite=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return Manifest.load(out_dir)
