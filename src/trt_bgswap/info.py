"""`trt-bgswap info`: what this machine can actually run, and what the caches hold.

Reports installed versions, the ONNX Runtime providers that really load (not
just the ones compiled in), TensorRT and the GPU if any, and the per-user
cache. Nothing heavy is imported: torch & co. are looked up by metadata only.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import subprocess

from trt_bgswap import __version__

PACKAGES = ("numpy", "pillow", "onnxruntime", "onnxruntime-gpu", "tokenizers", "onnx", "torch", "diffusers", "transformers", "peft", "tensorrt", "huggingface_hub")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def gpus() -> list[str]:
    """GPUs as nvidia-smi reports them (name, memory, compute capability); empty without a driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        proc = subprocess.run(
            [exe, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()] if proc.returncode == 0 else []


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def info_text() -> str:
    from trt_bgswap.runtime.ort_backend import available_providers

    lines = [f"trt-bgswap {__version__}", f"python {platform.python_version()} on {platform.platform()}"]
    lines.append("packages: " + ", ".join(f"{k} {v}" for k, v in package_versions().items()))
    lines.append("onnxruntime providers: " + ", ".join(available_providers()))
    lines.append("tensorrt: " + ("installed" if importlib.util.find_spec("tensorrt") else "not installed (pip install 'trt-bgswap[trt]' on a GPU machine)"))
    found = gpus()
    lines.append("gpu: " + ("; ".join(found) if found else "none found (nvidia-smi absent or no device)"))
    try:
        from trt_bgswap.paths import cache_report

        report = cache_report()
        lines.append(f"cache: {report.root}")
        for entry in report.entries:
            lines.append(f"  {entry.path}  {_size(entry.size)}")
        if not report.entries:
            lines.append("  (empty)")
    except ImportError:
        lines.append("cache: (paths module unavailable)")
    return "\n".join(lines)
