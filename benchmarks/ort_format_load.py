"""Session load time by graph format (issue 15: "pre-optimised graphs in ONNX Runtime's own format, loaded without copies, where faster").

    python benchmarks/ort_format_load.py EXPORT/unet/model.onnx   # one graph; prints median ms of 5 loads per format

Formats: the exported ``.onnx`` optimized at load (``ORT_ENABLE_ALL``); the same graph optimized
offline and saved as ``.onnx`` (what ``trt-bgswap build`` writes), loaded without optimization; saved
in ONNX Runtime's own format (``session.save_model_format=ORT``); and that ``.ort`` file's bytes used
directly for the graph and the initializers (``session.use_ort_model_bytes_directly`` /
``session.use_ort_model_bytes_for_initializers``: no copies). Writes its files to the working folder.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

PROVIDERS = ["CPUExecutionProvider"]


def options(level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL, **config: str) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    so.graph_optimization_level = level
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    return so


def median_ms(load: Callable[[], object], repeats: int = 5) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        load()
        samples.append(time.perf_counter() - t0)
    return round(statistics.median(samples) * 1000, 1)


def main(src: Path) -> dict[str, float]:
    name = src.parent.name
    opt_onnx, opt_ort = Path(f"{name}.opt.onnx"), Path(f"{name}.opt.ort")
    so = options()
    so.optimized_model_filepath = str(opt_onnx)
    ort.InferenceSession(str(src), so, providers=PROVIDERS)
    so = options(**{"session.save_model_format": "ORT"})
    so.optimized_model_filepath = str(opt_ort)
    ort.InferenceSession(str(src), so, providers=PROVIDERS)
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = opt_ort.read_bytes()
    direct = {"session.use_ort_model_bytes_directly": "1", "session.use_ort_model_bytes_for_initializers": "1"}
    return {
        "exported .onnx, optimized at load": median_ms(lambda: ort.InferenceSession(str(src), options(), providers=PROVIDERS)),
        "pre-optimized .onnx": median_ms(lambda: ort.InferenceSession(str(opt_onnx), options(off), providers=PROVIDERS)),
        "pre-optimized .ort": median_ms(lambda: ort.InferenceSession(str(opt_ort), options(off), providers=PROVIDERS)),
        ".ort bytes used directly": median_ms(lambda: ort.InferenceSession(data, options(off, **direct), providers=PROVIDERS)),
    }


if __name__ == "__main__":
    graph = Path(sys.argv[1])
    print(graph.parent.name, graph.stat().st_size, main(graph), "load average", os.getloadavg()[0])
