"""Derive the emulated cuda-python runtime API from NVIDIA's own ``cuda-bindings`` wheels.

A development tool, not run by the tests: it writes ``data/cuda_api.json``, which the
emulation (:mod:`emulation.cuda_api`) reads so that an emulated ``cuda.bindings.runtime`` has
exactly the functions, classes and enum members of the cuda-bindings release it stands for,
and returns tuples of the documented length.

It introspects an unpacked wheel from PyPI (``pip download --no-deps cuda-bindings==X`` and
``cuda-pathfinder``, unzip, point this script at the folders) in a child process: the modules
import without a GPU or driver (the CUDA runtime is linked statically; calls then return
``cudaErrorInsufficientDriver``). For each function it keeps the embedded signature and the
names in its docstring's ``Returns`` section (the tuple cuda-python returns: the error first);
for the enums the emulation uses, every member and value; and which import paths exist
(``cuda.cudart`` is a deprecated trampoline in 12.x, removed in 13.0).

Usage: python tests/emulation/extract_cuda_api.py PATHFINDER_DIR WHEEL_DIR [WHEEL_DIR ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).with_name("data") / "cuda_api.json"
ENUMS = ("cudaError_t", "cudaStreamCaptureMode", "cudaStreamCaptureStatus", "cudaMemcpyKind", "cudaGraphInstantiateFlags")
MODULES = ("cuda.cudart", "cuda.bindings.runtime", "cuda.bindings.driver", "cuda.bindings.utils")

_PROBE = r"""
import importlib, inspect, json, re, sys
out = {"modules": {}, "functions": {}, "classes": [], "enums": {}, "utils": []}
for name in MODULES:
    try:
        importlib.import_module(name)
        out["modules"][name] = True
    except ImportError:
        out["modules"][name] = False
import cuda.bindings
from cuda.bindings import runtime as rt, utils
out["version"] = cuda.bindings.__version__
ok, runtime_version = rt.cudaRuntimeGetVersion()
out["runtime_version"] = int(runtime_version)
out["utils"] = sorted(n for n in dir(utils) if not n.startswith("_") and callable(getattr(utils, n)) and getattr(getattr(utils, n), "__module__", "").startswith("cuda"))
for name in sorted(dir(rt)):
    if name.startswith("_"):
        continue
    obj = getattr(rt, name)
    if inspect.isclass(obj):
        out["classes"].append(name)
        if name in ENUMS:
            out["enums"][name] = {m.name: int(m.value) for m in obj}
    elif callable(obj):
        doc = obj.__doc__ or ""
        signature = doc.splitlines()[0] if doc else name + "(...)"
        returns = []
        section = re.search(r"\nReturns\n-+\n(.*?)(?:\n\n(?:See Also|Notes)\n|\Z)", doc, re.S)
        if section:
            returns = re.findall(r"^(\w+)(?: : .*)?$", section.group(1), re.M)
        out["functions"][name] = {"signature": signature, "returns": returns}
print(json.dumps(out))
"""


def probe(pathfinder: Path, wheel: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{wheel}{os.pathsep}{pathfinder}", "CUDA_PYTHON_DISABLE_VERSION_CHECK": "1"}
    code = f"MODULES = {MODULES!r}\nENUMS = {ENUMS!r}\n" + _PROBE
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", check=True)
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["source"] = f"PyPI wheel {wheel.name}, introspected (cuda/bindings/runtime)"
    pyx = wheel / "cuda" / "bindings" / "runtime.pyx"
    if pyx.is_file():  # 12.x wheels ship the Cython source: cite its lines
        lines = pyx.read_text().splitlines()
        where = {line[4:].split("(")[0]: i + 1 for i, line in enumerate(lines) if line.startswith("def ")}
        for name, entry in data["functions"].items():
            if name in where:
                entry["line"] = where[name]
        data["source_file"] = "cuda/bindings/runtime.pyx"
    return data


def main(argv: list[str]) -> None:
    pathfinder, wheels = Path(argv[1]), [Path(a) for a in argv[2:]]
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for wheel in wheels:
        entry = probe(pathfinder, wheel)
        data[entry["version"]] = entry
        print(f"cuda-bindings {entry['version']}: {len(entry['functions'])} functions, runtime {entry['runtime_version']}, modules {entry['modules']}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv)
