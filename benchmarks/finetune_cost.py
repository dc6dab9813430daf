"""Cost of `trt-bgswap finetune` on the full-size SD1.5-inpainting architecture (random weights), at a reduced size.

Random weights give real costs: time and memory depend on the architecture and tensor sizes, not on
the weight values (`trt_bgswap.benchmarking.fullsize` builds the published configs). The CPU here has
no GPU, so this measures seconds per step and peak RSS on the CPU at a reduced resolution; the README
scales them to a GPU with the FLOP counts of `benchmarks/README.md`.

    python benchmarks/finetune_cost.py --work /tmp/ft-full --resolution 256 --steps 3

Prints one JSON line: seconds per optimizer step (after the first), peak RSS, trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args()

    from trt_bgswap.benchmarking.fullsize import write_full_sd_inpainting
    from trt_bgswap.cli import main as cli
    from trt_bgswap.training.finetune import FinetuneOptions, finetune

    work = Path(args.work)
    model = work / "sd-inpainting"
    if not (model / "unet" / "config.json").exists():
        write_full_sd_inpainting(model)
    photos, dataset = work / "photos", work / "dataset"
    if not dataset.exists():
        photos.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        side = args.resolution
        yy, xx = np.mgrid[:side, :side]
        for i in range(4):
            alpha = ((((yy - side / 2) / (side / 4)) ** 2 + ((xx - side / 2) / (side / 5)) ** 2) < 1).astype(np.uint8) * 255
            rgb = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(photos / f"p{i}.png")
        assert cli(["-q", "dataset", str(photos), "-o", str(dataset), "--max-side", "0", "--validation-ratio", "0"]) == 0
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step: int, loss: float) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    options = FinetuneOptions(
        rank=args.rank, steps=args.steps, resolution=args.resolution, checkpoint_every=0, validation_every=0, validation_images=0, eval_examples=1,
        threads=args.threads, gradient_checkpointing=args.gradient_checkpointing,
    )
    start = time.perf_counter()
    last[0] = start
    finetune(dataset, model, work / "lora", options, overwrite=True, on_step=tick)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(json.dumps({
        "resolution": args.resolution, "rank": args.rank, "steps": args.steps, "gradient_checkpointing": args.gradient_checkpointing,
        "seconds_per_step": [round(t, 2) for t in times], "median_after_first": round(float(np.median(times[1:] or times)), 2),
        "peak_rss_gib": round(peak / 2**30, 2), "total_seconds": round(time.perf_counter() - start, 1), "load_average": load,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
