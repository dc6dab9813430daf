"""The whole benchmark in one run: models, export, engines, FLOPs, both sides, cold starts, report.

Order matters on a small shared machine: heavy steps run one at a time, each measured side
in its own process (:mod:`trt_bgswap.benchmarking.worker`) so its peak memory and thread
pools are its own, ours first then the baseline, then the cold starts.

Modes: ``tiny`` writes the project's tiny random models (seconds; the test suite runs it
to check the report's structure, never its numbers); ``full`` writes SD1.5-inpainting,
its LCM-LoRA and RMBG-1.4 at their published sizes with random weights
(:mod:`~trt_bgswap.benchmarking.fullsize`). Either can instead use given model folders.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import write_text_atomic
from trt_bgswap.errors import BgSwapError, UsageError
from trt_bgswap.manifest import Manifest
from trt_bgswap.specs import pipeline_dims

from trt_bgswap.benchmarking import CACHE_CONDITIONS, DEFAULT_CACHE
from trt_bgswap.benchmarking import machine
from trt_bgswap.benchmarking.photos import ACCURACY_PHOTOS, CALIBRATION_PHOTOS, load_photo

log = logging.getLogger(__name__)

MODES = ("tiny", "full")
# The benchmark's model family: which source folders of the tiny/full model set play sd-inpainting and lcm-lora.
FAMILY_SOURCES = {"sd15": ("sd-inpainting", "lcm-lora"), "sdxl": ("sdxl-inpainting", "lcm-lora-sdxl")}
BACKENDS = ("cpu", "trt")
WORKER_TIMEOUT_S = 3 * 3600
FUSED_MODELS = ("unet", "text_encoder")  # engines/fusion.py's DEFAULT_FUSED, timed against their unfused export


@dataclass(frozen=True)
class BenchSettings:
    """Everything that decides what is measured; recorded in the report."""

    mode: str = "tiny"
    family: str = "sd15"  # sd15 or sdxl (FAMILY_SOURCES)
    work_dir: Path = Path("bench-work")
    out_dir: Path | None = None  # where <mode>.json / <mode>.md go; None: the work folder
    sources: Path | None = None  # a folder with sd-inpainting/, lcm-lora/, rmbg/ (default: written for the mode)
    export_dir: Path | None = None  # an existing export to copy and use (default: exported here)
    warmup: int = 1
    runs: int = 3
    threads: int = 0  # 0: all usable cores (the same count is given to torch)
    steps: int = 4
    guidance: float = 1.0
    prompt: str = "a sunny beach at golden hour, photo"
    photo: str = "astronaut"  # skimage sample name or an image path; astronaut is 512x512
    batch_sizes: tuple[int, ...] = (1, 2)
    backend: str = "cpu"  # cpu: ONNX Runtime CPU fast path; trt: TensorRT plans (GPU machines)
    fuse: bool = True  # transformer-optimizer fusions for the UNet and text encoder
    int8_rmbg: bool = True  # static int8 RMBG in the timed pipeline (fp32 timed alongside)
    baseline: bool = True
    cold_start: bool = True
    cold_runs: int = 3  # cold starts per side, interleaved; the median is reported
    cold_cache: str = DEFAULT_CACHE  # what the OS file cache holds at each cold start (benchmarking.cold_start)
    low_memory: bool = True  # also time `--low-memory` (its own worker and cold run): its peak and its latency cost
    vae_tiny: bool = True  # also time `--vae tiny`, and diffusers with the same tiny autoencoder (TAESD)
    readme: Path | None = None  # a Markdown file whose results block is replaced
    command: str = ""
    note: str = ""  # e.g. "other processes were running"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.family not in FAMILY_SOURCES:
            raise UsageError(f"--family {self.family!r}: choose one of {', '.join(FAMILY_SOURCES)}")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.runs < 1 or self.warmup < 0:
            raise UsageError(f"--runs {self.runs} / --warmup {self.warmup}: need runs >= 1 and warmup >= 0")
        if self.cold_runs < 1:
            raise UsageError(f"--cold-runs {self.cold_runs}: give 1 or more (or --no-cold-start)")
        if self.cold_cache not in CACHE_CONDITIONS:
            raise UsageError(f"--cold-cache {self.cold_cache!r}: choose one of {', '.join(CACHE_CONDITIONS)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UsageError(f"--batch-sizes {self.batch_sizes}: give positive batch sizes, e.g. 1,2")

    @property
    def name(self) -> str:
        """The run's name: the mode, plus the family when it is not SD1.5 (file and folder names)."""
        return self.mode if self.family == "sd15" else f"{self.mode}-{self.family}"

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class Timeline:
    """Wall time of each preparation step (build times are part of the report)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        log.info("bench: %s ...", name)
        out = fn()
        self.seconds[name] = time.perf_counter() - t0
        log.info("bench: %s done in %.1f s", name, self.seconds[name])
        return out


def _threads(settings: BenchSettings) -> int:
    if settings.threads:
        return settings.threads
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _sources(settings: BenchSettings, timeline: Timeline) -> dict[str, Path]:
    """The sd-inpainting / lcm-lora / rmbg folders of the run (the family's inpainting model and LCM-LoRA)."""
    inpaint, lora = FAMILY_SOURCES[settings.family]
    names = {"sd-inpainting": inpaint, "lcm-lora": lora, "rmbg": "rmbg"}
    if settings.sources is not None:
        paths = {k: settings.sources / n for k, n in names.items()}
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            raise UsageError(f"--sources {settings.sources}: missing {missing}; it needs {', '.join(n + '/' for n in names.values())}")
        if (settings.sources / "taesd").is_dir():  # optional: the --vae tiny rows
            paths["taesd"] = settings.sources / "taesd"
        return paths
    folder = settings.work_dir / f"models-{settings.mode}"
    if settings.mode == "tiny":
        from trt_bgswap.export.tiny import write_tiny_models

        if not all((folder / n).exists() for n in (*names.values(), "taesd")):
            timeline.run("write tiny random models", lambda: write_tiny_models(folder))
        return {**{k: folder / n for k, n in names.items()}, **({"taesd": folder / "taesd"} if settings.family == "sd15" else {})}  # TAESD: SD latents
    from trt_bgswap.benchmarking.fullsize import write_full_models

    written = timeline.run("write full-size random models", lambda: write_full_models(folder, family=settings.family))
    return {**{k: written[n] for k, n in names.items()}, **({"taesd": written["taesd"]} if "taesd" in written else {})}


def _export(settings: BenchSettings, sources: dict[str, Path], timeline: Timeline) -> tuple[Path, bool]:
    target = settings.work_dir / f"export-{settings.name}"
    if settings.export_dir is not None:
        if (target / "manifest.json").is_file():
            shutil.rmtree(target)
        timeline.run("copy the given export", lambda: shutil.copytree(settings.export_dir, target, ignore=shutil.ignore_patterns("engines")))
        return target, True
    if (target / "manifest.json").is_file():
        log.info("bench: reusing the export in %s (delete it to export again)", target)
        return target, True
    from trt_bgswap.export.exporter import export_models

    timeline.run("export to ONNX (fp32, opset 17)", lambda: export_models(sources["sd-inpainting"], sources["lcm-lora"], sources["rmbg"], target))
    return target, False


def _engines(
    settings: BenchSettings, export_dir: Path, manifest: Manifest, threads: int, timeline: Timeline, errors: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, bool]]:
    """Build (or reuse) the engines; returns per-model load plans, what the build did, and which speed-ups applied.

    A fusion that fails its parity check or a quantization that fails is recorded in
    ``errors`` and the build falls back (no fusion, then fp32 RMBG) instead of aborting.
    """
    size = _size(manifest)
    if settings.backend == "trt":
        from trt_bgswap.engines.build import build_engines

        report = timeline.run("build TensorRT plans", lambda: build_engines(export_dir, backend="trt", sizes=[size], batches=settings.batch_sizes))
        plans = {k: {"path": str(m.path), "backend": "trt"} for k, m in report.models.items()}
        return plans, {k: {"cache_hit": m.cache_hit, "kind": "trt"} for k, m in report.models.items()}, {"fuse": False, "int8_rmbg": False}

    from trt_bgswap.engines.cpu_fast import build_cpu_fast
    from trt_bgswap.engines.fusion import DEFAULT_FUSED

    calibration = [load_photo(p) for p in CALIBRATION_PHOTOS] if settings.int8_rmbg else []
    attempts = [(settings.fuse, settings.int8_rmbg), (False, settings.int8_rmbg), (False, False)]
    for fuse, int8 in dict.fromkeys(attempts):
        try:
            report, entries = timeline.run(
                "build the CPU fast path (pre-optimized graphs" + (", fusions" if fuse else "") + (", int8 RMBG" if int8 else "") + ")",
                lambda f=fuse, q=int8: build_cpu_fast(
                    export_dir, fuse=DEFAULT_FUSED if f else (), rmbg_int8=q, calibration_images=calibration, size=size, threads=threads,
                ),
            )  # fmt: skip
            break
        except BgSwapError as e:
            errors.append(f"CPU fast path with fuse={fuse}, int8_rmbg={int8} failed: {e}")
            log.warning("bench: %s", errors[-1])
    else:
        raise BgSwapError("every CPU build failed: " + " | ".join(errors))
    plans = {k: {"path": str(m.path), "graph_optimization": m.graph_optimization or "all", "backend": "ort", "prepack": m.prepack} for k, m in report.models.items()}
    info: dict[str, Any] = {k: {"cache_hit": m.cache_hit, "kind": "ort-optimized", "path": str(m.path)} for k, m in report.models.items()}
    for k, e in entries.items():
        info[k] = {"cache_hit": e.cache_hit, "kind": e.kind, "seconds": e.seconds, "path": str(e.path), **e.details}
    return plans, info, {"fuse": fuse, "int8_rmbg": int8}


def _size(manifest: Manifest) -> tuple[int, int]:
    assert manifest.inpaint is not None
    return manifest.inpaint.default_size, manifest.inpaint.default_size


def _stage_dims(manifest: Manifest) -> dict[str, int]:
    assert manifest.inpaint is not None and manifest.rmbg is not None
    width, height = _size(manifest)
    dims = dict(pipeline_dims(1, height, width, manifest.inpaint.vae_scale_factor))
    dims["S"] = manifest.rmbg.input_size[0]
    return dims


def _flops(export_dir: Path, manifest: Manifest, timeline: Timeline) -> dict[str, Any]:
    from trt_bgswap.benchmarking.flops import count_flops

    dims = _stage_dims(manifest)
    out: dict[str, Any] = {}
    for name, entry in manifest.models.items():
        shapes = {t.name: [d if isinstance(d, int) else dims[d] for d in t.shape] for t in entry.spec.inputs}
        out[name] = timeline.run(f"count FLOPs of {name}", lambda p=manifest.model_path(export_dir, name), s=shapes: count_flops(p, s)).to_json()
        out[name]["shapes"] = shapes
    return out


def _worker(side: str, job: dict[str, Any], work: Path, name: str | None = None) -> dict[str, Any]:
    name = name or side
    job_path, out_path, log_path = work / f"job-{name}.json", work / f"result-{name}.json", work / f"worker-{name}.log"
    write_text_atomic(job_path, json.dumps(job, indent=2) + "\n")
    if out_path.exists():
        out_path.unlink()
    with open(log_path, "wb") as logf:
        proc = subprocess.run(
            [sys.executable, "-m", "trt_bgswap.benchmarking.worker", side, str(job_path), str(out_path)],
            stdout=logf, stderr=subprocess.STDOUT, timeout=WORKER_TIMEOUT_S, check=False,
        )  # fmt: skip
    if proc.returncode != 0 or not out_path.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise BgSwapError(f"the {name} benchmark worker failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return json.loads(out_path.read_text(encoding="utf-8"))


def _variants(
    settings: BenchSettings, sources: dict[str, Path], export_dir: Path, job_ours: dict[str, Any], job_base: dict[str, Any] | None,
    work: Path, timeline: Timeline, errors: list[str],
) -> dict[str, Any]:
    """Issue 15's rows, each in its own worker: ``--low-memory``; ``--vae tiny``; diffusers with the same tiny autoencoder.

    The ``--vae tiny`` export shares every other graph (and their built engines) with the default one:
    only the VAE graphs differ (:func:`trt_bgswap.export.exporter.with_tiny_vae`).
    """
    rows: dict[str, Any] = {}
    lean = {"extras": False}  # the variants skip the batch-throughput, int8 and fusion comparisons (the default row has them)
    runs: dict[str, Any] = {}
    if settings.low_memory:
        runs["ours_low_memory"] = ("ours", {**job_ours, **lean, "low_memory": True})
    if settings.vae_tiny:
        if "taesd" not in sources:
            errors.append(f"no taesd/ beside the sources in {settings.sources}: the --vae tiny rows were not run")
        else:
            from trt_bgswap.export.exporter import with_tiny_vae

            target = settings.work_dir / f"export-{settings.mode}-vae-tiny"
            timeline.run("export --vae tiny (the tiny autoencoder's VAE graphs, the rest copied)", lambda: with_tiny_vae(export_dir, sources["taesd"], target))
            engines = dict(job_ours["engines"])
            for name in ("vae_encoder", "vae_decoder"):
                engines[name] = {"path": str(target / name / "model.onnx"), "graph_optimization": "all", "backend": "ort"}
            runs["ours_vae_tiny"] = ("ours", {**job_ours, **lean, "export_dir": str(target), "engines": engines})
            if job_base is not None:
                runs["baseline_vae_tiny"] = ("baseline", {**job_base, "taesd": str(sources["taesd"])})
    for name, (side, job) in runs.items():
        try:
            rows[name] = timeline.run(f"time {name.replace('_', ' ')}", lambda s=side, j=job, n=name: _worker(s, j, work, name=n))
        except BgSwapError as e:
            errors.append(str(e))
            log.warning("bench: %s", e)
    return rows


def _unfused_fits(settings: BenchSettings, errors: list[str]) -> bool:
    """The fused-vs-unfused comparison opens a second UNet session beside the pipeline's: skipped, and said, when that will not fit."""
    if settings.mode != "full":
        return True
    from trt_bgswap.benchmarking.memory_plan import fits_second_copy

    if fits_second_copy(settings.family):
        return True
    errors.append(f"fused vs unfused comparison skipped: a second {settings.family} UNet session beside the pipeline would not fit in memory")
    log.warning("bench: %s", errors[-1])
    return False


def run_suite(settings: BenchSettings) -> dict[str, Any]:
    """Run everything ``settings`` asks for; writes ``<mode>.json`` and ``<mode>.md``; returns the report."""
    from trt_bgswap.benchmarking.report import build_report, render_markdown, update_readme

    settings.validate()
    work = settings.work_dir
    work.mkdir(parents=True, exist_ok=True)
    threads = _threads(settings)
    timeline = Timeline()
    started = time.time()
    load_before = machine.load_average()
    info = machine.machine_info()

    if settings.mode == "full":
        from trt_bgswap.benchmarking.memory_plan import check_memory_plan

        # refuses, before any work, a run the machine cannot hold (given models / an export skip those steps)
        check_memory_plan(settings.family, settings.batch_sizes, written=settings.sources is not None, exported=settings.export_dir is not None)
    sources = _sources(settings, timeline)
    export_dir, reused = _export(settings, sources, timeline)
    manifest = Manifest.load(export_dir)
    if manifest.inpaint is None or manifest.rmbg is None:
        raise UsageError(f"{export_dir}: the benchmark needs both the inpainting models and RMBG in the export")
    errors: list[str] = []
    plans, build_info, applied = _engines(settings, export_dir, manifest, threads, timeline, errors)
    flops = _flops(export_dir, manifest, timeline)
    peak = timeline.run("measure the matmul peak", lambda: machine.matmul_peak(threads, n=1024 if settings.mode == "tiny" else 2048))

    size = _size(manifest)
    common = {
        "threads": threads, "warmup": settings.warmup, "runs": settings.runs, "steps": settings.steps,
        "guidance": settings.guidance, "size": list(size), "prompt": settings.prompt, "photo": settings.photo,
    }  # fmt: skip
    job_ours = {
        **common, "export_dir": str(export_dir), "engines": plans, "provider": "cpu" if settings.backend == "cpu" else "auto",
        "batch_sizes": list(settings.batch_sizes), "accuracy_photos": list(ACCURACY_PHOTOS),
        "rmbg_fp32": {"path": str(manifest.model_path(export_dir, "rmbg")), "graph_optimization": "all", "backend": "ort"} if applied["int8_rmbg"] else None,
        "unfused": {
            m: {"path": str(manifest.model_path(export_dir, m)), "graph_optimization": "all", "backend": "ort"} for m in FUSED_MODELS
        } if applied["fuse"] and _unfused_fits(settings, errors) else None,
    }  # fmt: skip
    ours = timeline.run("time our pipeline", lambda: _worker("ours", job_ours, work))
    baseline, job_base = None, None
    if settings.baseline:
        job_base = {**common, "sources": {k: str(v) for k, v in sources.items() if k != "taesd"}, "rmbg_size": manifest.rmbg.input_size[0]}
        try:
            baseline = timeline.run("time the PyTorch baseline", lambda: _worker("baseline", job_base, work))
        except BgSwapError as e:
            errors.append(str(e))
            log.warning("bench: %s", e)

    variants = _variants(settings, sources, export_dir, job_ours, job_base, work, timeline, errors)

    cold: dict[str, Any] = {}
    if settings.cold_start:
        from trt_bgswap.benchmarking.cold_start import cold_start_baseline, cold_start_ours, interleaved
        from trt_bgswap.runtime.image_write import write_image

        photo = work / "photo.png"
        write_image(photo, load_photo(settings.photo), overwrite=True)
        args = (photo, work, settings.prompt, settings.steps, settings.guidance, size, threads)
        provider = "cpu" if settings.backend == "cpu" else "trt"
        runs = {
            "ours": ("cold start: trt-bgswap run", lambda: cold_start_ours(export_dir, *args, provider=provider, cache=settings.cold_cache)),
            "baseline": ("cold start: baseline script", lambda: cold_start_baseline(sources, *args, rmbg_size=manifest.rmbg.input_size[0], cache=settings.cold_cache)),
        }
        if settings.low_memory:
            runs["ours_low_memory"] = (
                "cold start: trt-bgswap run --low-memory",
                lambda: cold_start_ours(export_dir, *args, provider=provider, low_memory=True, cache=settings.cold_cache),
            )
        if not settings.baseline:
            runs.pop("baseline")
        rounds = settings.cold_runs

        def timed(label: str, fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
            count = iter(range(1, rounds + 1))
            return lambda: timeline.run(f"{label} ({next(count)}/{rounds})", fn)

        def failed(side: str, e: BgSwapError) -> None:
            errors.append(str(e))
            log.warning("bench: %s", e)

        cold = interleaved({side: timed(label, fn) for side, (label, fn) in runs.items()}, rounds, failed)

    from trt_bgswap.benchmarking.footprint import import_seconds, install_footprint

    footprint = {"install": install_footprint(), "import": import_seconds()}
    report = build_report(
        settings=settings, machine_info=info, threads=threads, load_before=load_before, load_after=machine.load_average(),
        timeline=timeline.seconds, export_reused=reused, build=build_info, flops=flops, peak=peak, ours=ours,
        baseline=baseline, cold=cold, footprint=footprint, started=started, manifest=manifest, applied=applied, errors=errors,
        variants=variants,
    )  # fmt: skip
    out_dir = settings.out_dir or work
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / f"{settings.name}.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    markdown = render_markdown(report)
    write_text_atomic(out_dir / f"{settings.name}.md", markdown)
    if settings.readme is not None:
        update_readme(settings.readme, markdown)
    report["_paths"] = {"json": str(out_dir / f"{settings.name}.json"), "markdown": str(out_dir / f"{settings.name}.md")}
    return report

