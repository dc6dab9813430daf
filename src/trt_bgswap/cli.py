"""The `trt-bgswap` command line: a thin layer over the Python API and the exporters.

Every failure the user can act on is one line on stderr and a non-zero exit
code (2 for bad options, 1 for failed inputs or models); batch runs report a
failing image and go on, then print a summary. Heavy modules (torch, the
exporters, TensorRT) are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from trt_bgswap import __version__
from trt_bgswap.errors import BackendUnavailable, BgSwapError, ModelError, OutputError, OutputExistsError, UsageError

if TYPE_CHECKING:
    from trt_bgswap.manifest import Manifest
    from trt_bgswap.runtime.image_io import LoadedImage
    from trt_bgswap.runtime.masker import Masker

log = logging.getLogger("trt_bgswap")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
OUTPUT_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
# (family, run/export option, argparse dest): the model sources an export is made from.
SOURCE_OPTIONS = (("sd-inpainting", "--inpaint", "inpaint"), ("lcm-lora", "--lcm-lora", "lcm_lora"), ("rmbg", "--rmbg", "rmbg"))
NONE = "none"  # a source value that leaves that model out
DEFAULT_SOURCES = {"inpaint": "sd15-inpainting", "lcm_lora": "lcm-lora-sdv1-5", "rmbg": "rmbg-1.4"}  # registry names


# --- argument types: bad values fail with the option's name and the fix ---


def _int_range(name: str, lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{name}={v}: must be between {lo} and {hi}")
        return v

    return parse


def _float_range(name: str, lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not lo <= v <= hi:  # also refuses nan
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


def _color(text: str) -> tuple[int, int, int]:
    from trt_bgswap.colors import parse_color

    try:
        return parse_color(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
            # hidden files and folders (macOS ._ resource forks, .thumbnails, our own temp files) are not photos
            files = sorted(
                f for f in walker
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not files:
                hint = "" if recursive else " (add --recursive to look in sub-folders)"
                problems.append((item, f"the folder has no image files{hint}"))
            for f in files:
                found.setdefault(f, None)
        elif p.exists() or p.is_symlink():
            found.setdefault(p, None)
        else:
            problems.append((item, "no such file or folder; check the path"))
    return list(found), problems


def output_plan(
    inputs: Sequence[Path],
    out: str | None,
    default_ext: str,
    suffix: str,
    count: int = 1,
    side_outputs: Callable[[Path], list[Path]] | None = None,
) -> dict[Path, list[Path]]:
    """Where each input's results go. One input and an OUT with an image extension: that file; otherwise OUT is a folder.

    An input that is where another input's result (or side output) goes is an
    earlier run's output picked up by a folder or glob: it is left out, so
    running a folder twice skips its images instead of processing its results.
    """
    if out is not None and len(inputs) == 1 and Path(out).suffix.lower() in OUTPUT_SUFFIXES:
        target = Path(out)
        if count == 1:
            return {inputs[0]: [target]}
        return {inputs[0]: [target.with_name(f"{target.stem}_{i}{target.suffix}") for i in range(count)]}
    if out is not None and Path(out).suffix.lower() in IMAGE_SUFFIXES and len(inputs) > 1:
        raise UsageError(f"-o {out}: several inputs need an output folder, not a file name")
    folder = Path(out) if out is not None else None
    names: dict[Path, list[Path]] = {}
    for src in inputs:
        base = (folder if folder is not None else src.parent) / f"{src.stem}{suffix}"
        names[src] = [base.with_suffix(default_ext)] if count == 1 else [Path(f"{base}_{i}{default_ext}") for i in range(count)]
    made_by: dict[Path, Path] = {}
    for src, targets in names.items():
        for t in [*targets, *(side_outputs(src) if side_outputs else [])]:
            made_by.setdefault(t.resolve(), src)
    plan: dict[Path, list[Path]] = {}
    used: dict[Path, Path] = {}
    earlier: list[Path] = []
    for src in inputs:
        maker = made_by.get(src.resolve())
        if maker is not None and maker != src:
            earlier.append(src)
            continue
        for n in names[src]:
            if n in used:
                raise UsageError(f"{src} and {used[n]} would both write {n}; give them different names or separate runs")
            used[n] = src
        plan[src] = names[src]
    if earlier:
        log.info("left out %d file(s) where this run writes its results, e.g. %s (an earlier run's outputs)", len(earlier), earlier[0])
    return plan


@dataclass
class BatchReport:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def summary(self) -> str:
        seconds = time.perf_counter() - self.start
        rate = len(self.done) / seconds if seconds > 0 else 0.0
        return (
            f"{len(self.done)} done, {len(self.skipped)} skipped (outputs exist; --overwrite to redo), "
            f"{len(self.failed)} failed in {seconds:.1f} s ({rate:.2f} img/s)"
        )


class Progress:
    """A progress bar on stderr with images/s: redrawn in place on a terminal, one line per image otherwise.

    Shown when stderr is a terminal, or with --progress.
    """

    WIDTH = 20

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.start = time.perf_counter()
        self.count = 0
        self.worked = 0  # images processed (done or failed): skipped ones take no time and would inflate the rate

    def line(self, name: str, status: str) -> str:
        rate = self.worked / max(time.perf_counter() - self.start, 1e-9)
        filled = self.WIDTH * self.count // max(self.total, 1)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        return f"[{bar}] {self.count}/{self.total} {rate:.2f} img/s  {status:<7} {name[:60]}"

    def update(self, name: str, status: str) -> None:
        self.count += 1
        self.worked += status != "skipped"
        if not self.enabled:
            return
        text = self.line(name, status)
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{text:<110}" + ("\n" if self.count == self.total else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _check_not_input(target: Path, inputs: set[Path]) -> None:
    rt = target.resolve()
    for src in inputs:
        if rt == src or (target.exists() and os.path.samefile(target, src)):
            raise OutputError(f"{target}: is an input file; trt-bgswap never overwrites inputs, choose another -o")


def _run_batch(
    plan: dict[Path, list[Path]],
    report: BatchReport,
    show_progress: bool,
    overwrite: bool,
    work: Callable[[Path, list[Path]], None],
) -> int:
    """Process each input; one image's failure is reported and the batch goes on. Returns the exit code."""
    inputs = {p.resolve() for p in plan}
    report.start = time.perf_counter()  # the summary's rate is the batch's, model loading excluded (as the progress bar's)
    progress = Progress(len(plan), show_progress)
    tell = log.error if len(plan) > 1 else log.debug  # in a batch, say it when it happens; the summary repeats it
    for src, targets in plan.items():
        try:
            for t in targets:
                _check_not_input(t, inputs)
            todo = targets if overwrite else [t for t in targets if not t.exists()]
            if not todo:
                report.skipped.append(src)
                progress.update(src.name, "skipped")
                continue
            work(src, todo)
            report.done.append(src)
            progress.update(src.name, "ok")
        except OutputExistsError:  # appeared since the check (another process): kept, as without --overwrite
            report.skipped.append(src)
            progress.update(src.name, "skipped")
        except (ModelError, BackendUnavailable):
            raise  # the models are wrong for every image: stop the batch
        except BgSwapError as e:
            report.failed.append((str(src), str(e)))
            progress.update(src.name, "FAILED")
            tell("%s", _name_in(str(src), str(e)))
        except Exception as e:  # noqa: BLE001 - a bug on one image must not lose the batch; -v shows the traceback
            log.debug("%s: traceback", src, exc_info=True)
            msg = f"internal error ({type(e).__name__}: {' '.join(str(e).split())[:200]}); rerun with -v and report it"
            report.failed.append((str(src), msg))
            progress.update(src.name, "FAILED")
            tell("%s: %s", src, msg)
    return _finish(report)


def _name_in(item: str, why: str) -> str:
    """The message, prefixed with the file unless it starts with it."""
    return why if why.startswith(item) else f"{item}: {why}"


def _finish(report: BatchReport) -> int:
    for item, why in report.failed:
        sys.stderr.write(f"failed: {_name_in(item, why)}\n")
    sys.stderr.write(report.summary() + "\n")
    return 1 if report.failed else 0


# --- commands ---


def cmd_run(args: argparse.Namespace) -> int:
    from trt_bgswap.api import BackgroundReplacer, alpha_to_u8
    from trt_bgswap.runtime.image_io import read_image, write_image
    from trt_bgswap.runtime.mask_ops import MaskOptions

    mask_options = MaskOptions(threshold=args.threshold, grow=args.grow, feather=args.feather, band=args.band)
    mask_options.validate()
    if args.prompt is None and args.bg_color is None:
        raise UsageError("give --prompt TEXT for a generated background, or --bg-color '#RRGGBB' for a solid one")
    if args.prompt is not None and args.bg_color is not None:
        raise UsageError("--prompt and --bg-color are alternatives (a generated or a solid background); give one")
    if args.mask is not None and not Path(args.mask).exists():
        raise UsageError(f"--mask {args.mask}: no such file or folder; give a mask image, or a folder of masks named like the inputs")
    inputs, problems = collect_inputs(args.inputs, args.recursive)
    report = BatchReport(failed=list(problems))
    count = 1 if args.bg_color is not None else args.num_results
    n = len(inputs)

    def side_outputs(src: Path) -> list[Path]:
        return [_side_path(a, src, n, s) for a, s in ((args.save_mask, "_mask.png"), (args.save_cutout, "_cutout.png")) if a]

    plan = output_plan(inputs, args.output, "." + (args.format or "png"), "_bgswap", count, side_outputs)
    if not plan:
        return _finish(report)
    swapper = BackgroundReplacer(_models_for_run(args), provider=args.provider, threads=args.threads, max_pixels=args.max_pixels)
    swapper.check_options(  # once, before any image: a bad option stops the run with exit code 2
        args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        size=args.size,
        bg_color=args.bg_color,
        has_mask=args.mask is not None,
    )
    protected = {p.resolve() for p in inputs}

    def work(src: Path, targets: list[Path]) -> None:
        loaded = read_image(src, max_pixels=args.max_pixels)
        # RMBG runs once per image, however many results: its raw alpha is the mask of every seed
        mask = _mask_for(args.mask, src, n) if args.mask is not None else swapper.mask(loaded.rgb)
        plan_targets = plan[src]
        first = True
        for target in targets:
            i = plan_targets.index(target)
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
            write_image(target, out.result.image, quality=args.quality, overwrite=args.overwrite, protected=protected, icc=loaded.icc)
            log.info("%s -> %s%s", src, target, f" (seed {out.seed}, generated at {out.generation_size[0]}x{out.generation_size[1]})" if out.generation_size else "")
            if first:
                first = False
                if args.save_mask:
                    _write_side(_side_path(args.save_mask, src, n, "_mask.png"), alpha_to_u8(out.result.alpha), args.overwrite, protected, None)
                if args.save_cutout:
                    _write_side(_side_path(args.save_cutout, src, n, "_cutout.png"), out.cutout, args.overwrite, protected, loaded.icc)

    return _run_batch(plan, report, args.progress or sys.stderr.isatty(), args.overwrite, work)


def cmd_mask(args: argparse.Namespace) -> int:
    import numpy as np

    from trt_bgswap.api import alpha_to_u8
    from trt_bgswap.runtime.image_io import read_image, write_image

    out_dir = Path(args.output)
    if out_dir.suffix.lower() in IMAGE_SUFFIXES:
        raise UsageError(f"-o {out_dir}: `mask` writes <stem>.png files into a folder; give a folder")
    inputs, problems = collect_inputs(args.inputs, args.recursive)
    report = BatchReport(failed=list(problems))

    def cutout_path(target: Path) -> Path:
        return target.with_name(f"{target.stem}_cutout.png")

    def side_outputs(src: Path) -> list[Path]:
        return [cutout_path(out_dir / f"{src.stem}.png")] if args.cutout else []

    plan = output_plan(inputs, str(out_dir), ".png", "", 1, side_outputs)
    if args.cutout:
        plan = {src: [t, cutout_path(t)] for src, (t,) in plan.items()}
    if not plan:
        return _finish(report)
    masker = _load_masker(args.rmbg, args.provider, args.threads)
    log.info("rmbg %s on %s", masker.engine.path, masker.engine.backend)
    protected = {p.resolve() for p in inputs}

    def work(src: Path, targets: list[Path]) -> None:
        loaded: LoadedImage = read_image(src, max_pixels=args.max_pixels)
        a8 = alpha_to_u8(masker.predict(loaded.rgb))
        for target in targets:
            if args.cutout and target == plan[src][1]:
                write_image(target, np.dstack([loaded.rgb, a8]), overwrite=args.overwrite, protected=protected, icc=loaded.icc)
            else:
                write_image(target, a8, overwrite=args.overwrite, protected=protected)
            log.info("%s -> %s", src, target)

    return _run_batch(plan, report, args.progress or sys.stderr.isatty(), args.overwrite, work)


def cmd_export(args: argparse.Namespace) -> int:
    given = {dest: getattr(args, dest) for _, _, dest in SOURCE_OPTIONS if getattr(args, dest) is not None}
    sources = _with_defaults(given, need_inpaint=True, need_rmbg=True)
    manifest = _export(sources, Path(args.out), args.precision, args.opset, args.offline, args.allow_pickle, args.force, args.fused_step, args.device_graphs)
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
    if args.cpu_fast or args.rmbg_int8:
        if backend != "ort" or provider != "cpu":
            raise UsageError("--cpu-fast and --rmbg-int8 build for ONNX Runtime on the CPU: use --backend ort --provider cpu")
        return _build_cpu_fast(args)
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


def _build_cpu_fast(args: argparse.Namespace) -> int:
    """The benchmark's CPU fast path: fused attention/LayerNorm graphs, optionally a static-int8 RMBG."""
    from trt_bgswap.engines.optimize import build_cpu_fast
    from trt_bgswap.runtime.image_io import read_image

    images = []
    if args.rmbg_int8:
        if not args.calibration:
            raise UsageError("--rmbg-int8 needs --calibration DIR: a folder of a few typical photos to calibrate on")
        paths, problems = collect_inputs([args.calibration], recursive=False)
        if problems or not paths:
            raise UsageError(f"--calibration {args.calibration}: no readable photos there")
        images = [read_image(p).rgb for p in paths]
    build_cpu_fast(Path(args.dir), rmbg_int8=args.rmbg_int8, calibration_images=images, size=args.size[0] if args.size else None)
    log.info("CPU fast path built in %s", Path(args.dir) / "engines")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from trt_bgswap.info import info_text

    sys.stdout.write(info_text() + "\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from trt_bgswap.bench import run_bench

    return run_bench(args)


# --- model folders: exported, or exported now from the sources given ---


def _source_value(value: str | None) -> str | None:
    return None if value is None or value.strip().lower() == NONE else value


def _export(
    sources: dict[str, str | None],
    out: Path,
    precision: str,
    opset: int,
    offline: bool,
    allow_pickle: bool,
    overwrite: bool,
    fused_step: bool = False,
    device_graphs: bool = False,
) -> "Manifest":
    """Resolve the sources (local paths, hub ids, registry names; 'none' leaves one out) and export them to ``out``."""
    from trt_bgswap.export.exporter import export_models
    from trt_bgswap.export.sources import resolve_source

    values = {dest: _source_value(sources.get(dest)) for _, _, dest in SOURCE_OPTIONS}
    if values["inpaint"] is None and values["lcm_lora"] is not None:  # checked before anything is downloaded
        raise UsageError("--lcm-lora is fused into the inpainting model: give --inpaint SRC too, or --lcm-lora none")
    if values["inpaint"] is None and values["rmbg"] is None:
        raise UsageError("nothing to export: give --inpaint SRC, --rmbg SRC or both (a local folder, a hub id or a registry name)")
    resolved: dict[str, Path | None] = {}
    for family, _, dest in SOURCE_OPTIONS:
        value = values[dest]
        resolved[dest] = None if value is None else resolve_source(value, family=family, offline=offline, allow_pickle=allow_pickle)
    return export_models(
        resolved["inpaint"], resolved["lcm_lora"], resolved["rmbg"], out, precision=precision, opset=opset, overwrite=overwrite, fused_step=fused_step,
        device_graphs=device_graphs,
    )


def _with_defaults(given: dict[str, str], need_inpaint: bool, need_rmbg: bool) -> dict[str, str]:
    """A model not named is the registry default, unless the job has no use for it (the LCM-LoRA goes with inpainting)."""
    sources = dict(given)
    sources.setdefault("inpaint", DEFAULT_SOURCES["inpaint"] if need_inpaint else NONE)
    sources.setdefault("lcm_lora", NONE if _source_value(sources["inpaint"]) is None else DEFAULT_SOURCES["lcm_lora"])
    sources.setdefault("rmbg", DEFAULT_SOURCES["rmbg"] if need_rmbg else NONE)
    return sources


def _recorded_matches(value: str, recorded: dict[str, object] | None) -> bool:
    """Whether a source given on the command line is the one an export was made from."""
    if recorded is None:
        return False
    path = Path(str(recorded.get("path", "")))
    local = Path(value).expanduser()
    if local.exists():
        given = local.resolve()
        return path == given or given in path.parents
    from trt_bgswap.registry import VARIANTS

    base = value.partition("@")[0]
    repo_id = VARIANTS[base].repo_id if base in VARIANTS else base
    return f"models--{repo_id.replace('/', '--')}" in path.parts


def _models_for_run(args: argparse.Namespace) -> Path:
    """The exported folder `run` loads: --models or the per-user default, exported now if sources are given and it holds none."""
    from trt_bgswap.paths import default_export_dir

    folder = Path(args.models).expanduser() if args.models else default_export_dir()
    given = {dest: getattr(args, dest) for _, _, dest in SOURCE_OPTIONS if getattr(args, dest) is not None}
    if (folder / "manifest.json").is_file():
        if given:
            from trt_bgswap.manifest import Manifest

            recorded = Manifest.load(folder).sources
            for family, option, dest in SOURCE_OPTIONS:
                value = _source_value(given.get(dest))
                if value is not None and not _recorded_matches(value, recorded.get(family)):
                    was = (recorded.get(family) or {}).get("path", "nothing")
                    raise UsageError(
                        f"{folder} already holds models exported from {was} for {option}, not {value}; "
                        f"pass --models NEWDIR to export these sources there, or delete {folder} to re-export"
                    )
        log.info("using the exported models in %s", folder)
        return folder
    if not given:
        raise UsageError(
            f"{folder} holds no exported models; make them with `trt-bgswap export --out {folder}` (hub ids or local folders), "
            f"give `run` the sources (--inpaint/--lcm-lora/--rmbg) to export them there now, "
            f"or `trt-bgswap tiny-models DIR` and export those for an offline smoke test"
        )
    if folder.exists() and any(folder.iterdir()):
        raise UsageError(f"--models {folder}: the folder is not empty and holds no export (no manifest.json); give an empty or new folder")
    sources = _with_defaults(given, need_inpaint=args.bg_color is None, need_rmbg=args.mask is None)
    log.info("no exported models in %s yet: exporting them once (later runs reuse them)", folder)
    if folder.exists():
        folder.rmdir()  # empty: the exporter moves its finished folder into place
    _export(sources, folder, "fp32", args.opset, args.offline, args.allow_pickle, overwrite=False)
    return folder


def _load_masker(src: str | None, provider: str, threads: int) -> "Masker":
    from trt_bgswap.runtime.masker import Masker

    if src is None:
        from trt_bgswap.paths import default_export_dir

        folder = default_export_dir()
        if not (folder / "manifest.json").is_file():
            raise UsageError(f"no --rmbg given and {folder} holds no exported models; give --rmbg SRC (an .onnx file, a folder or a hub id)")
        src = str(folder)
    p = Path(src)
    if p.is_file() and p.suffix.lower() == ".onnx":
        return Masker.from_onnx(p, provider=provider, intra_op_threads=threads)
    if (p / "manifest.json").is_file():
        from trt_bgswap.manifest import Manifest

        return Masker.from_export(p, Manifest.load(p), provider=provider, intra_op_threads=threads)
    if p.is_dir() and (p / "onnx" / "model.onnx").is_file():
        return Masker.from_onnx(p / "onnx" / "model.onnx", provider=provider, intra_op_threads=threads)
    if p.is_dir():
        raise UsageError(f"--rmbg {src}: no RMBG ONNX model here; give an .onnx file, an exported folder, or a folder with onnx/model.onnx")
    if p.exists():
        raise UsageError(f"--rmbg {src}: not an ONNX file; give an .onnx file, an exported folder or a hub id")
    from trt_bgswap.export.sources import resolve_source

    folder = resolve_source(src, family="rmbg")
    return _load_masker(str(folder), provider, threads)


def _mask_for(mask_arg: str, src: Path, n_inputs: int) -> Path:
    m = Path(mask_arg)
    if m.is_dir():
        candidates = sorted((c for c in m.iterdir() if c.stem == src.stem and c.suffix.lower() in IMAGE_SUFFIXES), key=lambda c: (c.suffix.lower() != ".png", c.name))
        if not candidates:
            raise UsageError(f"{src}: no mask named {src.stem}.* in {m}; masks in a folder are matched by file name")
        return candidates[0]
    if n_inputs > 1:
        raise UsageError(f"--mask {mask_arg}: with several inputs give a folder of masks named like the inputs")
    return m


def _side_path(arg: str, src: Path, n_inputs: int, suffix: str) -> Path:
    p = Path(arg)
    if n_inputs == 1 and p.suffix.lower() in OUTPUT_SUFFIXES:
        return p
    return p / f"{src.stem}{suffix}"


def _write_side(path: Path, image: object, overwrite: bool, protected: set[Path], icc: bytes | None) -> None:
    """A mask or cut-out beside the result; an existing one is kept unless --overwrite."""
    from trt_bgswap.runtime.image_io import write_image

    try:
        write_image(path, image, overwrite=overwrite, protected=protected, icc=icc)  # type: ignore[arg-type]
    except OutputExistsError:
        log.info("%s exists; kept (--overwrite to replace it)", path)


# --- the parser ---


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to look, exit code 2."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _source_args(sp: argparse.ArgumentParser, defaults: bool) -> None:
    """The model-source options of `export` (and of `run`, which exports when no exported folder exists yet)."""
    for family, option, dest in SOURCE_OPTIONS:
        what = {"sd-inpainting": "SD1.5 inpainting diffusers folder", "lcm-lora": "LCM-LoRA safetensors (file or folder)", "rmbg": "RMBG ONNX file or safetensors folder"}[family]
        sp.add_argument(option, dest=dest, help=f"{what}, hub id (org/name[@rev]) or registry name; '{NONE}' to leave it out" + (f" (default {DEFAULT_SOURCES[dest]})" if defaults else "; exported once into --models (or the per-user cache) when that holds no export yet"))
    sp.add_argument("--opset", type=_int_range("--opset", 14, 21), default=17, help="ONNX opset of the export")
    sp.add_argument("--offline", action="store_true", help="use only the local hub cache (also HF_HUB_OFFLINE=1)")
    sp.add_argument("--allow-pickle", action="store_true", help="accept pickled checkpoints (.bin/.ckpt) from a source you trust")


def build_parser() -> argparse.ArgumentParser:
    from trt_bgswap.runtime.ort_backend import PROVIDER_CHOICES

    p = _Parser(prog="trt-bgswap", description="AI background replacement: RMBG mask, LCM inpainting, composite.")
    p.add_argument("--version", action="version", version=f"trt-bgswap {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def common_batch(sp: argparse.ArgumentParser, providers: Sequence[str]) -> None:
        sp.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, folders or globs")
        sp.add_argument("--recursive", action="store_true", help="look into sub-folders of folder inputs")
        sp.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist (default: skip them)")
        sp.add_argument("--provider", choices=providers, default="auto", help="auto (TensorRT engines, then ONNX Runtime CUDA, then CPU), trt, tensorrt/cuda (ONNX Runtime providers) or cpu")
        sp.add_argument("--threads", type=_int_range("--threads", 0, 256), default=0, help="intra-op threads (0: all cores)")
        sp.add_argument("--max-pixels", type=_int_range("--max-pixels", 1, 2**40), default=None, help="refuse larger images (decompression-bomb guard; default 2**26)")
        sp.add_argument("--progress", action="store_true", help="show the progress line even when stderr is not a terminal")

    r = sub.add_parser("run", help="replace the background of images")
    common_batch(r, (*PROVIDER_CHOICES, "trt"))
    r.add_argument("--models", help="exported model folder (default: the per-user cache)")
    r.add_argument("--prompt", help="what the new background shows")
    r.add_argument("--negative-prompt", default="", help="what it should not show (used when --guidance > 1)")
    r.add_argument("-o", "--output", help="output file (one input) or folder (default: <stem>_bgswap.png beside each input)")
    r.add_argument("--format", choices=["png", "jpg", "webp"], help="output format for folder outputs (default png)")
    r.add_argument("--quality", type=_int_range("--quality", 1, 100), default=95, help="JPEG/WebP quality")
    r.add_argument("--seed", type=_int_range("--seed", 0, 2**63 - 1), help="random seed (same seed, same image)")
    r.add_argument("--steps", type=_int_range("--steps", 1, 50), default=4, help="LCM steps (2-8 are useful)")
    r.add_argument("--guidance", type=_float_range("--guidance", 0.0, 30.0), default=1.0, help="classifier-free guidance (1: off)")
    r.add_argument("--num-results", type=_int_range("--num-results", 1, 64), default=1, help="results per image, seeds seed, seed+1, ...")
    r.add_argument("--size", type=parse_size, help="generation size WxH, multiples of the model's (64 for SD1.5) (default: ~512^2 at the image's aspect)")
    r.add_argument("--bg-color", type=_color, help="a solid background instead of a generated one: '#RRGGBB', '#RGB' or a name")
    r.add_argument("--mask", help="your own subject mask (white = keep) instead of RMBG: a file, or a folder of <stem>.png")
    r.add_argument("--save-mask", help="also write the alpha mask (a file for one input, else a folder)")
    r.add_argument("--save-cutout", help="also write the RGBA cut-out (a file for one input, else a folder)")
    r.add_argument("--threshold", type=_float_range("--threshold", 0.0, 1.0), help="binarise the subject mask at this level (between 0 and 1)")
    r.add_argument("--grow", type=_int_range("--grow", -512, 512), default=0, help="grow (or with a negative value shrink) the subject, pixels")
    r.add_argument("--feather", type=_float_range("--feather", 0.0, 256.0), default=0.0, help="soften the mask edge, pixels")
    r.add_argument("--band", type=_int_range("--band", 0, 512), default=8, help="how far the repainted area reaches into the subject, pixels")
    _source_args(r, defaults=False)
    r.set_defaults(func=cmd_run)

    m = sub.add_parser("mask", help="subject masks only (no diffusion)")
    common_batch(m, PROVIDER_CHOICES)
    m.add_argument("--rmbg", help="an RMBG .onnx file, an exported folder, an RMBG model folder or a hub id (default: the per-user export)")
    m.add_argument("-o", "--output", required=True, help="output folder for <stem>.png masks")
    m.add_argument("--cutout", action="store_true", help="also write <stem>_cutout.png RGBA cut-outs")
    m.set_defaults(func=cmd_mask)

    e = sub.add_parser("export", help="PyTorch models -> ONNX folder (needs the export extra)")
    _source_args(e, defaults=True)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    e.add_argument("--force", action="store_true", help="replace an existing exported folder")
    e.add_argument("--fused-step", action="store_true", help="also export unet_step/: UNet + guidance + LCM step in one graph (the TensorRT device loop runs it)")
    e.add_argument(
        "--device-graphs",
        action="store_true",
        help="also export vae_encoder_sample/, vae_decoder_image/, rmbg_full/: the VAE and RMBG with their pre/post-processing inside (TensorRT keeps data on the GPU)",
    )
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
    b.add_argument("--cpu-fast", action="store_true", help="CPU: also fuse attention/LayerNorm with ONNX Runtime's transformer optimizer (parity-checked)")
    b.add_argument("--rmbg-int8", action="store_true", help="CPU: static-int8 (QDQ) RMBG, about 2x faster; needs --calibration")
    b.add_argument("--calibration", help="folder of typical photos for --rmbg-int8 calibration")
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # bad options (exit 2, one line already written), --help, --version
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # Our own handler on our logger, bound to this call's stderr (no basicConfig: it is once per process
    # and would keep writing to the first caller's stream when main() is called in-process).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s"))
    saved_level = log.level
    log.addHandler(handler)
    log.setLevel(level)
    try:
        return int(args.func(args) or 0)
    except BgSwapError as e:
        if args.verbose:
            log.debug("traceback", exc_info=True)
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    finally:
        log.removeHandler(handler)
        log.setLevel(saved_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
