"""Put an emulated ``tensorrt`` + ``cuda-python`` pair where ``import`` finds them, and take it away again.

:func:`emulate` installs a meta-path finder serving ``tensorrt``, ``cuda``, ``cuda.bindings``,
``cuda.bindings.runtime``, ``cuda.bindings.utils`` (and ``cuda.cudart`` for 12.x, with the
FutureWarning the real trampoline gives) for one :class:`StackSpec`. Nothing of the code
under test is patched: its own lazy ``import tensorrt`` / ``from cuda.bindings import runtime``
resolve to the emulation while the context is open, and to whatever is really installed
(usually nothing, here) after it closes. Modules of those names imported before are
restored on exit.
"""

from __future__ import annotations

import gc
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emulation.api_data import cuda_releases
from emulation.cuda_api import Device, Machine, runtime_module, utils_module
from emulation.tensorrt_api import emulated_plan, read_plan, tensorrt_module

TOP_LEVEL = ("tensorrt", "cuda")


@dataclass(frozen=True)
class StackSpec:
    """One installable combination: a TensorRT release (built for a CUDA major), a cuda-bindings release, a driver."""

    tensorrt: str
    cuda_bindings: str
    tensorrt_cuda: int  # tensorrt-cu12 or tensorrt-cu13
    driver: int  # cudaDriverGetVersion of the machine's driver (12080: an R570 driver, 13000: R580)

    @property
    def id(self) -> str:
        return f"trt{self.tensorrt}-cu{self.tensorrt_cuda}-bindings{self.cuda_bindings}-driver{self.driver}"


# The stacks the TensorRT tests run against: the first 10.x (edge boxes, JetPack-era CUDA 12), the last 10.x
# (CUDA 13 build) and the newest 11.x, whose sources were read (NVIDIA/TensorRT tags v10.0.1, v10.16, v11.1).
STACKS = (
    StackSpec("10.0.1", "12.9.10", 12, 12040),
    StackSpec("10.16.0", "13.5.0", 13, 13000),
    StackSpec("11.1.0", "13.5.0", 13, 13000),
)


class Emulation:
    """The installed pair and the device behind it: counts, live resources, plan helpers."""

    def __init__(self, spec: StackSpec, machine: Machine | None = None, allow: frozenset[str] = frozenset()) -> None:
        self.spec = spec
        api = cuda_releases()[spec.cuda_bindings]
        self.device = probe = Device(machine or Machine(driver_version=spec.driver), api["runtime_version"])
        self.runtime = runtime_module(probe, spec.cuda_bindings)
        self.trt = tensorrt_module(probe, spec.tensorrt, spec.tensorrt_cuda, allow)
        self.modules: dict[str, types.ModuleType] = {"tensorrt": self.trt}
        cuda = types.ModuleType("cuda", "Emulated cuda namespace package")
        cuda.__path__ = []  # a package: submodules come from this finder only
        bindings = types.ModuleType("cuda.bindings", f"Emulated cuda-bindings {spec.cuda_bindings}")
        bindings.__path__ = []
        bindings.__version__ = spec.cuda_bindings
        self.modules.update({"cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": self.runtime, "cuda.bindings.utils": utils_module(probe, spec.cuda_bindings)})
        if api["modules"].get("cuda.cudart"):
            self.modules["cuda.cudart"] = runtime_module(probe, spec.cuda_bindings, "cuda.cudart")
        self.finder = _Finder(self.modules)

    @property
    def counts(self) -> Any:
        return self.device.counts

    def leaks(self) -> list[str]:
        """Every device resource still alive (after collecting garbage: a dropped context frees its memory)."""
        gc.collect()
        return self.device.report()

    def build_plan(self, onnx_path: Path, plan_path: Path, profiles: list[Any], strongly_typed: bool = True) -> Path:
        """A plan of ``onnx_path`` built through the emulated builder API (not the product's), for runtime tests.

        ``profiles``: one ``{input: (min, opt, max)}`` per optimization profile, or objects with ``.tensors``
        (name, min, opt, max), such as the product's ``ShapeProfile``.
        """
        as_dicts = [p if isinstance(p, dict) else {t.name: (t.min, t.opt, t.max) for t in p.tensors} for p in profiles]
        plan_path.write_bytes(emulated_plan(self.trt, onnx_path, as_dicts, strongly_typed))
        return plan_path

    @staticmethod
    def read_plan(path: Path | bytes) -> dict:
        return read_plan(path)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, modules: dict[str, types.ModuleType]) -> None:
        self.modules = modules

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in self.modules:
            return importlib.util.spec_from_loader(fullname, self, is_package=hasattr(self.modules[fullname], "__path__"))
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self.modules[spec.name]

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ == "cuda.cudart":  # cuda/cudart.pyx of cuda-bindings 12.9.10
            warnings.warn("The cuda.cudart module is deprecated and will be removed in a future release, "
                          "please switch to use the cuda.bindings.runtime module instead.", FutureWarning, stacklevel=2)


def _ours(name: str) -> bool:
    return name.split(".")[0] in TOP_LEVEL


@contextmanager
def emulate(spec: StackSpec, machine: Machine | None = None, allow: frozenset[str] = frozenset()) -> Iterator[Emulation]:
    """Install the emulated pair for the duration of the block; restore ``sys.modules`` afterwards."""
    emulation = Emulation(spec, machine, allow)
    saved = {n: sys.modules.pop(n) for n in [n for n in sys.modules if _ours(n)]}
    sys.meta_path.insert(0, emulation.finder)
    importlib.invalidate_caches()
    try:
        yield emulation
    finally:
        sys.meta_path.remove(emulation.finder)
        for n in [n for n in sys.modules if _ours(n)]:
            del sys.modules[n]
        sys.modules.update(saved)
        importlib.invalidate_caches()
