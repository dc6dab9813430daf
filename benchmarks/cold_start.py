"""Cold start alone: `trt-bgswap run` and the diffusers baseline script, each launched fresh, interleaved (issue 15).

    nice -n 10 python benchmarks/cold_start.py --work /tmp/bench-full --rounds 4 --cache primed evicted \
        --out benchmarks/results/cold_start_full_primed_evicted.json

Re-measures only the full benchmark's cold-start rows, with the benchmark's own functions
(:mod:`trt_bgswap.benchmarking.cold_start`) and settings (4 steps, guidance 1, 512x512, 2
threads, RMBG at its export's size), on a work folder that ``trt-bgswap bench --mode full``
filled (``models-full/``, ``export-full/`` built, ``photo.png``): a full benchmark takes half
an hour, a cold start is a minute or two. Sides alternate (ours, baseline, ours, ...) so a slow
spell of a shared machine hits both; each side's figure is its median, every sample is kept,
and the load average is recorded before and after. ``--cache`` sets what the OS file cache holds
when each side launches (:mod:`trt_bgswap.benchmarking.cold_start`: ``as-found``, ``primed``,
``evicted``); given several, each is its own set of rounds. ``--compare FOLDER`` adds a third side: the same
export built with other settings (e.g. ``TRT_BGSWAP_WINOGRAD_MIN_CHANNELS=320``), in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from trt_bgswap.atomic import write_text_atomic
from trt_bgswap.benchmarking import machine
from trt_bgswap.benchmarking import CACHE_CONDITIONS, DEFAULT_CACHE
from trt_bgswap.benchmarking.cold_start import cold_start_baseline, cold_start_ours, interleaved
from trt_bgswap.benchmarking.suite import FAMILY_SOURCES
from trt_bgswap.manifest import Manifest

PROMPT = "a sunny beach at golden hour, photo"  # the benchmark's default prompt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path, help="a `trt-bgswap bench --mode full` work folder")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path)
    p.add_argument("--cache", nargs="+", choices=CACHE_CONDITIONS, default=[DEFAULT_CACHE], help=f"what the OS file cache holds at each launch (default {DEFAULT_CACHE})")
    p.add_argument("--compare", type=Path, help="another build of the same export (e.g. with other build settings): a third side, 'ours (compare)'")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = args.work
    export_dir, photo = work / "export-full", work / "photo.png"
    inpaint, lora = FAMILY_SOURCES["sd15"]
    sources = {"sd-inpainting": work / "models-full" / inpaint, "lcm-lora": work / "models-full" / lora, "rmbg": work / "models-full" / "rmbg"}
    missing = [str(x) for x in (export_dir, photo, *sources.values()) if not x.exists()]
    if missing:
        sys.exit(f"error: {work} is not a full benchmark's work folder (missing {', '.join(missing)}); run trt-bgswap bench --mode full --work {work} first")
    manifest = Manifest.load(export_dir)
    assert manifest.inpaint is not None and manifest.rmbg is not None
    size = (manifest.inpaint.default_size, manifest.inpaint.default_size)
    common = (photo, work, PROMPT, args.steps, 1.0, size, args.threads)
    if args.compare is not None and not (args.compare / "manifest.json").is_file():
        sys.exit(f"error: --compare {args.compare} is not an exported folder (no manifest.json)")
    load_before = os.getloadavg()
    started = time.time()
    errors: list[str] = []
    conditions: dict[str, dict[str, object]] = {}
    for cache in args.cache:
        runs = {
            "ours": lambda cache=cache: cold_start_ours(export_dir, *common, provider="cpu", cache=cache),
            "baseline": lambda cache=cache: cold_start_baseline(sources, *common, rmbg_size=manifest.rmbg.input_size[0], cache=cache),
        }
        if args.compare is not None:
            runs["ours (compare)"] = lambda cache=cache: cold_start_ours(
                args.compare, photo, work / "compare", PROMPT, args.steps, 1.0, size, args.threads, provider="cpu", cache=cache
            )
        cold = interleaved(runs, args.rounds, lambda side, e: errors.append(f"{side}: {e}"))
        one: dict[str, object] = {"cold_start": cold}
        if "ours" in cold and "baseline" in cold:
            one["ratio_of_medians"] = cold["ours"]["to_first_image"] / cold["baseline"]["to_first_image"]
            for side in cold:
                logging.info(
                    "%s, cache %s: median %.1f s of %s (disk read %s GB)", side, cache, cold[side]["to_first_image"],
                    ", ".join(f"{x:.1f}" for x in cold[side]["samples"]),
                    ", ".join("?" if b is None else f"{b / 1e9:.2f}" for b in cold[side]["disk_read_samples"]),
                )  # fmt: skip
            logging.info("cache %s: ours / baseline: %.3fx", cache, one["ratio_of_medians"])
            if "ours (compare)" in cold:
                one["compare_ratio_of_medians"] = cold["ours (compare)"]["to_first_image"] / cold["baseline"]["to_first_image"]
                logging.info("cache %s: ours (compare: %s) / baseline: %.3fx", cache, args.compare, one["compare_ratio_of_medians"])
        conditions[cache] = one
    result: dict[str, object] = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": machine.machine_info(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "wall_seconds": time.time() - started,
        "errors": errors,
        **({"compare": str(args.compare)} if args.compare is not None else {}),
    }
    if len(conditions) == 1:  # the layout of the results committed before --cache
        result.update(next(iter(conditions.values())))
        result["cache"] = args.cache[0]
    else:
        result["by_cache"] = conditions
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        write_text_atomic(args.out, text)
    else:
        print(text)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
