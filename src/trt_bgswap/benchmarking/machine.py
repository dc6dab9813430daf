"""What the numbers were measured on: CPU, memory, library versions, and the machine's matmul peak.

The peak is *measured* in the same run (not a datasheet figure): single-precision GEMM
through numpy's BLAS and through ONNX Runtime's ``MatMul`` (MLAS) at the benchmark's
thread count; the faster one is the reference the stages' achieved FLOP rates are
compared with (nanoGPT's ``bench.py`` reports MFU the same way, against a peak).
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

VERSION_PACKAGES = (
    "trt-bgswap", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "torch", "diffusers",
    "transformers", "peft", "tokenizers", "pillow", "safetensors",
)  # fmt: skip


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def total_memory_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def disk_read_bytes() -> int | None:
    """Bytes read from the machine's disks since boot (``/proc/diskstats``, whole disks only), None off Linux.

    Taken around a cold start it shows how much of it waited on the disk: this VM's page cache
    is reclaimed after about a minute idle, and its disk is sometimes throttled to ~20 MB/s."""
    try:
        lines = Path("/proc/diskstats").read_text().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        f = line.split()
        # whole physical disks (vda, nvme0n1): not their partitions, nor loop, RAM or device-mapper devices stacked on them
        if len(f) > 5 and Path("/sys/block", f[2]).exists() and not f[2].startswith(("loop", "ram", "zram", "dm-", "md")):
            total += int(f[5]) * 512  # sectors read; diskstats counts 512-byte sectors whatever the device's
    return total


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, OS, load average at the time of the call, library versions."""
    from trt_bgswap.engines.ort_build import host_fingerprint

    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": total_memory_bytes(),
        "os": f"{platform.system()} {platform.release()}",
        "isa": host_fingerprint(),
        "load_average": load_average(),
        "versions": library_versions(),
    }


def peak_rss_bytes() -> int:
    """This process's own peak resident set size so far (``VmHWM``, not a parent's inherited high-water mark)."""
    from trt_bgswap.benchmarking.peak_memory import process_peak_bytes

    return process_peak_bytes()


def current_rss_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def _best_rate(fn: Any, flops: float, repeats: int) -> float:
    fn()  # warm-up: thread pools, packing buffers
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Measured fp32 GEMM rate (FLOP/s) of an n x n x n product: numpy BLAS and ONNX Runtime MatMul."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3
    numpy_rate = _best_rate(lambda: a @ b, flops, repeats)

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ort_rate = _best_rate(lambda: sess.run(None, {"a": a, "b": b}), flops, repeats)
    return {"n": n, "numpy_flops": numpy_rate, "onnxruntime_flops": ort_rate, "peak_flops": max(numpy_rate, ort_rate)}


def device_memory_used(device: int = 0) -> int | None:
    """Bytes in use on the CUDA device (total - free), or None without CUDA (CPU runs)."""
    try:
        from trt_bgswap.runtime.cuda_device import check, cudart

        rt = cudart()
        check(rt.cudaSetDevice(device))
        free, total = check(rt.cudaMemGetInfo())
    except Exception:  # no cuda-python, no driver, no device: a CPU machine
        return None
    return int(total) - int(free)
