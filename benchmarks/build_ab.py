"""Two CPU builds of the same export side by side: one graph alternated in one process, or whole requests per build.

    # the graphs: each model of both builds opened in one process, runs alternated (A, B, A, B, ...)
    python benchmarks/build_ab.py graph --a /tmp/bench-full/export-a --b /tmp/bench-full/export-b --runs 4
    # whole requests: one fresh process per build and round (A, B, A, B), per-engine wall/user/sys/page faults, VmHWM
    python benchmarks/build_ab.py requests --a ... --b ... --rounds 2 --requests 2 --photo /tmp/bench-full/photo.png

Both folders are `trt-bgswap build` (or `bench`) outputs of one export, built with different settings
(e.g. ``TRT_BGSWAP_WINOGRAD_MIN_CHANNELS``); the graphs are what `run` opens (the build index). Graph
runs use 2 threads, batch 1, the generation size's latent (``--side``, 64 for 512x512; the VAE encoder
gets side x 8) and random inputs; each figure is a median. Requests time the real pipeline on a photo
(4 steps, guidance 1) with every engine's calls wrapped for wall time and the process's rusage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("unet", "vae_decoder", "vae_encoder")


def _session(folder: Path, model: str, threads: int) -> Any:
    import onnxruntime as ort

    from trt_bgswap.build_index import ENGINES_DIR, ORT, read_index

    index = read_index(folder, ORT, "cpu")
    if index is None or model not in index:
        sys.exit(f"error: {folder} has no ONNX Runtime CPU build of {model}; run trt-bgswap build {folder}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_mem_pattern = False  # as the runtime opens its sessions
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # built graphs are optimized already
    return ort.InferenceSession(str(index[model].resolve(folder / ENGINES_DIR)), so, providers=["CPUExecutionProvider"])


def graph_ab(a: Path, b: Path, models: list[str], runs: int, side: int, threads: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for model in models:
        sessions = {"a": _session(a, model, threads), "b": _session(b, model, threads)}
        size = side * 8 if model == "vae_encoder" else side
        feeds = {}
        for i in sessions["a"].get_inputs():
            shape = [d if isinstance(d, int) else 1 if d == "B" else size for d in i.shape]
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        first = {k: s.run(None, feeds)[0] for k, s in sessions.items()}  # warm-up
        times: dict[str, list[float]] = {"a": [], "b": []}
        for _ in range(runs):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[k].append(time.perf_counter() - t0)
        row = {
            "a_s": float(np.median(times["a"])), "b_s": float(np.median(times["b"])), "samples": times,
            "max_abs_diff": float(np.max(np.abs(first["a"] - first["b"]))), "max_abs": float(np.max(np.abs(first["a"]))),
        }  # fmt: skip
        row["ratio"] = row["b_s"] / row["a_s"]
        out[model] = row
        print(f"{model:12s} a {row['a_s']:6.2f} s  b {row['b_s']:6.2f} s  b/a {row['ratio']:.3f}  max diff {row['max_abs_diff']:.1e} of {row['max_abs']:.1f}", flush=True)
        del sessions
    return out


def _requests_worker(folder: Path, photo: Path, requests: int, threads: int) -> dict[str, Any]:
    """In a fresh process: open the pipeline as `run` does, time ``requests`` generations engine by engine."""
    from trt_bgswap.runtime.image_read import read_image
    from trt_bgswap.runtime.jobs import GenerationOptions
    from trt_bgswap.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(folder, provider="cpu", threads=threads)
    load_s = time.perf_counter() - t0
    calls: list[tuple[str, float, float, float, int]] = []
    for name, engine in pipe.engines.items():

        def timed(feeds: Any, _infer: Any = engine.infer, _name: str = name) -> Any:
            r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            result = _infer(feeds)
            w1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            calls.append((_name, w1 - w0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))
            return result

        engine.infer = timed  # type: ignore[method-assign]
    rgb = read_image(photo).rgb
    rows = []
    for i in range(requests):
        calls.clear()
        r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        pipe.replace(rgb, GenerationOptions(prompt=f"a sunny beach at golden hour, photo {i}", seed=i))
        w1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        engines: dict[str, dict[str, float]] = {}
        for name, wall, user, sys_, faults in calls:
            e = engines.setdefault(name, {"calls": 0, "wall_s": 0.0, "user_s": 0.0, "sys_s": 0.0, "minor_faults": 0})
            e["calls"] += 1
            e["wall_s"] += wall
            e["user_s"] += user
            e["sys_s"] += sys_
            e["minor_faults"] += faults
        rows.append({"wall_s": w1 - w0, "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime, "engines": engines})
    status = Path("/proc/self/status").read_text(encoding="utf-8")
    hwm_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return {"folder": str(folder), "load_s": load_s, "requests": rows, "vmhwm_gb": hwm_kb * 1024 / 1e9}


def requests_ab(a: Path, b: Path, photo: Path, rounds: int, requests: int, threads: int) -> list[dict[str, Any]]:
    out = []
    for r in range(rounds):
        for side, folder in (("a", a), ("b", b)):
            cmd = [sys.executable, __file__, "_worker", "--a", str(folder), "--photo", str(photo), "--requests", str(requests), "--threads", str(threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(f"error: the worker for {folder} failed: {proc.stderr.strip().splitlines()[-1:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["side"], res["round"] = side, r
            out.append(res)
            walls = ", ".join(f"{q['wall_s']:.1f}" for q in res["requests"])
            unet = ", ".join(f"{q['engines'].get('unet', {}).get('wall_s', 0):.1f}" for q in res["requests"])
            print(f"round {r} {side}: load {res['load_s']:.1f} s, requests {walls} s (unet {unet} s), VmHWM {res['vmhwm_gb']:.2f} GB", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["graph", "requests", "_worker"])
    p.add_argument("--a", type=Path, required=True)
    p.add_argument("--b", type=Path)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--side", type=int, default=64, help="latent side (64: a 512x512 generation)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=2)
    p.add_argument("--photo", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.mode == "_worker":
        print(json.dumps(_requests_worker(args.a, args.photo, args.requests, args.threads)))
        return 0
    if args.b is None or (args.mode == "requests" and args.photo is None):
        sys.exit("error: give --b (and --photo for requests)")
    load_before = os.getloadavg()
    if args.mode == "graph":
        result: Any = graph_ab(args.a, args.b, args.models.split(","), args.runs, args.side, args.threads)
    else:
        result = requests_ab(args.a, args.b, args.photo, args.rounds, args.requests, args.threads)
    if args.out:
        from trt_bgswap.atomic import write_text_atomic

        doc = {"mode": args.mode, "a": str(args.a), "b": str(args.b), "load_before": load_before, "load_after": os.getloadavg(), "result": result}
        write_text_atomic(args.out, json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
