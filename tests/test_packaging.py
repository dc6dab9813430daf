"""The installed package, not the source tree: a non-editable install used from the repository root (issue 9).

With the top-level package under src/, the root holds no ``trt_bgswap/`` folder, so Python run from
the root (sys.path[0] is the root, or '' for ``-c``) finds the installed package with every mapped
sub-package (runtime, engines, export, training, cli, server). Installed with ``--target`` into a
temporary folder: the build runs for real (setuptools, package-dir mapping, package data), without
a second multi-GB environment.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ["trt_bgswap", "trt_bgswap.cli", "trt_bgswap.runtime", "trt_bgswap.engines", "trt_bgswap.export", "trt_bgswap.training", "trt_bgswap.benchmarking", "trt_bgswap.server"]


def test_non_editable_install_imports_every_subpackage_from_the_repository_root(tmp_path: Path) -> None:
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    code = (
        "import importlib, json, sys\n"
        # the root first, as `python -c` from it puts it; then the install: the root would win if it could shadow
        f"sys.path[:0] = ['', {str(target)!r}]\n"
        f"mods = {{m: importlib.import_module(m).__file__ for m in {SUBPACKAGES!r}}}\n"
        "import importlib.resources as r\n"
        "page = r.files('trt_bgswap.server.static').joinpath('index.html').is_file()\n"
        "print(json.dumps({'files': mods, 'page': page}))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for module, file in out["files"].items():
        assert file.startswith(str(target)), f"{module} came from {file}, not the installed package in {target}"
    assert out["page"], "the try-it page's files were not installed as package data"


@pytest.mark.parametrize("module", ["trt_bgswap", "trt_bgswap.cli"])
def test_python_dash_m_runs_the_cli(module: str) -> None:
    """`python -m trt_bgswap` and `python -m trt_bgswap.cli` are the console script (where no launcher is installed)."""
    from trt_bgswap import __version__

    proc = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and __version__ in proc.stdout + proc.stderr, proc.stderr
