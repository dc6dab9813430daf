"""`trt-bgswap dataset`: photos -> a background-completion training set (images, masks, metadata.jsonl).

The batch runs like `run` and `mask` (:mod:`trt_bgswap.cli.batch`): inputs and outputs are all
checked before a model loads, a bad photo is reported and the batch goes on, a rerun skips the
photos an earlier run finished. The subject's alpha comes from any masker the product has: the
photo's own transparency, your masks (``--masks DIR``), or RMBG (``--rmbg``: an .onnx file or an
exported folder); the masker is opened only if some photo needs it. What the dataset is made of
is :mod:`trt_bgswap.training.dataset`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from trt_bgswap.cli import batch
from trt_bgswap.cli.batch import MASK, RESULT, Input, Job
from trt_bgswap.cli.mask_command import PROVIDERS
from trt_bgswap.cli.options import add_batch_options, float_range, int_range
from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.image_read import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from trt_bgswap.training.dataset import DatasetOptions

log = logging.getLogger("trt_bgswap")

NAME = "dataset"
HELP = "photos -> a background-completion training set for `finetune` (imagefolder layout)"


def add_arguments(d: argparse.ArgumentParser) -> None:
    add_batch_options(d, PROVIDERS)
    d.add_argument("-o", "--output", required=True, help="the dataset folder (new, or one an earlier run of the same options made)")
    d.add_argument("--rmbg", help="the masker: an RMBG .onnx file, an exported folder, an RMBG model folder or a hub id (default: the per-user export)")
    d.add_argument("--masks", help="a folder of your own subject masks (white = subject), named like the photos, instead of RMBG")
    d.add_argument("--ignore-alpha", action="store_true", help="mask cut-out inputs too (default: a photo's own transparency is its subject mask)")
    d.add_argument("--threshold", type=float_range("--threshold", 0.0, 1.0), help="binarise the subject's alpha at this level")
    d.add_argument("--grow", type=int_range("--grow", -512, 512), default=0, help="grow (or with a negative value shrink) the subject, pixels")
    d.add_argument("--band", type=int_range("--band", 0, 512), default=8, help="pixels the mask keeps clear of the subject, so no subject edge is a training target")
    d.add_argument("--random-mask-ratio", type=float_range("--random-mask-ratio", 0.0, 1.0), default=0.0, help="share of photos given free-form brush-stroke masks (DeepFill v2) instead of their background")
    d.add_argument("--min-background", type=float_range("--min-background", 0.0, 1.0), default=0.05, help="leave out photos with less background than this share")
    d.add_argument("--max-background", type=float_range("--max-background", 0.0, 1.0), default=0.95, help="leave out photos with more background than this share (no subject found)")
    d.add_argument("--max-pieces", type=int_range("--max-pieces", 2, 100000), default=12, help="leave out photos whose mask and subject are in more pieces than this")
    d.add_argument("--caption-template", default="{caption}", help="each photo's text: {caption} (its sidecar PHOTO.txt), {stem}, {parent} (its folder's name)")
    d.add_argument("--validation-ratio", type=float_range("--validation-ratio", 0.0, 0.99), default=0.1, help="share of photos in the validation split (a seeded hash of the name)")
    d.add_argument("--seed", type=int_range("--seed", 0, 2**63 - 1), default=0, help="seed of the split and of the free-form masks")
    d.add_argument("--max-side", type=int_range("--max-side", 0, 65535), default=1024, help="store photos at most this many pixels a side (0: as they are)")
    d.add_argument("--format", choices=["jpg", "png", "webp"], default="jpg", help="format of the stored photos (masks are PNG)")
    d.add_argument("--quality", type=int_range("--quality", 1, 100), default=95, help="JPEG/WebP quality of the stored photos")


def _options(args: argparse.Namespace) -> "DatasetOptions":
    from trt_bgswap.runtime.mask_ops import MaskOptions
    from trt_bgswap.training.dataset import DatasetOptions
    from trt_bgswap.training.masks import QualityLimits

    options = DatasetOptions(
        mask=MaskOptions(threshold=args.threshold, grow=args.grow, band=args.band),
        limits=QualityLimits(min_background=args.min_background, max_background=args.max_background, max_pieces=args.max_pieces),
        random_mask_ratio=args.random_mask_ratio,
        caption_template=args.caption_template,
        validation_ratio=args.validation_ratio,
        seed=args.seed,
        max_side=args.max_side,
        image_format=args.format,
        quality=args.quality,
    )
    options.validate()
    return options


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from trt_bgswap.api import BackgroundReplacer, load_photo
    from trt_bgswap.cli.mask_command import open_masker
    from trt_bgswap.cli.run_command import mask_file_for
    from trt_bgswap.model_folders import masker_source
    from trt_bgswap.runtime.color_management import ColorSpace
    from trt_bgswap.runtime.image_write import output_exif, write_image
    from trt_bgswap.training import dataset as ds

    options = _options(args)
    out = Path(args.output)
    if out.suffix.lower() in IMAGE_SUFFIXES or (out.exists() and not out.is_dir()):
        raise UsageError(f"-o {out}: a dataset is a folder; give a folder name")
    if args.masks is not None and not Path(args.masks).is_dir():
        raise UsageError(f"--masks {args.masks}: not a folder; give a folder of subject masks named like the photos (white = subject)")
    batch.check_folder(out)
    inputs, problems = batch.collect_inputs(args.inputs, args.recursive)
    inside = [i for i in inputs if _inside(i.path, out)]
    if inside:
        log.info("left out %d file(s) inside the dataset folder %s, e.g. %s", len(inside), out, inside[0].path)
        inputs = [i for i in inputs if i not in inside]
    ds.check_build(out, options)  # a rerun must build the same way; a new folder records how
    report = batch.BatchReport(tell=log.error if len(inputs) > 1 else log.debug)
    for item, why in problems:
        report.fail(item, why)

    by_split: dict[str, list[Input]] = defaultdict(list)
    for src in inputs:
        by_split[ds.split_of(src.rel.as_posix(), options)].append(src)
    jobs: list[Job] = []
    for split, group in sorted(by_split.items()):
        jobs += batch.plan_outputs(group, str(out / split / ds.IMAGES), options.image_format, "", 1, {MASK: str(out / split / ds.MASKS)}, folder=True)

    def target(job: Job, kind: str) -> Path:
        return next(t.path for t in job.targets if t.kind == kind)

    left = []
    for job in jobs:
        if not args.overwrite and ds.finished(out, target(job, RESULT), target(job, MASK)):
            report.skipped.append(job.src.path)
        else:
            left.append(job)
    # outputs left by an interrupted run are ours to redo: prepare sees every target as to-do
    jobs = batch.prepare(left, True, args.max_pixels, report)

    def needs_masker(job: Job) -> bool:
        own_alpha = job.info is not None and job.info.has_alpha and not args.ignore_alpha
        return not ds.uses_random_mask(job.src.rel.as_posix(), options) and args.masks is None and not own_alpha

    if any(needs_masker(j) for j in jobs):
        swapper = open_masker(masker_source(args.rmbg), args.provider, args.threads, args.max_pixels)
    else:
        swapper = BackgroundReplacer(None, max_pixels=args.max_pixels)
    protected = {j.src.path.resolve() for j in jobs}

    def work(job: Job) -> None:
        src, key = job.src.path, job.src.rel.as_posix()
        photo = load_photo(src, max_pixels=args.max_pixels)
        alpha = None
        how = "free-form strokes"
        if not ds.uses_random_mask(key, options):
            mask_file = mask_file_for(args.masks, src, len(inputs)) if args.masks is not None else None
            own = photo.cutout_alpha is not None and not args.ignore_alpha
            how = f"mask {mask_file}" if mask_file is not None else "the photo's alpha" if own else "rmbg"
            alpha = photo.cutout_alpha if own and mask_file is None else swapper.source_alpha(photo, mask=mask_file, use_alpha=False)
        example = ds.make_example(ColorSpace(photo.icc).to_srgb(photo.rgb), alpha, key, options)
        image, mask = target(job, RESULT), target(job, MASK)
        split = ds.split_of(key, options)
        record = ds.example_record(out, split, image, mask, src, ds.caption_for(src, options.caption_template), example, how)
        if record["status"] == "ok":
            exif = None if args.strip_metadata else output_exif(photo.exif, keep_gps=args.keep_gps)
            write_image(image, example.rgb, quality=options.quality, overwrite=True, protected=protected, exif=exif)  # sRGB: no profile
            write_image(mask, example.mask, overwrite=True, protected=protected)
            log.info("%s -> %s (%s, %s mask, %.0f%% background)", src, image, split, how, 100 * example.quality.background)
        else:
            log.info("%s: left out: %s", src, record["why"])
        ds.write_record(out, image, record)  # last: a photo with a record is finished

    try:
        code = batch.run_batch(jobs, report, args.progress or sys.stderr.isatty(), work) if jobs else batch.finish(report)
    finally:  # also when the models fail for every photo: what earlier photos made is listed
        summary = ds.write_metadata(out, report.failed)
    log.info("%s", summary.line(out))
    if options.validation_ratio > 0 and not summary.examples.get(ds.VALIDATION) and summary.examples.get(ds.TRAIN):
        log.warning("no photo fell in the validation split (--validation-ratio %g of %d); `finetune` then validates on training photos", options.validation_ratio, summary.examples[ds.TRAIN])
    if summary.uncaptioned:
        log.warning("%d example(s) have an empty text: put PHOTO.txt beside a photo or give --caption-template", summary.uncaptioned)
    return code

