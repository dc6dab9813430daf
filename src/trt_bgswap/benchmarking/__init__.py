"""Measuring the pipeline: stage timers, FLOPs from ONNX graphs, the PyTorch baseline, reports.

Used by ``trt-bgswap bench`` (:mod:`trt_bgswap.cli.bench_command`) and ``benchmarks/``. Nothing
here is imported by the runtime; modules that need torch/diffusers import them inside
functions, so ``import trt_bgswap.benchmarking.<module>`` stays light.
"""

# What the OS file cache holds when a cold start launches (trt_bgswap.benchmarking.cold_start); here so the CLI can name them cheaply.
CACHE_CONDITIONS = ("as-found", "primed", "evicted")
# The default: the start-up's own cost, whatever ran before (as-found depended on it: 0.37x, 0.60x and
# 1.32x in three runs on one VM); it costs one untimed launch per cold start.
DEFAULT_CACHE = "primed"
