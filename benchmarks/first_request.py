"""Start-up: the first request after load against the next ones, each in a fresh process (issue 15).

    python benchmarks/first_request.py --models DIR [--processes 5] [--requests 3] [--low-memory] [--out FILE.json]

Each process loads the export (``Pipeline.load``, ONNX Runtime CPU), then runs ``--requests``
replacements of the same photo with a new prompt each (so the text encoder runs every time);
the first-to-second ratio per process and its median over the processes is what the issue's
"the first request not slower than the second by more than 10 %" is about. The load time
(sessions opened in parallel) is reported beside it. Timings on a shared machine are noisy:
the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time
import numpy as np
from PIL import Image
from skimage import data
from trt_bgswap.runtime.pipeline import GenerationOptions, Pipeline
folder, requests, low_memory, size = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
rgb = np.asarray(Image.fromarray(data.astronaut()).convert("RGB"))
t0 = time.perf_counter()
pipe = Pipeline.load(folder, provider="cpu", low_memory=low_memory)
load = time.perf_counter() - t0
times = []
for i in range(requests):
    t = time.perf_counter()
    pipe.replace(rgb, GenerationOptions(prompt=f"a beach {i}", steps=4, seed=0, size=(size, size) if size else None))
    times.append(time.perf_counter() - t)
print(json.dumps({"load_seconds": load, "requests": times}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True, type=Path)
    p.add_argument("--processes", type=int, default=5)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--size", type=int, default=0, help="square generation size (0: the model's default)")
    p.add_argument("--low-memory", action="store_true")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    load_before = os.getloadavg()
    runs = []
    for _ in range(a.processes):
        out = subprocess.run([sys.executable, "-c", CHILD, str(a.models), str(a.requests), "1" if a.low_memory else "0", str(a.size)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratios = [r["requests"][0] / r["requests"][1] for r in runs]
    report = {
        "command": " ".join(["python", "benchmarks/first_request.py", *sys.argv[1:]]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "low_memory": a.low_memory,
        "runs": runs,
        "first_over_second": ratios,
        "median_first_over_second": statistics.median(ratios),
        "median_load_seconds": statistics.median(r["load_seconds"] for r in runs),
    }
    text = json.dumps(report, indent=2) + "\n"
    if a.out:
        a.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
