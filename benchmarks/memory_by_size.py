"""Peak RSS of `trt-bgswap run` by generation size, each in its own capped process, against the cost model.

    python benchmarks/memory_by_size.py --work /tmp/memory-bench --readme benchmarks/README.md
    python benchmarks/memory_by_size.py --models /tmp/bench-full/export --work /tmp/memory-bench-full \
        --sizes 512 768 1024 --guided-sizes --photo-megapixels --time-sizes 512 --cap 14G \
        --label full --out benchmarks/results/memory_by_size_full.json --readme benchmarks/README.md

Writes (or reuses) the tiny models and their export in ``--work``, and a copy built with
``trt-bgswap build`` (ONNX Runtime CPU graphs, attention tiled: engines/attention.py). Then, one
process at a time, each under an address-space cap (``--cap``, ``setrlimit(RLIMIT_AS)``) and
``nice``: the child asks the cost model for its prediction (``runtime/memory_guard.py``, as the
CLI does before loading), runs the CLI in-process, and reports its own peak RSS (``VmHWM`` of
``/proc/self/status``: not ``ru_maxrss`` of a child forked from a big parent). A size the guard
refuses is reported with its one-line message. A second table times one UNet call and one VAE
decode with the exported and the tiled attention. ``--models DIR`` measures another export
(the full-size random-weight models of ``trt-bgswap bench --mode full``, say) instead of the
tiny ones. Results: ``--out`` (JSON) and, with ``--readme``, the block between this ``--label``'s
``memory-by-size`` markers in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "examples" / "astronaut.jpg"
PROMPT = "a sunny beach, photograph"
SECTION = "## Peak memory by generation size"
GIB = 1 << 30


def _vmhwm() -> int:
    m = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


def child_run(args: argparse.Namespace) -> dict[str, Any]:
    """In the capped child: the prediction, then the CLI run, then this process's peak RSS."""
    import io
    from contextlib import redirect_stderr

    from PIL import Image

    from trt_bgswap.cli import main
    from trt_bgswap.runtime.memory_guard import guard_for_run

    width, height = args.size
    photo = args.photo or PHOTO
    with Image.open(photo) as im:
        photo_pixels = im.width * im.height
    guard = guard_for_run(args.models, "cpu", args.budget)
    est = guard.estimate(width, height, args.guidance, photo_pixels) if guard else None
    argv = ["-q", "run", str(photo), "--models", str(args.models), "--provider", "cpu", "--prompt", PROMPT, "--seed", "0"]
    argv += ["--steps", str(args.steps), "--size", f"{width}x{height}", "--guidance", str(args.guidance), "-o", str(args.output), "--overwrite"]
    if args.budget:
        argv += ["--memory-budget", str(args.budget)]
    err = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stderr(err):
        rc = main(argv)
    seconds = time.perf_counter() - t0
    return {
        "rc": rc,
        "seconds": round(seconds, 2),
        "peak_rss": _vmhwm(),
        "predicted": est.total if est else None,
        "resident": est.resident if est else None,
        "predicted_with_margin": guard.need(est) if guard and est else None,
        "stage": est.stage if est else None,
        "message": err.getvalue().strip().splitlines()[-1] if rc else None,
    }


def child_time(args: argparse.Namespace) -> dict[str, Any]:
    """In the capped child: the fastest of a few UNet calls and VAE decodes at one size (models loaded first)."""
    import numpy as np

    from trt_bgswap.runtime.pipeline import Pipeline
    from trt_bgswap.specs import pipeline_dims

    width, height = args.size
    p = Pipeline.load(args.models, provider="cpu")
    cfg = p.config
    dims = pipeline_dims(1, height, width, cfg.vae_scale_factor)
    rng = np.random.default_rng(0)
    emb = p.text_embeddings(PROMPT)
    x = rng.standard_normal((1, cfg.unet_in_channels, dims["h"], dims["w"])).astype(np.float32)
    z = rng.standard_normal((1, cfg.latent_channels, dims["h"], dims["w"])).astype(np.float32)
    gen = p.stages.generator
    out: dict[str, Any] = {}
    calls = (("unet", lambda: gen.denoiser.unet(x, 999.0, emb), args.repeats), ("vae_decoder", lambda: gen.decoder.decode(z), max(1, args.repeats - 1)))
    for name, fn, n in calls:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = round(min(times), 3)
    out["peak_rss"] = _vmhwm()
    return out


def spawn(mode: str, models: Path, size: tuple[int, int], cap: int, **extra: Any) -> dict[str, Any]:
    """Run one measurement in a fresh process under the address-space cap; never two at once."""
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--child-{mode}", "--models", str(models), "--size", f"{size[0]}x{size[1]}"]
    for k, v in extra.items():
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]

    def limit() -> None:
        os.nice(10)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"rc": proc.returncode, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def prepare(work: Path) -> tuple[Path, Path]:
    """The tiny models' export and its `trt-bgswap build` copy (tiled attention), made once in ``work``."""
    from trt_bgswap.export.exporter import export_models
    from trt_bgswap.export.tiny import write_tiny_models

    models, exported, built = work / "tiny-models", work / "export", work / "export-built"
    if not (models / "sd-inpainting").is_dir():
        write_tiny_models(models, seed=0)
    if not (exported / "manifest.json").is_file():
        export_models(models / "sd-inpainting", models / "lcm-lora", models / "rmbg", exported)
    return exported, build_copy(exported, built)


def build_copy(exported: Path, built: Path) -> Path:
    from trt_bgswap.engines.build import build_engines

    if not (built / "engines" / "index-ort-cpu.json").is_file():
        shutil.rmtree(built, ignore_errors=True)
        shutil.copytree(exported, built, ignore=shutil.ignore_patterns("engines"))
        build_engines(built, backend="ort", provider="cpu")
    return built


def big_photo(work: Path, megapixels: float) -> Path:
    """examples/astronaut.jpg upscaled to about ``megapixels`` (4:3), written once as JPEG."""
    from PIL import Image

    path = work / f"photo-{megapixels:g}mp.jpg"
    if not path.is_file():
        w = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
        with Image.open(PHOTO) as im:
            im.convert("RGB").resize((w, w * 3 // 4), Image.Resampling.BICUBIC).save(path, quality=90)
    return path


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def table(results: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| attention | size | guidance | predicted peak | + margin (what the check compares) | measured peak RSS | measured / predicted | outcome |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        m = r["result"]
        ratio = f"{m['peak_rss'] / m['predicted']:.2f}" if m.get("predicted") and m.get("rc") == 0 else "-"
        outcome = "ran" if m.get("rc") == 0 else f"refused: `{m['message']}`" if m.get("rc") == 2 else f"failed: {m.get('error') or m.get('message')}"
        measured = _gib(m.get("peak_rss")) if m.get("rc") == 0 else f"({_gib(m.get('peak_rss'))} before refusing)" if m.get("rc") == 2 else "-"
        photo = f", {r['photo_megapixels']:g} MP photo" if r.get("photo_megapixels") else ""
        rows.append(
            f"| {r['variant']} | {r['size'][0]}x{r['size'][1]}{photo} | {r['guidance']:g} | {_gib(m.get('predicted'))} | {_gib(m.get('predicted_with_margin'))} | {measured} | {ratio} | {outcome} |"
        )
    return rows


def speed_table(speed: list[dict[str, Any]]) -> list[str]:
    rows = ["| size | UNet call, exported attention | UNet call, tiled | tiled / exported | VAE decode, exported | VAE decode, tiled |", "|---|---:|---:|---:|---:|---:|"]
    by = {(s["variant"], tuple(s["size"])): s["result"] for s in speed}
    for size in sorted({tuple(s["size"]) for s in speed}):
        e, t = by.get(("exported", size), {}), by.get(("tiled", size), {})
        fmt = lambda r, k: f"{r[k]:.2f} s" if k in r else "-"  # noqa: E731
        ratio = f"{t['unet'] / e['unet']:.2f}x" if "unet" in e and "unet" in t else "-"
        rows.append(f"| {size[0]}x{size[1]} | {fmt(e, 'unet')} | {fmt(t, 'unet')} | {ratio} | {fmt(e, 'vae_decoder')} | {fmt(t, 'vae_decoder')} |")
    return rows


def write_readme(readme: Path, label: str, text: str) -> None:
    """Replace the block between this label's markers (made at the end of the section the first time)."""
    start, end = f"<!-- memory-by-size:{label}:start -->", f"<!-- memory-by-size:{label}:end -->"
    old = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    block = f"{start}\n{text}\n{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    elif SECTION in old:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    else:
        new = old.rstrip("\n") + f"\n\n{SECTION}\n\n" + block + "\n"
    readme.write_text(new, encoding="utf-8")


def parse_size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/memory-bench"))
    ap.add_argument("--models", type=Path, help="an exported folder to measure instead of the tiny models (a built copy is made beside it)")
    ap.add_argument("--sizes", nargs="+", type=int, default=[256, 512, 640, 768, 1024])
    ap.add_argument("--guided-sizes", nargs="*", type=int, default=[512], help="also run these with --guidance 2 (UNet batch 2)")
    ap.add_argument("--time-sizes", nargs="*", type=int, default=[512, 768])
    ap.add_argument("--photo-megapixels", nargs="*", type=float, default=[12, 48], help="also run photos this large (tiled graphs, 256x256 generation)")
    ap.add_argument("--steps", type=int, default=2, help="LCM steps (each step holds the same memory)")
    ap.add_argument("--repeats", type=int, default=3, help="UNet calls timed per size (the fastest is reported)")
    ap.add_argument("--cap", default="10G", help="address-space cap of every child (RLIMIT_AS)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory_by_size.json")
    ap.add_argument("--readme", type=Path)
    ap.add_argument("--label", default="tiny", help="names this run's block in --readme (several runs keep one block each)")
    # child modes (internal)
    ap.add_argument("--child-run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-time", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=parse_size, help=argparse.SUPPRESS)
    ap.add_argument("--guidance", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--budget", help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--photo", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_run:
        print(json.dumps(child_run(args)))
        return 0
    if args.child_time:
        print(json.dumps(child_time(args)))
        return 0

    from trt_bgswap.memory import parse_bytes

    cap = parse_bytes(args.cap, "--cap")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.models is not None:
        exported = args.models
        built = build_copy(exported, args.work / (exported.name + "-built"))
    else:
        exported, built = prepare(args.work)
    variants = {"exported": exported, "tiled": built}
    t0 = time.time()
    load_before = os.getloadavg()
    results = []
    cases = [(v, s, 1.0) for v in variants for s in args.sizes] + [(v, s, 2.0) for v in variants for s in args.guided_sizes]
    for variant, side, guidance in cases:
        out = args.work / f"out-{variant}-{side}-{guidance:g}.png"
        r = spawn("run", variants[variant], (side, side), cap, guidance=guidance, steps=args.steps, output=out)
        print(f"{variant:9s} {side}x{side} guidance {guidance:g}: {r}", file=sys.stderr)
        results.append({"variant": variant, "size": [side, side], "guidance": guidance, "result": r})
    for mp in args.photo_megapixels:
        photo = big_photo(args.work, mp)
        out = args.work / f"out-photo-{mp:g}.png"
        r = spawn("run", built, (256, 256), cap, steps=1, output=out, photo=photo)
        print(f"photo {mp:g} MP: {r}", file=sys.stderr)
        results.append({"variant": "tiled", "size": [256, 256], "guidance": 1.0, "photo_megapixels": mp, "result": r})
    speed = []
    for side in args.time_sizes:
        for variant in variants:
            r = spawn("time", variants[variant], (side, side), cap, repeats=args.repeats)
            print(f"time {variant:9s} {side}x{side}: {r}", file=sys.stderr)
            speed.append({"variant": variant, "size": [side, side], "result": r})
    report = {
        "command": " ".join(["python", "benchmarks/memory_by_size.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()},
        "cap_bytes": cap,
        "results": results,
        "speed": speed,
        "wall_seconds": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = "\n".join(
        [
            f"- command: `{report['command']}` ({report['wall_seconds']:.0f} s; every child capped at {args.cap} of address space, run one at a time under `nice`)",
            f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; load average before/after "
            f"{[round(x, 2) for x in load_before]} / {[round(x, 2) for x in report['machine']['load_after']]}",
            "",
            *table(results),
            "",
            *speed_table(speed),
        ]
    )
    print(text)
    if args.readme:
        write_readme(args.readme, args.label, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
