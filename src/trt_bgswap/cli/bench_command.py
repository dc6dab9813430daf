"""`trt-bgswap bench`: where the time goes, side by side with the PyTorch baseline, in one run.

One of the CLI's command modules (:mod:`trt_bgswap.cli.main` lists them); the work is done
by :mod:`trt_bgswap.benchmarking.suite` (imported only when the command runs, so the CLI
stays light). ``--mode tiny`` (the default) runs in seconds on tiny random models and is
what the test suite checks; ``--mode full`` builds the published architectures with random
weights (no downloads) and takes about half an hour on a 2-core CPU. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from trt_bgswap.benchmarking import CACHE_CONDITIONS, DEFAULT_CACHE


log = logging.getLogger(__name__)

DEFAULT_WORK = "bench-work"


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-sizes {text!r}: write comma-separated integers, e.g. 1,2") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--batch-sizes {text!r}: sizes must be positive, e.g. 1,2")
    return sizes


def _count(name: str, lo: int):  # noqa: ANN202 - argparse type factory
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{name}={v}: must be at least {lo}")
        return v

    return parse


NAME = "bench"
HELP = "benchmark every stage against the PyTorch baseline (latency, memory, FLOPs, cold start)"


def add_arguments(b: argparse.ArgumentParser) -> None:
    """The ``bench`` sub-command and its documented options."""
    b.description = (
        "Time every stage of the pipeline (RMBG, text encoder, VAE encode, each UNet step, VAE decode, "
        "pre/post-processing and composite, pipeline overhead) and end to end, with warm-up then "
        "min/median/p90; batch throughput; peak RSS; cold start of `trt-bgswap run`; engine build time; "
        "FLOPs per stage from the ONNX graphs and the compute rate against the measured matmul peak; "
        "the same work done by diffusers + PyTorch in the same run. Writes <mode>.json and <mode>.md. "
        "Random weights give real timings (the models have their published sizes)."
    )
    b.epilog = (
        "Full-size run documented in benchmarks/README.md: "
        "trt-bgswap bench --mode full --work /tmp/bench --out benchmarks/results --readme benchmarks/README.md. "
        "On a GPU machine add --backend trt (TensorRT plans; needs the trt extra)."
    )
    b.add_argument("--mode", choices=["tiny", "full"], default="tiny", help="tiny random models (seconds) or the published full sizes (~30 min on 2 cores)")
    b.add_argument("--family", choices=["sd15", "sdxl"], default="sd15", help="model family: SD1.5 inpainting (512 px) or SDXL inpainting (1024 px, two text encoders); results go to <mode>[-family].json")
    b.add_argument("--work", default=DEFAULT_WORK, help=f"folder for models, export, engines and logs (reused across runs; default ./{DEFAULT_WORK})")
    b.add_argument("--out", help="folder for <mode>.json and <mode>.md (default: the work folder)")
    b.add_argument("--readme", help="Markdown file whose '<!-- bench:results:start -->' block gets the results table")
    b.add_argument("--sources", help="use these models instead: a folder with sd-inpainting/, lcm-lora/ and rmbg/")
    b.add_argument("--export", help="use this exported folder (copied into the work folder) instead of exporting")
    b.add_argument("--backend", choices=["cpu", "trt"], default="cpu", help="cpu: ONNX Runtime CPU fast path; trt: TensorRT plans on a GPU")
    b.add_argument("--warmup", type=_count("--warmup", 0), default=1, help="untimed runs first (default 1)")
    b.add_argument("--runs", type=_count("--runs", 1), default=3, help="timed runs; min/median/p90 over them (default 3)")
    b.add_argument("--threads", type=_count("--threads", 0), default=0, help="threads for both sides (0: all usable cores)")
    b.add_argument("--steps", type=_count("--steps", 1), default=4, help="LCM steps (default 4)")
    b.add_argument("--guidance", type=float, default=1.0, help="guidance scale (default 1.0: no classifier-free guidance)")
    b.add_argument("--prompt", default="a sunny beach at golden hour, photo", help="prompt (a run number is appended so prompts never repeat)")
    b.add_argument("--photo", default="astronaut", help="input photo: a skimage.data sample name or an image file (default astronaut, 512x512)")
    b.add_argument("--batch-sizes", type=_batch_sizes, default=(1, 2), help="batch sizes for RMBG/UNet throughput (default 1,2)")
    b.add_argument("--no-fuse", action="store_true", help="skip the transformer-optimizer fusions (attention, LayerNorm)")
    b.add_argument("--no-int8-rmbg", action="store_true", help="run RMBG in fp32 instead of static int8")
    b.add_argument("--no-baseline", action="store_true", help="skip the diffusers/PyTorch baseline")
    b.add_argument("--no-cold-start", action="store_true", help="skip the cold-start subprocess runs")
    b.add_argument("--cold-runs", type=int, default=3, help="cold starts per side, interleaved with the other side's; the median is reported (default 3)")
    b.add_argument(
        "--cold-cache", choices=CACHE_CONDITIONS, default=DEFAULT_CACHE,
        help=f"what the OS file cache holds at each cold start: primed by an untimed run of the same command just before, evicted (a first launch after boot), or as-found (as the run left it); default {DEFAULT_CACHE}",
    )  # fmt: skip
    b.add_argument("--no-low-memory", action="store_true", help="skip the --low-memory rows (its own worker and cold run)")
    b.add_argument("--no-vae-tiny", action="store_true", help="skip the --vae tiny rows (ours and diffusers with the same tiny autoencoder)")
    b.add_argument("--note", default="", help="a remark recorded with the machine (e.g. 'other processes were running')")


def command_line(args: argparse.Namespace) -> str:
    """The `trt-bgswap bench ...` command that reproduces these options."""
    parts = ["trt-bgswap", "bench", "--mode", args.mode, *(["--family", args.family] if args.family != "sd15" else []), "--work", args.work]
    for opt, dest in (("--out", "out"), ("--readme", "readme"), ("--sources", "sources"), ("--export", "export")):
        if getattr(args, dest):
            parts += [opt, str(getattr(args, dest))]
    if args.backend != "cpu":
        parts += ["--backend", args.backend]
    parts += ["--warmup", str(args.warmup), "--runs", str(args.runs), "--threads", str(args.threads)]
    if args.steps != 4:
        parts += ["--steps", str(args.steps)]
    if args.guidance != 1.0:
        parts += ["--guidance", str(args.guidance)]
    if args.cold_runs != 3:
        parts += ["--cold-runs", str(args.cold_runs)]
    if args.cold_cache != DEFAULT_CACHE:
        parts += ["--cold-cache", args.cold_cache]
    if tuple(args.batch_sizes) != (1, 2):
        parts += ["--batch-sizes", ",".join(str(x) for x in args.batch_sizes)]
    for flag in ("no_fuse", "no_int8_rmbg", "no_baseline", "no_cold_start", "no_low_memory", "no_vae_tiny"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    if args.note:
        parts += ["--note", args.note]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the options describe; the report goes to files and the log."""
    from trt_bgswap.benchmarking.suite import BenchSettings, run_suite

    settings = BenchSettings(
        mode=args.mode,
        family=args.family,
        work_dir=Path(args.work),
        out_dir=Path(args.out) if args.out else None,
        sources=Path(args.sources) if args.sources else None,
        export_dir=Path(args.export) if args.export else None,
        warmup=args.warmup,
        runs=args.runs,
        threads=args.threads,
        steps=args.steps,
        guidance=args.guidance,
        prompt=args.prompt,
        photo=args.photo,
        batch_sizes=tuple(args.batch_sizes),
        backend=args.backend,
        fuse=not args.no_fuse,
        int8_rmbg=not args.no_int8_rmbg,
        baseline=not args.no_baseline,
        cold_start=not args.no_cold_start,
        cold_runs=args.cold_runs,
        cold_cache=args.cold_cache,
        low_memory=not args.no_low_memory,
        vae_tiny=not args.no_vae_tiny,
        readme=Path(args.readme) if args.readme else None,
        command=command_line(args),
        note=args.note,
    )
    report = run_suite(settings)
    for t in report["targets"]:
        state = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
        log.info("target %s (%s): %s", t["name"], t["target"], state)
    log.info("results: %s and %s", report["_paths"]["json"], report["_paths"]["markdown"])
    return 0
