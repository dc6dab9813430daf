"""Shared session fixtures: the tiny offline models and their fp32 export.

Other test files rely on these names; keep them stable.

- ``tiny_models_dir`` -> Path with ``sd-inpainting/`` (diffusers SD1.5-inpainting layout),
  ``lcm-lora/`` (``pytorch_lora_weights.safetensors`` in lcm-lora-sdv1-5's format) and
  ``rmbg/`` (RMBG-1.4's layout), all random seeded weights from
  :func:`trt_bgswap.export.tiny.write_tiny_models`. Read-only: copy before modifying.
- ``exported_dir`` -> Path of :func:`trt_bgswap.export.exporter.export_models` run on all of
  it in fp32 (opset 17, LoRA fused at scale 1): ``manifest.json``, the five ``model.onnx``
  graphs and ``tokenizer/``. Read-only as well.
- ``built_cpu_dir`` -> a copy of it built for ONNX Runtime on the CPU (``engines/index-ort-cpu.json``,
  attention tiled). Read-only.

Both are built once per session (a few seconds on CPU).

- ``trt_gpu`` -> skips (with the reason) unless tensorrt, cuda-python and a CUDA device are all
  present; session-scoped, so it runs before (and so skips) any session-scoped export.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trt_bgswap.export.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    write_tiny_models(root, seed=0)
    return root


@pytest.fixture(scope="session")
def exported_dir(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trt_bgswap.export.exporter import export_models

    out = tmp_path_factory.mktemp("exported") / "export"
    export_models(
        tiny_models_dir / "sd-inpainting",
        tiny_models_dir / "lcm-lora",
        tiny_models_dir / "rmbg",
        out,
        precision="fp32",
        opset=17,
    )
    return out


@pytest.fixture(scope="session")
def exported_tiny_vae_dir(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models exported with ``--vae tiny``: the tiny TAESD encodes and decodes (issue 15)."""
    from trt_bgswap.export.exporter import export_models

    out = tmp_path_factory.mktemp("exported-tiny-vae") / "export"
    export_models(
        tiny_models_dir / "sd-inpainting", tiny_models_dir / "lcm-lora", tiny_models_dir / "rmbg", out,
        precision="fp32", opset=17, tiny_vae_src=tiny_models_dir / "taesd",
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def built_cpu_dir(exported_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``exported_dir`` after ``trt-bgswap build`` for ONNX Runtime on the CPU: the graphs the
    runtime then opens, attention tiled by ``com.microsoft.MultiHeadAttention`` (engines/attention.py)."""
    import shutil

    from trt_bgswap.engines.build import build_engines

    folder = tmp_path_factory.mktemp("built-cpu") / "export"
    shutil.copytree(exported_dir, folder)
    build_engines(folder, backend="ort", provider="cpu")
    return folder


@pytest.fixture(scope="session")
def trt_gpu() -> None:
    """Skip (with the reason) unless tensorrt, cuda-python and a CUDA device are all present."""
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("needs TensorRT: the tensorrt package is not installed (pip install 'trt-bgswap[trt]' on a GPU machine)")
    if importlib.util.find_spec("cuda") is None:
        pytest.skip("needs cuda-python (pip install 'trt-bgswap[trt]')")
    from trt_bgswap.runtime.cuda_device import device_count_via_driver

    if device_count_via_driver() < 1:
        pytest.skip("needs an NVIDIA GPU: no CUDA device visible to the driver")


# --- the TensorRT / cuda-python emulation (tests/emulation): `emulated_stack`, `emulated` ----------
from emulation.fixtures import emulated, emulated_stack  # noqa: E402,F401  (fixtures shared by every test module)
