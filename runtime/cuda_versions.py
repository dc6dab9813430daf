"""Which CUDA the installed pieces need, which the driver runs, and the sentence that says when they do not fit.

Three versions decide whether TensorRT runs at all:

- the **driver's** CUDA version (``cudaDriverGetVersion``: "the latest version of CUDA supported by
  the driver ... (1000 * major + 10 * minor) ... If no driver is installed, then 0";
  cuda-bindings ``runtime.pyx``@12.9.10:26681-26690);
- the **CUDA runtime** the Python bindings were built for (``cudaRuntimeGetVersion``);
- the CUDA major the **TensorRT** wheel was built for (``tensorrt-cu12`` / ``tensorrt-cu13``: the
  bare ``tensorrt`` metapackage pulls ``tensorrt_cu13`` since 10.13.3, see tests/emulation/SOURCES.md).

A runtime or TensorRT of CUDA major N needs a driver of at least that major: NVIDIA's
minor-version-compatibility table (docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html)
gives **CUDA 13.x: driver >= 580** and **CUDA 12.x: driver >= 525**; older drivers fail every
context call with ``cudaErrorInsufficientDriver``. Both version queries work without a context,
so the message can name the driver needed on exactly the machines where nothing else works.
"""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass
from typing import Any

# Minimum driver branch per CUDA major (NVIDIA's minor-version-compatibility table, cited above).
MIN_DRIVER = {12: 525, 13: 580}
EXTRA_FOR_MAJOR = {12: "trt-cu12", 13: "trt-cu13"}
TENSORRT_DISTRIBUTIONS = {12: ("tensorrt-cu12", "tensorrt_cu12"), 13: ("tensorrt-cu13", "tensorrt_cu13")}
# The one install sentence for TensorRT (cuda_device, trt_backend, backends and `info` all say it).
INSTALL_HINT = (
    "on a machine with an NVIDIA GPU: pip install 'trt-bgswap[trt-cu13]' (driver >= 580) "
    "or 'trt-bgswap[trt-cu12]' (driver >= 525; Jetson: JetPack's TensorRT 10) (see README, 'TensorRT')"
)


def cuda_version_text(version: int) -> str:
    """``12080`` -> ``"12.8"`` (CUDA's 1000 * major + 10 * minor encoding); 0 -> ``"none"``."""
    if version <= 0:
        return "none"
    return f"{version // 1000}.{(version % 1000) // 10}"


@dataclass(frozen=True)
class CudaVersions:
    """What the driver supports, what the bindings' runtime is, and which CUDA the TensorRT wheel was built for."""

    driver: int  # cudaDriverGetVersion: 0 without a driver
    runtime: int  # cudaRuntimeGetVersion of the installed cuda-bindings
    bindings: str | None  # the cuda-bindings (cuda-python) version
    tensorrt_cuda: int | None  # 12 or 13 from the installed tensorrt-cuXX distribution; None when unknown (JetPack's apt packages)

    @property
    def needed_major(self) -> int:
        """The highest CUDA major any installed piece needs."""
        return max(self.runtime // 1000, self.tensorrt_cuda or 0)

    def problems(self) -> list[str]:
        """Why these pieces cannot run together on this driver (empty when they fit)."""
        if self.driver <= 0:
            return ["no NVIDIA driver found (cudaDriverGetVersion reports 0); install the NVIDIA driver"]
        out = []
        have = self.driver // 1000
        for what, major in (("cuda-bindings " + (self.bindings or "?") + f" (CUDA runtime {cuda_version_text(self.runtime)})", self.runtime // 1000),
                            (f"TensorRT built for CUDA {self.tensorrt_cuda}", self.tensorrt_cuda)):
            if major and major > have:
                out.append(f"{what} needs a driver for CUDA {major} (>= {MIN_DRIVER.get(major, '?')})")
        if self.tensorrt_cuda and self.runtime and self.tensorrt_cuda != self.runtime // 1000:
            out.append(f"TensorRT is built for CUDA {self.tensorrt_cuda} but cuda-bindings for CUDA {self.runtime // 1000}; install one pair: "
                       f"pip install 'trt-bgswap[{EXTRA_FOR_MAJOR.get(self.tensorrt_cuda, 'trt')}]'")
        return out

    def driver_hint(self) -> str:
        """The sentence for a too-old driver: what it supports, what is needed, the two fixes."""
        major = self.needed_major
        older = EXTRA_FOR_MAJOR.get(self.driver // 1000)
        fix = f"update the NVIDIA driver to >= {MIN_DRIVER.get(major, '?')} (CUDA {major})"
        if older and self.driver // 1000 < major:
            fix += f", or install the CUDA {self.driver // 1000} build: pip install 'trt-bgswap[{older}]' (see README, 'TensorRT')"
        return (f"the NVIDIA driver supports CUDA {cuda_version_text(self.driver)}, but cuda-bindings {self.bindings or '?'} "
                f"(CUDA runtime {cuda_version_text(self.runtime)}) needs a driver >= {MIN_DRIVER.get(major, '?')}; {fix}")


def tensorrt_cuda_major() -> int | None:
    """The CUDA major of the installed TensorRT wheel, from its distribution name (None when not installed from PyPI)."""
    for major, names in TENSORRT_DISTRIBUTIONS.items():
        for name in names:
            try:
                importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            return major
    return None


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def read_versions(rt: Any, tensorrt_cuda: int | None = None) -> CudaVersions:
    """Ask the bindings ``rt`` (``cuda.bindings.runtime``) for the driver and runtime versions; no context is needed."""
    err_driver, driver = rt.cudaDriverGetVersion()
    err_runtime, runtime = rt.cudaRuntimeGetVersion()
    ok = rt.cudaError_t.cudaSuccess
    bindings = getattr(sys.modules.get("cuda.bindings"), "__version__", None) or _distribution_version("cuda-bindings", "cuda-python")
    return CudaVersions(
        int(driver) if err_driver == ok and driver is not None else 0,
        int(runtime) if err_runtime == ok and runtime is not None else 0,
        bindings,
        tensorrt_cuda if tensorrt_cuda is not None else tensorrt_cuda_major(),
    )
