"""`trt-bgswap mask`: subject masks (and RGBA cut-outs) only, no diffusion."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trt_bgswap.cli import batch
from trt_bgswap.cli.batch import CUTOUT, Job
from trt_bgswap.cli.options import add_batch_options
from trt_bgswap.errors import UsageError
from trt_bgswap.registry import variants_of
from trt_bgswap.runtime.image_read import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from trt_bgswap.api import BackgroundReplacer

log = logging.getLogger("trt_bgswap")

NAME = "mask"
HELP = "subject masks only (no diffusion)"
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt", "trt")


def add_arguments(m: argparse.ArgumentParser) -> None:
    add_batch_options(m, PROVIDERS)
    m.add_argument("--rmbg", help="an RMBG .onnx file, an exported folder, an RMBG model folder or a hub id (default: the per-user export)")
    m.add_argument("--masker", choices=[v.name for v in variants_of("rmbg")], help="which masker an .onnx --rmbg is where its repo's config.json cannot tell (e.g. rmbg-2.0)")
    m.add_argument("-o", "--output", required=True, help="output folder for <stem>.png masks")
    m.add_argument("--cutout", action="store_true", help="also write <stem>_cutout.png RGBA cut-outs")
    m.add_argument("--ignore-alpha", action="store_true", help="run the masker on cut-out inputs too (default: an input's own transparency is its mask)")


def open_masker(source: Path, provider: str, threads: int, max_pixels: int | None, masker_name: str | None = None) -> "BackgroundReplacer":
    """The masker of `mask` and `dataset`: an RMBG .onnx file or an exported folder (only its RMBG model is opened)."""
    from trt_bgswap.api import BackgroundReplacer
    from trt_bgswap.runtime.masker import Masker
    from trt_bgswap.runtime.pipeline import MASK_STAGE, Pipeline

    if source.suffix.lower() == ".onnx":
        if provider == "trt":
            raise UsageError(f"--provider trt runs TensorRT engines of an exported folder (`trt-bgswap build DIR --backend trt`); for {source} use cpu, cuda or tensorrt")
        masker = Masker.from_onnx(source, provider=provider, intra_op_threads=threads, masker=masker_name)
        swapper = BackgroundReplacer(None, max_pixels=max_pixels, pipeline=Pipeline.with_masker(masker))
    else:
        swapper = BackgroundReplacer(source, provider=provider, threads=threads, max_pixels=max_pixels, stages=(MASK_STAGE,))
    log.info("rmbg %s on %s", source, swapper.pipeline.backends().get("rmbg", "?"))
    return swapper


def run(args: argparse.Namespace) -> int:
    from trt_bgswap.api import alpha_to_u8, load_photo
    from trt_bgswap.model_folders import masker_source
    from trt_bgswap.runtime.image_write import output_exif, write_image

    out_dir = Path(args.output)
    if out_dir.suffix.lower() in IMAGE_SUFFIXES:
        raise UsageError(f"-o {out_dir}: `mask` writes <stem>.png files into a folder; give a folder")
    source = masker_source(args.rmbg)  # before any photo is read
    inputs, problems = batch.collect_inputs(args.inputs, args.recursive)
    report = batch.BatchReport(tell=log.error if len(inputs) > 1 else log.debug)
    for item, why in problems:
        report.fail(item, why)
    # one output folder for every mask: plan as if for several inputs, so -o is never taken for a file
    jobs = batch.plan_outputs(inputs, str(out_dir), "png", "", 1, {CUTOUT: str(out_dir) if args.cutout else None}, folder=True)
    jobs = batch.prepare(jobs, args.overwrite, args.max_pixels, report)
    if not jobs:
        return batch.finish(report)
    swapper = open_masker(source, args.provider, args.threads, args.max_pixels, args.masker)
    protected = {j.src.path.resolve() for j in jobs}

    def work(job: Job) -> None:
        photo = load_photo(job.src.path, max_pixels=args.max_pixels)
        a8 = alpha_to_u8(swapper.source_alpha(photo, use_alpha=not args.ignore_alpha))
        for target in job.todo:
            if target.kind == CUTOUT:
                exif = None if args.strip_metadata else output_exif(photo.exif, keep_gps=args.keep_gps)
                write_image(target.path, np.dstack([photo.rgb, a8]), overwrite=args.overwrite, protected=protected, icc=photo.icc, exif=exif)
            else:
                write_image(target.path, a8, overwrite=args.overwrite, protected=protected)
            log.info("%s -> %s", job.src.path, target.path)

    return batch.run_batch(jobs, report, args.progress or sys.stderr.isatty(), work)
