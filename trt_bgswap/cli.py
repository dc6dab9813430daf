"""The `trt-bgswap` command line: a thin layer over the Python API and the exporters.

Every failure the user can act on is one line on stderr and a non-zero exit
code (2 for bad options, 1 for failed inputs or models); batch runs report a
failing image and go on. Heavy modules (torch, the exporters, TensorRT) are
imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from trt_bgswap import __version__
from trt_bgswap.errors import BgSwapError, InputImageError, OutputError, OutputExistsError, UsageError

log = logging.getLogger("trt_bgswap")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
OUTPUT_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


# --- argument types: bad values fail with the option's name and the fix ---


def _int_range(name: str, lo: int, hi: int):  # noqa: ANN202 - argparse type factory
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{name}={v}: must be between {lo} and {hi}")
        return v

    return parse


def _float_range(name: str, lo: float, hi: float):  # noqa: ANN202
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{name}={v}: must be between {lo} and {hi}")
        return v

    return parse


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' (or one number for a square) -> (width, height)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: write WIDTHxHEIGHT, e.g. 576x448") from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) <= 0:
        raise argparse.ArgumentTypeError(f"--size {text!r}: write WIDTHxHEIGHT with positive numbers, e.g. 576x448")
    return nums[0], nums[1]


# --- inputs and outputs of batch commands ---


def collect_inputs(items: Sequence[str], recursive: bool) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders and globs -> image paths (sorted, unique) and (item, problem) for those that match nothing."""
    found: dict[Path, None] = {}
    problems: list[tuple[str, str]] = []
    for item in items:
        p = Path(item)
        if any(c in item for c in "*?[") and not p.exists():
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                problems.append((item, "the pattern matches no image files"))
            for f in files:
                found.setdefault(f, None)
        elif p.is_dir():
            walker = p.rglob("*") if recursive else p.glob("*")
            files = sorted(f for f in walker if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                hint = "" if recursive else " (add --recursive to look in sub-folders)"
                problems.append((item, f"the folder has no image files{hint}"))
            for f in files:
                found.setdefault(f, None)
        elif p.exists():
            found.setdefault(p, None)
        else:
            problems.append((item, "no such file or folder"))
    return list(found), problems


def output_plan(inputs: Sequence[Path], out: str | None, default_ext: str, suffix: str, count: int = 1) -> dict[Path, list[Path]]:
    """Where each input's results go. One input and an OUT with an image extension: that file; otherwise OUT is a folder."""
    if out is not None and len(inputs) == 1 and Path(out).suffix.lower() in OUTPUT_SUFFIXES:
        target = Path(out)
        if count == 1:
            return {inputs[0]: [target]}
        return {inputs[0]: [target.with_name(f"{target.stem}_{i}{target.suffix}") for i in range(count)]}
    if out is not None and Path(out).suffix.lower() in IMAGE_SUFFIXES and len(inputs) > 1:
        raise UsageError(f"-o {out}: several inputs need an output folder, not a file name")
    folder = Path(out) if out is not None else None
    plan: dict[Path, list[Path]] = {}
    used: dict[Path, Path] = {}
    for src in inputs:
        base = (folder if folder is not None else src.parent) / f"{src.stem}{suffix}"
        names = [base.with_suffix(default_ext)] if count == 1 else [Path(f"{base}_{i}{default_ext}") for i in range(count)]
        for n in names:
            if n in used:
                raise UsageError(f"{src} and {used[n]} would both write {n}; give them different names or separate runs")
            used[n] = src
        plan[src] = names
    return plan


@dataclass
class BatchReport:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.done)} done, {len(self.skipped)} skipped (outputs exist; --overwrite to redo), {len(self.failed)} failed"


class Progress:
    """A progress line on stderr with images/s (only when stderr is a terminal, or with --progress)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.start = time.perf_counter()
        self.count = 0

    def update(self, name: str, status: str) -> None:
        self.count += 1
        if not self.enabled:
            return
        rate = self.count / max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(f"\r[{self.count}/{self.total}] {rate:.2f} img/s  {status:<7} {name[:60]:<60}")
        if self.count == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _check_not_input(target: Path, inputs: set[Path]) -> None:
    rt = target.resolve()
    for src in inputs:
        if rt == src or (target.exists() and os.path.samefile(target, src)):
            raise UsageError(f"output {target} is an input file; trt-bgswap never overwrites inputs: choose another -o")


# --- commands ---


def cmd_run(args: argparse.Namespace) -> int:
    from trt_bgswap.api import BackgroundReplacer, _alpha_u8
    from trt_bgswap.runtime.image_io import read_image, write_image
    from trt_bgswap.runtime.mask_ops import MaskOptions

    mask_options = MaskOptions(threshold=args.threshold, grow=args.grow, feather=args.feather, band=args.band)
    mask_options.validate()
    if args.prompt is None and args.bg_color is None:
        raise UsageError("give --prompt TEXT for a generated background, or --bg-color '#RRGGBB' for a solid one")
    if args.bg_color is not None:
        from trt_bgswap.colors import parse_color

        parse_color(args.bg_color)
    inputs, problems = collect_inputs(args.inputs, args.recursive)
    report = BatchReport(failed=list(problems))
    count = 1 if args.bg_color is not None else args.num_results
    plan = output_plan(inputs, args.output, "." + args.format if args.format else ".png", "_bgswap", count)
    models = _models_dir(args.models)
    swapper = BackgroundReplacer(models, provider=args.provider, threads=args.threads, max_pixels=args.max_pixels)
    input_set = {p.resolve() for p in inputs}
    progress = Progress(len(inputs), args.progress or sys.stderr.isatty())
    for src, targets in plan.items():
        try:
            for t in targets:
                _check_not_input(t, input_set)
            if all(t.exists() for t in targets) and not args.overwrite:
                report.skipped.append(src)
                progress.update(src.name, "skipped")
                continue
            loaded = read_image(src, max_pixels=args.max_pixels)
            mask = _mask_for(args.mask, src, len(inputs))
            for i, target in enumerate(targets):
                seed = None if args.seed is None else args.seed + i
                out = swapper.replace(
                    loaded.rgb,
                    args.prompt,
                    negative_prompt=args.negative_prompt,
                    steps=args.steps,
                    guidance=args.guidance,
                    seed=seed,
                    size=args.size,
                    bg_color=args.bg_color,
                    mask=mask,
                    mask_options=mask_options,
                )
                write_image(target, out.result.image, quality=args.quality, overwrite=True, protected=input_set)
                log.info("%s -> %s (seed %s, generated at %s)", src, target, out.seed, out.generation_size)
                if i == 0 and args.save_mask:
                    write_image(_side_path(args.save_mask, src, len(inputs), "_mask.png"), _alpha_u8(out.result.alpha), overwrite=True, protected=input_set)
                if i == 0 and args.save_cutout:
                    write_image(_side_path(args.save_cutout, src, len(inputs), "_cutout.png"), out.cutout, overwrite=True, protected=input_set)
            report.done.append(src)
            progress.update(src.name, "ok")
        except OutputExistsError:
            report.skipped.append(src)
            progress.update(src.name, "skipped")
        except (InputImageError, OutputError, UsageError) as e:
            report.failed.append((str(src), str(e)))
            progress.update(src.name, "FAILED")
            log.error("%s", e)
    return _finish(report)


def cmd_mask(args: argparse.Namespace) -> int:
    from trt_bgswap.runtime.image_io import read_image, write_image

    import numpy as np

    masker = _load_masker(args.rmbg, args.provider, args.threads)
    inputs, problems = collect_inputs(args.inputs, args.recursive)
    report = BatchReport(failed=list(problems))
    out_dir = Path(args.output)
    if out_dir.suffix.lower() in IMAGE_SUFFIXES:
        raise UsageError(f"-o {out_dir}: `mask` writes <stem>.png files into a folder; give a folder")
    plan = output_plan(inputs, str(out_dir), ".png", "", 1)
    input_set = {p.resolve() for p in inputs}
    progress = Progress(len(inputs), args.progress or sys.stderr.isatty())
    for src, (target,) in plan.items():
        try:
            _check_not_input(target, input_set)
            cut_target = target.with_name(f"{target.stem}_cutout.png")
            wanted = [target] + ([cut_target] if args.cutout else [])
            if all(t.exists() for t in wanted) and not args.overwrite:
                report.skipped.append(src)
                progress.update(src.name, "skipped")
                continue
            loaded = read_image(src, max_pixels=args.max_pixels)
            alpha = masker.predict(loaded.rgb)
            a8 = np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)
            write_image(target, a8, overwrite=True, protected=input_set)
            if args.cutout:
                write_image(cut_target, np.dstack([loaded.rgb, a8]), overwrite=True, protected=input_set)
            report.done.append(src)
            progress.update(src.name, "ok")
        except OutputExistsError:
            report.skipped.append(src)
            progress.update(src.name, "skipped")
        except (InputImageError, OutputError, UsageError) as e:
            report.failed.append((str(src), str(e)))
            progress.update(src.name, "FAILED")
            log.error("%s", e)
    return _finish(report)


def cmd_export(args: argparse.Namespace) -> int:
    from trt_bgswap.export.exporter import export_models
    from trt_bgswap.export.sources import resolve_source

    inpaint = resolve_source(args.inpaint, family="sd-inpainting", offline=args.offline) if args.inpaint else None
    lora = resolve_source(args.lcm_lora, family="lcm-lora", offline=args.offline) if args.lcm_lora else None
    rmbg = resolve_source(args.rmbg, family="rmbg", offline=args.offline) if args.rmbg else None
    if inpaint is None:
        raise UsageError("export needs --inpaint SRC (a diffusers folder or a hub id)")
    manifest = export_models(inpaint, lora, rmbg, Path(args.out), precision=args.precision, opset=args.opset)
    log.info("exported %s to %s", ", ".join(manifest.models), args.out)
    return 0


def cmd_tiny_models(args: argparse.Namespace) -> int:
    from trt_bgswap.export.tiny import write_tiny_models

    paths = write_tiny_models(Path(args.dir))
    for name, path in paths.items():
        log.info("%s: %s", name, path)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from trt_bgswap.engines.build import build_engines
    from trt_bgswap.engines.profiles import parse_size_range
    from trt_bgswap.runtime.loader import resolve_backend

    if args.backend == "trt":
        backend, provider = "trt", None
    else:
        choice = resolve_backend(args.provider)
        backend, provider = "ort", choice.provider or "cpu"
    report = build_engines(
        Path(args.dir),
        backend=backend,
        precision=args.precision if backend == "trt" else None,
        sizes=tuple(args.size or ()),
        dynamic=parse_size_range(args.dynamic) if args.dynamic else None,
        opt_level=args.opt_level,
        provider=provider or "cpu",
    )
    log.info("engines in %s (%d rebuilt, %d reused)", report.out_dir, len(report.rebuilt), len(report.models) - len(report.rebuilt))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from trt_bgswap.info import info_text

    sys.stdout.write(info_text() + "\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from trt_bgswap.bench import run_bench

    return run_bench(args)


# --- helpers ---


def _models_dir(models: str | None) -> Path:
    from trt_bgswap.paths import default_export_dir

    folder = Path(models) if models else default_export_dir()
    if not (folder / "manifest.json").is_file():
        raise UsageError(
            f"{folder} holds no exported models; make them with `trt-bgswap export --out {folder}` "
            f"(or `trt-bgswap tiny-models DIR` and export those for an offline smoke test)"
        )
    return folder


def _load_masker(src: str, provider: str, threads: int):  # noqa: ANN202 - Masker is imported lazily
    from trt_bgswap.runtime.masker import Masker

    p = Path(src)
    if p.is_file() and p.suffix == ".onnx":
        return Masker.from_onnx(p, provider=provider)
    if (p / "manifest.json").is_file():
        from trt_bgswap.manifest import Manifest

        return Masker.from_export(p, Manifest.load(p), provider=provider)
    if p.is_dir() and (p / "onnx" / "model.onnx").is_file():
        return Masker.from_onnx(p / "onnx" / "model.onnx", provider=provider)
    if p.is_dir():
        raise UsageError(
            f"--rmbg {src}: no RMBG ONNX model here; give an .onnx file, an exported folder, or a folder with onnx/model.onnx"
        )
    from trt_bgswap.export.sources import resolve_source

    folder = resolve_source(src, family="rmbg", offline=False)
    return _load_masker(str(folder), provider, threads)


def _mask_for(mask_arg: str | None, src: Path, n_inputs: int) -> Path | None:
    if mask_arg is None:
        return None
    m = Path(mask_arg)
    if m.is_dir():
        candidates = [c for c in m.iterdir() if c.stem == src.stem and c.suffix.lower() in IMAGE_SUFFIXES]
        if not candidates:
            raise InputImageError(f"{src}: no mask named {src.stem}.* in {m}")
        return candidates[0]
    if n_inputs > 1:
        raise UsageError(f"--mask {mask_arg}: with several inputs give a folder of masks named like the inputs")
    return m


def _side_path(arg: str, src: Path, n_inputs: int, suffix: str) -> Path:
    p = Path(arg)
    if n_inputs == 1 and p.suffix.lower() in OUTPUT_SUFFIXES:
        return p
    return p / f"{src.stem}{suffix}"


def _finish(report: BatchReport) -> int:
    for item, why in report.failed:
        sys.stderr.write(f"failed: {item}: {why}\n")
    sys.stderr.write(report.summary() + "\n")
    return 1 if report.failed else 0


# --- the parser ---


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to look, exit code 2."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from trt_bgswap.runtime.ort_backend import PROVIDER_CHOICES

    p = _Parser(prog="trt-bgswap", description="AI background replacement: RMBG mask, LCM inpainting, composite.")
    p.add_argument("--version", action="version", version=f"trt-bgswap {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def common_batch(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, folders or globs")
        sp.add_argument("--recursive", action="store_true", help="look into sub-folders of folder inputs")
        sp.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist (default: skip them)")
        sp.add_argument("--provider", choices=(*PROVIDER_CHOICES, "trt"), default="auto", help="auto (TensorRT engines, then ONNX Runtime CUDA, then CPU), trt, tensorrt/cuda (ONNX Runtime providers) or cpu")
        sp.add_argument("--threads", type=_int_range("--threads", 0, 256), default=0, help="intra-op threads (0: all cores)")
        sp.add_argument("--max-pixels", type=_int_range("--max-pixels", 1, 2**31), default=None, help="refuse larger images (decompression-bomb guard)")
        sp.add_argument("--progress", action="store_true", help="show the progress line even when stderr is not a terminal")

    r = sub.add_parser("run", help="replace the background of images")
    common_batch(r)
    r.add_argument("--models", help="exported model folder (default: the per-user cache)")
    r.add_argument("--prompt", help="what the new background shows")
    r.add_argument("--negative-prompt", default="", help="what it should not show (used when --guidance > 1)")
    r.add_argument("-o", "--output", help="output file (one input) or folder")
    r.add_argument("--format", choices=["png", "jpg", "webp"], help="output format for folder outputs (default png)")
    r.add_argument("--quality", type=_int_range("--quality", 1, 100), default=95, help="JPEG/WebP quality")
    r.add_argument("--seed", type=_int_range("--seed", 0, 2**63 - 1), help="random seed (same seed, same image)")
    r.add_argument("--steps", type=_int_range("--steps", 1, 50), default=4, help="LCM steps (2-8 are useful)")
    r.add_argument("--guidance", type=_float_range("--guidance", 0.0, 30.0), default=1.0, help="classifier-free guidance (1: off)")
    r.add_argument("--num-results", type=_int_range("--num-results", 1, 64), default=1, help="results per image, seeds seed, seed+1, ...")
    r.add_argument("--size", type=parse_size, help="generation size WxH, multiples of 64 (default: ~512^2 at the image's aspect)")
    r.add_argument("--bg-color", help="a solid background instead of a generated one: '#RRGGBB', '#RGB' or a name")
    r.add_argument("--mask", help="your own subject mask (white = keep) instead of RMBG: a file, or a folder of <stem>.png")
    r.add_argument("--save-mask", help="also write the alpha mask (a file for one input, else a folder)")
    r.add_argument("--save-cutout", help="also write the RGBA cut-out (a file for one input, else a folder)")
    r.add_argument("--threshold", type=_float_range("--threshold", 0.0, 1.0), help="binarise the subject mask at this level")
    r.add_argument("--grow", type=_int_range("--grow", -512, 512), default=0, help="grow (or with a negative value shrink) the subject, pixels")
    r.add_argument("--feather", type=_float_range("--feather", 0.0, 256.0), default=0.0, help="soften the mask edge, pixels")
    r.add_argument("--band", type=_int_range("--band", 0, 512), default=8, help="how far the repainted area reaches into the subject, pixels")
    r.set_defaults(func=cmd_run)

    m = sub.add_parser("mask", help="subject masks only (no diffusion)")
    common_batch(m)
    m.add_argument("--rmbg", required=True, help="an RMBG .onnx file, an exported folder, an RMBG model folder or a hub id")
    m.add_argument("-o", "--output", required=True, help="output folder for <stem>.png masks")
    m.add_argument("--cutout", action="store_true", help="also write <stem>_cutout.png RGBA cut-outs")
    m.set_defaults(func=cmd_mask)

    e = sub.add_parser("export", help="PyTorch models -> ONNX folder (needs the export extra)")
    e.add_argument("--inpaint", default="sd15-inpainting", help="SD1.5 inpainting diffusers folder or hub id")
    e.add_argument("--lcm-lora", default="lcm-lora-sdv1-5", help="LCM-LoRA safetensors (file, folder or hub id); 'none' to skip")
    e.add_argument("--rmbg", default="rmbg-1.4", help="RMBG ONNX file, safetensors folder or hub id; 'none' to skip")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    e.add_argument("--opset", type=_int_range("--opset", 14, 21), default=17)
    e.add_argument("--offline", action="store_true", help="use only the local hub cache (also HF_HUB_OFFLINE=1)")
    e.set_defaults(func=cmd_export)

    t = sub.add_parser("tiny-models", help="write tiny random-weight models in the real formats (offline smoke tests)")
    t.add_argument("dir")
    t.set_defaults(func=cmd_tiny_models)

    b = sub.add_parser("build", help="exported folder -> engines (TensorRT plans or pre-optimized ONNX Runtime graphs)")
    b.add_argument("dir")
    b.add_argument("--backend", choices=["ort", "trt"], default="ort", help="ort: pre-optimized ONNX Runtime graphs (+ EP caches); trt: TensorRT plans")
    b.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"], default="cpu", help="for --backend ort: the ONNX Runtime provider to build for")
    b.add_argument("--precision", choices=["fp16", "fp32"], default="fp16", help="TensorRT plan precision")
    b.add_argument("--size", type=parse_size, action="append", help="generation size WxH (repeatable)")
    b.add_argument("--dynamic", help="dynamic size range MIN..MAX, e.g. 256..768")
    b.add_argument("--opt-level", type=_int_range("--opt-level", 0, 5), default=3, help="TensorRT builder optimization level")
    b.set_defaults(func=cmd_build)

    i = sub.add_parser("info", help="versions, backends, GPU and cache contents")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        from trt_bgswap.bench import add_bench_parser

        add_bench_parser(parser)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s" if args.verbose else "%(message)s", stream=sys.stderr)
    logging.getLogger("trt_bgswap").setLevel(level)
    try:
        return int(args.func(args) or 0)
    except BgSwapError as e:
        if args.verbose:
            log.exception("failed")
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
