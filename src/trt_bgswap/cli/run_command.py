"""`trt-bgswap run`: replace the background of photos with a generated one (a prompt) or a solid colour.

Order of work (see :mod:`trt_bgswap.cli.batch`): options, model folder, inputs and outputs
are all checked first; only then are the models the batch needs loaded (a solid colour
opens no diffusion model, a solid colour behind the user's own masks opens nothing), and
each photo is read once however many results and side outputs it gets.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from trt_bgswap.cli import batch
from trt_bgswap.cli.batch import CUTOUT, MASK, RESULT, Job
from trt_bgswap.cli.composite_options import add_composite_options, composite_options_from
from trt_bgswap.cli.options import add_batch_options, byte_size, color, float_range, int_range, lora_spec, parse_size
from trt_bgswap.errors import UsageError
from trt_bgswap.model_folders import SOURCE_SLOTS, check_model_folder, folder_for_job
from trt_bgswap.families import FAMILIES
from trt_bgswap.registry import DEFAULTS, variants_of
from trt_bgswap.runtime.image_read import IMAGE_SUFFIXES

log = logging.getLogger("trt_bgswap")

NAME = "run"
HELP = "replace the background of images"
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt", "trt")


def add_source_options(sp: argparse.ArgumentParser, defaults: bool) -> None:
    """The model-source options of `export` (and of `run`, which exports when no exported folder exists yet)."""
    for slot in SOURCE_SLOTS:
        default = "the one of the inpainting model's family: " + ", ".join(f.lcm_lora for f in FAMILIES.values() if f.lcm_lora) if slot.key == "lcm_lora" else DEFAULTS[slot.family]
        tail = f" (default {default})" if defaults else "; exported once into --models (or the per-user cache) when that holds no export yet"
        sp.add_argument(slot.option, dest=slot.key, help=f"{slot.what}, hub id (org/name[@rev]) or registry name; 'none' to leave it out{tail}")
    sp.add_argument(
        "--masker", choices=[v.name for v in variants_of("rmbg")],
        help="which masker the --rmbg model is, where its files cannot tell (default: from its config.json; rmbg-2.0 is BiRefNet's architecture under BRIA's licence)",
    )
    sp.add_argument("--opset", type=int_range("--opset", 14, 21), default=17, help="ONNX opset of the export")
    sp.add_argument("--offline", action="store_true", help="use only the local hub cache (also HF_HUB_OFFLINE=1)")
    sp.add_argument("--allow-pickle", action="store_true", help="accept pickled checkpoints (.bin/.ckpt) from a source you trust")
    sp.add_argument(
        "--lora", dest="loras", action="append", type=lora_spec, default=[], metavar="FILE[:SCALE]",
        help="your own LoRA (kohya, peft/diffusers or older diffusers format; a .safetensors file or its folder) fused after "
        "the LCM-LoRA at SCALE (default 1), into the UNet and text encoder; repeat it to stack several, fused in the order given",
    )


def given_sources(args: argparse.Namespace) -> dict[str, str]:
    return {slot.key: getattr(args, slot.key) for slot in SOURCE_SLOTS if getattr(args, slot.key) is not None}


def add_arguments(r: argparse.ArgumentParser) -> None:
    add_batch_options(r, PROVIDERS)
    r.add_argument("--models", help="exported model folder (default: the per-user cache)")
    r.add_argument("--prompt", help="what the new background shows")
    r.add_argument("--negative-prompt", default="", help="what it should not show (takes effect when --guidance > 1)")
    r.add_argument("-o", "--output", help="output file (one input) or folder (default: <stem>_bgswap.png beside each input)")
    r.add_argument("--format", choices=["png", "jpg", "webp"], help="output format for folder outputs (default png); a file name's extension decides for -o FILE")
    r.add_argument("--quality", type=int_range("--quality", 1, 100), default=95, help="JPEG/WebP quality")
    r.add_argument("--seed", type=int_range("--seed", 0, 2**63 - 1), help="random seed (same seed, same image; default: a fresh one, printed)")
    r.add_argument("--steps", type=int_range("--steps", 1, 50), default=4, help="LCM steps (2-8 are useful)")
    r.add_argument("--guidance", type=float_range("--guidance", 0.0, 30.0), default=1.0, help="classifier-free guidance (1: off)")
    r.add_argument("--num-results", type=int_range("--num-results", 1, 64), default=1, help="results per image, with seeds seed, seed+1, ...")
    r.add_argument("--size", type=parse_size, help="generation size WxH, multiples of the model's (64 for SD1.5) (default: ~512^2 at the image's aspect)")
    r.add_argument("--low-memory", action="store_true", help="open each model only while its stage runs: far less memory, same results, slower")
    r.add_argument(
        "--memory-budget",
        type=byte_size,
        help="the most memory a run may take, e.g. 6G (default: TRT_BGSWAP_MEMORY_BUDGET, else what is free); larger sizes are refused before loading",
    )
    r.add_argument("--bg-color", type=color, help="a solid background instead of a generated one: '#RRGGBB', '#RGB' or a name")
    r.add_argument("--mask", help="your own subject mask (white = keep) instead of RMBG: a file, or a folder of <stem>.png")
    r.add_argument("--ignore-alpha", action="store_true", help="run the masker on cut-out inputs too (default: an input's own transparency is its mask)")
    r.add_argument("--save-mask", help="also write the alpha mask (a file for one input, else a folder)")
    r.add_argument("--save-cutout", help="also write the RGBA cut-out, .png or .webp (a file for one input, else a folder)")
    r.add_argument("--threshold", type=float_range("--threshold", 0.0, 1.0), help="binarise the subject mask at this level (between 0 and 1)")
    r.add_argument("--grow", type=int_range("--grow", -512, 512), default=0, help="grow (or with a negative value shrink) the subject, pixels")
    r.add_argument("--feather", type=float_range("--feather", 0.0, 256.0), default=0.0, help="soften the mask edge, pixels")
    r.add_argument("--band", type=int_range("--band", 0, 512), default=8, help="how far the repainted area reaches into the subject, pixels")
    add_composite_options(r)
    add_source_options(r, defaults=False)


def mask_file_for(mask_arg: str, src: Path, n_inputs: int) -> Path:
    """The user's mask of one input: the file given, or the file named like the input in the folder given."""
    m = Path(mask_arg)
    if m.is_dir():
        candidates = sorted((c for c in m.iterdir() if c.stem == src.stem and c.suffix.lower() in IMAGE_SUFFIXES), key=lambda c: (c.suffix.lower() != ".png", c.name))
        if not candidates:
            raise UsageError(f"{src}: no mask named {src.stem}.* in {m}; masks in a folder are matched by file name")
        return candidates[0]
    if n_inputs > 1:
        raise UsageError(f"--mask {mask_arg}: with several inputs give a folder of masks named like the inputs")
    return m


def _check_options(args: argparse.Namespace) -> None:
    if args.prompt is None and args.bg_color is None:
        raise UsageError("give --prompt TEXT for a generated background, or --bg-color '#RRGGBB' for a solid one")
    if args.prompt is not None and args.bg_color is not None:
        raise UsageError("--prompt and --bg-color are alternatives (a generated or a solid background); give one")
    if args.mask is not None and not Path(args.mask).exists():
        raise UsageError(f"--mask {args.mask}: no such file or folder; give a mask image, or a folder of masks named like the inputs")
    if args.bg_color is not None:
        ignored = [o for o, v in (("--negative-prompt", args.negative_prompt), ("--seed", args.seed), ("--size", args.size)) if v]
        ignored += ["--num-results"] if args.num_results != 1 else []
        if ignored:
            raise UsageError(f"{', '.join(ignored)} only act on a generated background; drop them or use --prompt instead of --bg-color")
    elif args.negative_prompt and args.guidance <= 1.0:
        log.warning("--negative-prompt has no effect at --guidance %g (classifier-free guidance runs above 1); use e.g. --guidance 1.5", args.guidance)


def _stages(args: argparse.Namespace, jobs: list[Job]) -> tuple[str, ...]:
    """The pipeline stages this batch needs: the masker unless every photo brings its mask, diffusion for prompts."""
    stages = []
    maybe_masked = args.mask is None and any(args.ignore_alpha or j.info is None or not j.info.has_alpha for j in jobs)
    if maybe_masked:
        stages.append("mask")
    if args.prompt is not None and any(t.kind == RESULT for j in jobs for t in j.todo):
        stages.append("generate")
    return tuple(stages)


def _check_memory(folder: Path, args: argparse.Namespace, jobs: list[Job], stages: tuple[str, ...]) -> None:
    """Refuse a generation that cannot fit in memory before any model is loaded (exit code 2)."""
    from trt_bgswap.runtime.sizing import generation_size
    from trt_bgswap.runtime.memory_guard import guard_for_run

    guard = guard_for_run(folder, args.provider, args.memory_budget, stages=stages, resident_budget=0 if args.low_memory else None)
    if guard is None:
        return
    sizes = [j.info.size for j in jobs if j.info is not None] or [(guard.config.default_size, guard.config.default_size)]
    width, height = max(sizes, key=lambda s: s[0] * s[1])  # the largest photo: its own arrays are held too
    if args.size is not None:
        guard.check(args.size, args.guidance, width * height)
    else:  # the default size follows the photo; it shrinks to fit, but something must fit
        policy = generation_size(width, height, guard.config.default_size, guard.config.size_multiple)
        guard.fit(policy, args.guidance, width * height, warn=False)  # each photo's shrink is logged when it runs


def run(args: argparse.Namespace) -> int:
    from trt_bgswap.api import BackgroundReplacer, alpha_to_u8, load_photo
    from trt_bgswap.paths import default_export_dir
    from trt_bgswap.runtime.image_write import output_exif, write_image
    from trt_bgswap.runtime.mask_ops import MaskOptions, refine_alpha

    mask_options = MaskOptions(threshold=args.threshold, grow=args.grow, feather=args.feather, band=args.band)
    mask_options.validate()
    composite_options = composite_options_from(args)
    _check_options(args)
    needs_models = not (args.bg_color is not None and args.mask is not None)
    folder = Path(args.models).expanduser() if args.models else default_export_dir()
    given = given_sources(args)
    if needs_models:
        check_model_folder(folder, given, args.loras)  # before any photo is read: a missing export is one line, at once
    inputs, problems = batch.collect_inputs(args.inputs, args.recursive)
    report = batch.BatchReport(tell=log.error if len(inputs) > 1 else log.debug)
    for item, why in problems:
        report.fail(item, why)
    count = 1 if args.bg_color is not None else args.num_results
    side = {MASK: args.save_mask, CUTOUT: args.save_cutout}
    jobs = batch.plan_outputs(inputs, args.output, args.format, "_bgswap", count, side)
    jobs = batch.prepare(jobs, args.overwrite, args.max_pixels, report)
    if not jobs:
        return batch.finish(report)
    stages = _stages(args, jobs)
    models = None
    if stages:
        models = folder_for_job(
            folder, given, need_inpaint=args.bg_color is None, need_rmbg=args.mask is None,
            opset=args.opset, offline=args.offline, allow_pickle=args.allow_pickle, loras=args.loras, masker=args.masker,
        )
    if "generate" in stages:
        _check_memory(models, args, jobs, stages)
    swapper = BackgroundReplacer(
        models, provider=args.provider, threads=args.threads, max_pixels=args.max_pixels, stages=stages, memory_budget=args.memory_budget,
        low_memory=args.low_memory,
    )
    swapper.check_options(  # once, before any image: a bad option stops the run with exit code 2
        args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance, seed=args.seed,
        size=args.size, bg_color=args.bg_color, has_mask=True,
    )
    protected = {j.src.path.resolve() for j in jobs}

    def work(job: Job) -> None:
        src = job.src.path
        photo = load_photo(src, max_pixels=args.max_pixels)
        mask = mask_file_for(args.mask, src, len(inputs)) if args.mask is not None else None
        # the subject's alpha once per photo, however many results: it is the mask of every seed
        raw = swapper.source_alpha(photo, mask=mask, use_alpha=not args.ignore_alpha, composite_options=composite_options)
        exif = None if args.strip_metadata else output_exif(photo.exif, keep_gps=args.keep_gps)
        for target in job.todo:
            if target.kind == RESULT:
                seed = None if args.seed is None else args.seed + target.index
                out = swapper.replace(
                    photo, args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance, seed=seed,
                    size=args.size, bg_color=args.bg_color, mask=raw, mask_options=mask_options, composite_options=composite_options,
                )
                write_image(target.path, out.result.image, quality=args.quality, overwrite=args.overwrite, protected=protected, icc=photo.icc, exif=exif)
                how = f" (seed {out.seed}, generated at {out.generation_size[0]}x{out.generation_size[1]})" if out.generation_size else ""
                log.info("%s -> %s%s", src, target.path, how)
                continue
            a8 = alpha_to_u8(refine_alpha(raw, mask_options))
            if target.kind == MASK:
                write_image(target.path, a8, overwrite=args.overwrite, protected=protected)
            else:
                write_image(target.path, np.dstack([photo.rgb, a8]), overwrite=args.overwrite, protected=protected, icc=photo.icc, exif=exif)
            log.info("%s -> %s", src, target.path)

    return batch.run_batch(jobs, report, args.progress or sys.stderr.isatty(), work)

