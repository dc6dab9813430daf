"""`trt-bgswap build DIR`: an exported folder -> engines (TensorRT plans or pre-optimized ONNX Runtime graphs)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from trt_bgswap.cli.options import int_range, parse_size
from trt_bgswap.errors import UsageError

log = logging.getLogger("trt_bgswap")

NAME = "build"
HELP = "exported folder -> engines (TensorRT plans or pre-optimized ONNX Runtime graphs)"


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("dir")
    b.add_argument("--backend", choices=["ort", "trt"], default="ort", help="ort: pre-optimized ONNX Runtime graphs (+ EP caches); trt: TensorRT plans")
    b.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"], default="cpu", help="for --backend ort: the ONNX Runtime provider to build for")
    b.add_argument("--precision", choices=["fp16", "fp32"], default="fp16",
                   help="TensorRT plan precision: strongly typed; fp16 converts fp32 graphs to fp16 with fp32 islands (the VAE keeps its export's precision)")
    b.add_argument("--weak-fp16", action="store_true", help="TensorRT 10.x only: the deprecated weakly typed FP16 build (TensorRT picks each layer's precision)")
    b.add_argument("--size", type=parse_size, action="append", help="generation size WxH (repeatable)")
    b.add_argument("--dynamic", help="dynamic size range MIN..MAX, e.g. 256..768")
    b.add_argument("--opt-level", type=int_range("--opt-level", 0, 5), default=3, help="TensorRT builder optimization level")
    b.add_argument("--cpu-fast", action="store_true", help="CPU: also fuse attention/LayerNorm with ONNX Runtime's transformer optimizer (parity-checked)")
    b.add_argument("--rmbg-int8", action="store_true", help="CPU: static-int8 (QDQ) RMBG, about 2x faster; needs --calibration")
    b.add_argument("--calibration", help="folder of typical photos for --rmbg-int8 calibration")


def run(args: argparse.Namespace) -> int:
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
        weak_fp16=args.weak_fp16,
    )
    log.info("engines in %s (%d rebuilt, %d reused)", report.out_dir, len(report.rebuilt), len(report.models) - len(report.rebuilt))
    return 0


def _build_cpu_fast(args: argparse.Namespace) -> int:
    """The benchmark's CPU fast path: fused attention/LayerNorm graphs, optionally a static-int8 RMBG."""
    from trt_bgswap.cli.batch import collect_inputs
    from trt_bgswap.engines.cpu_fast import build_cpu_fast
    from trt_bgswap.runtime.image_read import read_image

    images = []
    if args.rmbg_int8:
        if not args.calibration:
            raise UsageError("--rmbg-int8 needs --calibration DIR: a folder of a few typical photos to calibrate on")
        inputs, problems = collect_inputs([args.calibration], recursive=False)
        if problems or not inputs:
            raise UsageError(f"--calibration {args.calibration}: no readable photos there")
        images = [read_image(i.path).rgb for i in inputs]
    build_cpu_fast(Path(args.dir), rmbg_int8=args.rmbg_int8, calibration_images=images, size=args.size[0] if args.size else None)
    log.info("CPU fast path built in %s", Path(args.dir) / "engines")
    return 0
