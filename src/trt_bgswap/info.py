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

PACKAGES = ("numpy", "pillow", "onnxruntime", "onnxruntime-gpu", "tokenizers", "onnx", "torch", "diffusers", "transformers", "peft", "huggingface_hub")


def tensorrt_version() -> str | None:
    """The installed TensorRT: from pip's metadata (``tensorrt-cu12``/``-cu13``), else the module (JetPack's apt package)."""
    for name in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception as e:  # a broken install still gets a line in `info`
        return f"unimportable ({e})"


def cuda_lines(tensorrt_cuda: int | None = None) -> list[str]:
    """TensorRT, CUDA runtime and driver versions, and whether they fit (both CUDA queries work without a GPU context)."""
    from trt_bgswap.runtime.cuda_versions import INSTALL_HINT, cuda_version_text, read_versions

    trt = tensorrt_version()
    lines = ["tensorrt: " + (trt or f"not installed ({INSTALL_HINT})")]
    try:
        from trt_bgswap.runtime.cuda_device import cudart

        rt = cudart()
    except Exception as e:  # BackendUnavailable without cuda-python; anything else is reported, not raised
        lines.append(f"cuda: {e}")
        return lines
    v = read_versions(rt, tensorrt_cuda)
    lines.append(f"cuda: runtime {cuda_version_text(v.runtime)} (cuda-bindings {v.bindings or '?'}), driver supports CUDA {cuda_version_text(v.driver)}"
                 + (f", TensorRT built for CUDA {v.tensorrt_cuda}" if v.tensorrt_cuda else ""))
    problems = v.problems()
    lines.append("cuda fit: " + ("ok" if not problems else "NO: " + "; ".join(problems)))
    return lines


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
    lines.extend(cuda_lines())
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
