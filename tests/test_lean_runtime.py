"""The runtime must never pull in the heavy stack: it runs on numpy + a backend."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "peft", "huggingface_hub", "optimum", "tensorrt")

RUNTIME_MODULES = [
    "trt_bgswap",
    "trt_bgswap.specs",
    "trt_bgswap.manifest",
    "trt_bgswap.registry",
    "trt_bgswap.runtime.pipeline",
    "trt_bgswap.runtime.masker",
    "trt_bgswap.runtime.image_read",
    "trt_bgswap.runtime.image_write",
    "trt_bgswap.runtime.trt_backend",
    "trt_bgswap.api",
    "trt_bgswap.cli",
]


@pytest.mark.parametrize("module", RUNTIME_MODULES)
def test_module_imports_no_heavy_stack(module: str) -> None:
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"importing {module} failed:\n{proc.stderr}"
    assert proc.stdout.strip() == "", f"importing {module} pulled in heavy modules: {proc.stdout.strip()}"


def test_pipeline_run_imports_no_heavy_stack(exported_dir, tmp_path) -> None:
    """Not just the imports: a whole run in a fresh process leaves torch & co. unimported."""
    code = (
        "import sys, numpy as np\n"
        "from skimage import data\n"
        "from trt_bgswap.runtime.pipeline import Pipeline, GenerationOptions\n"
        f"p = Pipeline.load({str(exported_dir)!r}, provider='cpu')\n"
        "rgb = data.astronaut()[::4, ::4].copy()\n"
        "r = p.replace(rgb, GenerationOptions('a beach', steps=2, seed=1, size=(128, 128)))\n"
        "assert r.image.shape == rgb.shape\n"
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"a pipeline run imported: {proc.stdout.strip()}"
