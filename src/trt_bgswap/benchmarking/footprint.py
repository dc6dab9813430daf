"""The runtime's own install size and import time (the targets: under 300 MB, under 0.5 s).

Size: the files every distribution in the dependency closure of ``trt-bgswap`` (base
requirements, no extras) installed, as their ``RECORD`` lists them. Import: a fresh
interpreter importing the API, minus a fresh interpreter doing nothing, best of a few.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from importlib import metadata
from typing import Any

IMPORT_MODULES = ("trt_bgswap.api", "trt_bgswap.api, onnxruntime")  # the API alone; with the backend it loads lazily


def _requirement_name(req: str) -> tuple[str, bool]:
    """(distribution name, needed without extras) of a ``Requires-Dist`` line."""
    name = re.split(r"[\s;<>=!~\[\(]", req, maxsplit=1)[0]
    marker = req.split(";", 1)[1] if ";" in req else ""
    return name, "extra ==" not in marker and "extra==" not in marker


def dependency_closure(root: str) -> list[str]:
    seen: dict[str, None] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = None
        for req in dist.requires or []:
            dep, needed = _requirement_name(req)
            if needed:
                todo.append(dep)
    return list(seen)


def dist_size(name: str) -> int:
    dist = metadata.distribution(name)
    total = 0
    for f in dist.files or []:
        with contextlib.suppress(OSError):
            total += dist.locate_file(f).stat().st_size
    return total


def install_footprint(root: str = "trt-bgswap") -> dict[str, Any]:
    sizes = {name: dist_size(name) for name in dependency_closure(root)}
    return {"total_bytes": sum(sizes.values()), "packages": dict(sorted(sizes.items(), key=lambda kv: -kv[1]))}


def _run(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    return time.perf_counter() - t0


def import_seconds(modules: tuple[str, ...] = IMPORT_MODULES, repeats: int = 3) -> dict[str, Any]:
    """Seconds a fresh interpreter spends importing each entry of ``modules`` (beyond starting up)."""
    bare = min(_run("pass") for _ in range(repeats))
    out: dict[str, Any] = {"interpreter_start": bare}
    for module in modules:
        out[module] = max(min(_run(f"import {module}") for _ in range(repeats)) - bare, 0.0)
    return out
