"""Batch planning for `run` and `mask`: inputs, where every output goes, what is left to do, and the loop.

Everything a batch can know before a model is loaded is decided here first, so bad input
costs no waiting and loses nothing:

1. inputs are collected (files, folders, globs; hidden files skipped) and probed (header
   read, size and decompression-bomb checks) - an unreadable photo is reported now;
2. every output file is planned: results, the saved mask, the cut-out; formats are checked
   (a cut-out needs alpha: PNG or WebP), ``--recursive`` mirrors the input tree under ``-o``,
   name clashes are resolved or refused, no output may be an input;
3. each output is skipped or redone on its own (``--overwrite``), so asking for a side
   output on a rerun makes just that file;
4. output folders must be writable and their file systems must hold the batch's estimate.

Only then do models load, and only if some job is left.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trt_bgswap.atomic import existing_ancestor
from trt_bgswap.errors import BackendUnavailable, BgSwapError, ModelError, OutputError, OutputExistsError, UsageError
from trt_bgswap.runtime.image_read import IMAGE_SUFFIXES, ImageInfo, probe_image
from trt_bgswap.runtime.image_write import ALPHA_SUFFIXES, OUTPUT_FORMATS

log = logging.getLogger("trt_bgswap")

RESULT, MASK, CUTOUT = "result", "mask", "cutout"
# Bytes a written file may take, per pixel, at most (PNG of noise barely compresses); for the free-space check.
BYTES_PER_PIXEL = {RESULT: 3.1, MASK: 1.1, CUTOUT: 4.1}


@dataclass(frozen=True)
class Input:
    """One input file and the relative path its outputs take under an output folder."""

    path: Path
    rel: Path  # the file name, or its path below a folder input when --recursive mirrors the tree


@dataclass(frozen=True)
class Target:
    """One output file: a result (``index``: which of --num-results), the saved mask or the cut-out."""

    path: Path
    kind: str
    index: int = 0


@dataclass
class Job:
    """An input with its planned outputs and, after probing, what its header says."""

    src: Input
    targets: list[Target]
    info: ImageInfo | None = None
    todo: list[Target] = field(default_factory=list)  # the targets this run writes


def collect_inputs(items: Sequence[str], recursive: bool) -> tuple[list[Input], list[tuple[str, str]]]:
    """Files, folders and globs -> inputs (sorted, unique) and (item, problem) for those that match nothing."""
    found: dict[Path, Input] = {}
    problems: list[tuple[str, str]] = []
    for item in items:
        p = Path(item)
        if any(c in item for c in "*?[") and not p.exists():
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                problems.append((item, "the pattern matches no image files"))
            for f in files:
                found.setdefault(f, Input(f, Path(f.name)))
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
                found.setdefault(f, Input(f, f.relative_to(p)))
        elif p.exists() or p.is_symlink():
            found.setdefault(p, Input(p, Path(p.name)))
        else:
            problems.append((item, "no such file or folder; check the path"))
    return list(found.values()), problems


def _stems(inputs: Sequence[Input]) -> dict[Input, str]:
    """Output stems: the input's stem, or stem-ext where two inputs bound for one folder share a stem (x.jpg, x.png)."""
    by_place: dict[tuple[Path, str], list[Input]] = defaultdict(list)
    for src in inputs:
        by_place[(src.rel.parent, src.rel.stem)].append(src)
    stems: dict[Input, str] = {}
    for (_, stem), group in by_place.items():
        clash = len({s.rel.suffix.lower() for s in group}) > 1
        for src in group:
            stems[src] = f"{stem}-{src.rel.suffix.lower().lstrip('.')}" if clash else stem
        if clash:
            log.info("%s: inputs share the name %r; their outputs are named %s", group[0].rel.parent, stem, ", ".join(sorted(stems[s] for s in group)))
    return stems


def _image_suffix(path: Path, option: str, allowed: Collection[str], why: str) -> None:
    if path.suffix.lower() not in allowed:
        raise UsageError(f"{option} {path}: {why}; use {', '.join(sorted(allowed))}")


def plan_outputs(
    inputs: Sequence[Input],
    out: str | None,
    fmt: str | None,
    result_suffix: str,
    count: int,
    side: dict[str, str | None],
    folder: bool = False,
) -> list[Job]:
    """Every input's output files; refuses ambiguous names and formats that cannot hold what is written.

    ``out``: one input and a name with an image extension is that file, else a folder (None:
    beside each input). ``side``: kind -> the --save-mask/--save-cutout value (a file for one
    input, else a folder). ``--recursive`` inputs keep their sub-folders under ``out``.
    ``folder``: ``out`` is a folder even for one input.
    """
    if not inputs:
        return []
    single = len(inputs) == 1 and not folder
    out_path = Path(out) if out is not None else None
    to_file = single and out_path is not None and out_path.suffix.lower() in IMAGE_SUFFIXES
    if out_path is not None and out_path.suffix.lower() in IMAGE_SUFFIXES:
        if not single:
            raise UsageError(f"-o {out}: several inputs need an output folder, not a file name")
        _image_suffix(out_path, "-o", OUTPUT_FORMATS, "not an output format")
        if fmt is not None and OUTPUT_FORMATS[out_path.suffix.lower()] != OUTPUT_FORMATS["." + fmt]:
            raise UsageError(f"-o {out} names a {out_path.suffix.lower()} file but --format is {fmt}; drop --format or give -o a .{fmt} name")
    ext = "." + (fmt or "png")
    for kind, value in side.items():
        if value is not None and single and Path(value).suffix.lower() in IMAGE_SUFFIXES:
            allowed = ALPHA_SUFFIXES if kind == CUTOUT else frozenset(OUTPUT_FORMATS)
            _image_suffix(Path(value), f"--save-{kind}", allowed, "a cut-out needs an alpha channel" if kind == CUTOUT else "not an output format")
    stems = _stems(inputs)
    jobs: list[Job] = []
    made_by: dict[Path, Input] = {}
    for src in inputs:
        stem = stems[src]
        where = (out_path / src.rel.parent) if out_path is not None else src.path.parent
        if to_file:
            assert out_path is not None
            results = [out_path] if count == 1 else [out_path.with_name(f"{out_path.stem}_{i}{out_path.suffix}") for i in range(count)]
        else:
            base = where / f"{stem}{result_suffix}"
            results = [Path(f"{base}{ext}")] if count == 1 else [Path(f"{base}_{i}{ext}") for i in range(count)]
        targets = [Target(p, RESULT, i) for i, p in enumerate(results)]
        for kind, value in side.items():
            if value is None:
                continue
            p = Path(value)
            targets.append(Target(p if single and p.suffix.lower() in IMAGE_SUFFIXES else p / src.rel.parent / f"{stem}_{kind}.png", kind))
        for t in targets:
            made_by.setdefault(t.path.resolve(), src)
        jobs.append(Job(src, targets))
    # an input that is another input's output is an earlier run's output picked up by a folder or glob: left out
    earlier = [j for j in jobs if made_by.get(j.src.path.resolve(), j.src) != j.src]
    if earlier:
        log.info("left out %d file(s) where this run writes its results, e.g. %s (an earlier run's outputs)", len(earlier), earlier[0].src.path)
    jobs = [j for j in jobs if j not in earlier]
    used: dict[Path, Input] = {}
    for job in jobs:
        for t in job.targets:
            other = used.setdefault(t.path.resolve(), job.src)
            if other != job.src:
                raise UsageError(f"{job.src.path} and {other.path} would both write {t.path}; give them different names or separate runs")
    return jobs


def check_folder(folder: Path) -> None:
    """The folder exists and is writable, or can be made: its nearest existing ancestor is a writable folder."""
    anchor = existing_ancestor(folder)
    if not anchor.is_dir():
        raise OutputError(f"{folder}: {anchor} is not a folder; choose another output path")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: the folder {anchor} is not writable; fix its permissions or choose another output folder")


def check_free_space(jobs: Iterable[Job]) -> None:
    """Refuse a batch whose outputs cannot fit: per file system, the sum of the files' worst-case sizes."""
    need: dict[int, tuple[Path, float]] = {}
    for job in jobs:
        if job.info is None:
            continue
        pixels = job.info.size[0] * job.info.size[1]
        for t in job.todo:
            anchor = existing_ancestor(t.path.parent)
            dev = anchor.stat().st_dev
            where, total = need.get(dev, (anchor, 0.0))
            need[dev] = (where, total + pixels * BYTES_PER_PIXEL[t.kind])
    for where, total in need.values():
        free = shutil.disk_usage(where).free
        if total > free:
            raise OutputError(
                f"{where}: the batch's outputs need up to {total / 2**20:.0f} MiB but only {free / 2**20:.0f} MiB are free there; "
                "free some space or choose another output folder (-o)"
            )


def prepare(jobs: list[Job], overwrite: bool, max_pixels: int | None, report: "BatchReport") -> list[Job]:
    """Probe inputs and check outputs before any model loads; returns the jobs with work left.

    Failures are recorded in ``report`` (and logged); jobs whose every output exists are skipped.
    """
    inputs = {j.src.path.resolve() for j in jobs}
    ready: list[Job] = []
    for job in jobs:
        try:
            for t in job.targets:
                if t.path.resolve() in inputs or (t.path.exists() and any(_same(t.path, i) for i in inputs)):
                    raise OutputError(f"{t.path}: is an input file; trt-bgswap never overwrites inputs, choose another -o")
                if t.path.is_dir():
                    raise OutputError(f"{t.path}: is a folder; give an output file name")
            job.todo = [t for t in job.targets if overwrite or not t.path.exists()]
            if not job.todo:
                report.skipped.append(job.src.path)
                continue
            job.info = probe_image(job.src.path, max_pixels=max_pixels)
            for folder in {t.path.parent for t in job.todo}:
                check_folder(folder)
        except BgSwapError as e:
            report.fail(str(job.src.path), str(e))
            continue
        ready.append(job)
    check_free_space(ready)
    return ready


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@dataclass
class BatchReport:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    tell: Callable[[str], None] = log.debug  # how a failure is announced when it happens (the summary repeats it)

    def fail(self, item: str, why: str) -> None:
        self.failed.append((item, why))
        self.tell(name_in(item, why))

    def summary(self) -> str:
        seconds = time.perf_counter() - self.start
        rate = len(self.done) / seconds if seconds > 0 else 0.0
        return (
            f"{len(self.done)} done, {len(self.skipped)} skipped (outputs exist; --overwrite to redo), "
            f"{len(self.failed)} failed in {seconds:.1f} s ({rate:.2f} img/s)"
        )


def name_in(item: str, why: str) -> str:
    """The message, prefixed with the file unless it starts with it."""
    return why if why.startswith(item) else f"{item}: {why}"


def finish(report: BatchReport) -> int:
    for item, why in report.failed:
        sys.stderr.write(f"failed: {name_in(item, why)}\n")
    sys.stderr.write(report.summary() + "\n")
    return 1 if report.failed else 0


def run_batch(jobs: list[Job], report: BatchReport, show_progress: bool, work: Callable[[Job], None]) -> int:
    """Process each job; one image's failure is reported and the batch goes on. Returns the exit code.

    The progress bar is tqdm's (it handles terminals, pipes and widths); log lines are routed
    around it so they do not break it.
    """
    report.start = time.perf_counter()  # the summary's rate is the batch's, model loading excluded (as the bar's)
    bar = tqdm(
        total=len(jobs), disable=not show_progress, file=sys.stderr, unit="img", mininterval=0, ascii=not sys.stderr.isatty(), dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]",  # img/s even when slow
    )
    with logging_redirect_tqdm(loggers=[log]), bar:
        for job in jobs:
            status = "ok"
            try:
                work(job)
                report.done.append(job.src.path)
            except OutputExistsError:  # appeared since the check (another process): kept, as without --overwrite
                report.skipped.append(job.src.path)
                status = "skipped"
            except (ModelError, BackendUnavailable):
                raise  # the models are wrong for every image: stop the batch
            except BgSwapError as e:
                report.fail(str(job.src.path), str(e))
                status = "FAILED"
            except Exception as e:  # noqa: BLE001 - a bug on one image must not lose the batch; -v shows the traceback
                log.debug("%s: traceback", job.src.path, exc_info=True)
                report.fail(str(job.src.path), f"internal error ({type(e).__name__}: {' '.join(str(e).split())[:200]}); rerun with -v and report it")
                status = "FAILED"
            bar.set_postfix_str(f"{status} {job.src.path.name}", refresh=False)
            bar.update(1)
    return finish(report)

