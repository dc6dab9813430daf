"""One measured side in its own process, so peak memory and thread pools are its own.

``python -m trt_bgswap.benchmarking.worker {ours,baseline} JOB.json RESULT.json``: reads the
job, runs :func:`~trt_bgswap.benchmarking.ours.measure_ours` or
:func:`~trt_bgswap.benchmarking.baseline.measure_baseline`, writes the result atomically.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trt_bgswap.atomic import write_text_atomic
from trt_bgswap.benchmarking.machine import load_average

SIDES = ("ours", "baseline")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] not in SIDES:
        raise SystemExit(f"usage: python -m trt_bgswap.benchmarking.worker {{{','.join(SIDES)}}} JOB.json RESULT.json")
    side, job_path, out_path = args
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    load_start = load_average()
    if side == "ours":
        from trt_bgswap.benchmarking.ours import measure_ours

        result = measure_ours(job)
    else:
        from trt_bgswap.benchmarking.baseline import measure_baseline

        result = measure_baseline(job)
    result["load_average"] = {"start": load_start, "end": load_average()}  # a busy machine shows here, per side
    write_text_atomic(out_path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover - the benchmark runs this as a subprocess
    sys.exit(main())
