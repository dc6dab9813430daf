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
  attention tiled, 3x3 convolutions as Winograd: every CPU build of the suite rewrites all of them). Read-only.
- ``device_export_dir`` -> the same sources exported with ``fused_step=True`` and ``device_graphs=True``:
  ``exported_dir``'s graphs plus ``unet_step/`` and the three device graphs. Read-only.
- ``tiny_rmbg_dir`` -> ``RMBG-1.4-tiny/``: :func:`trt_bgswap.export.tiny_rmbg.write_tiny_rmbg` with seed 0 alone
  (RMBG-1.4's published files, ``onnx/`` included), for test_rmbg.py and test_masker.py. Read-only.
- ``cpu_fast_build`` -> ``(folder, report, entries, photos)``: a copy of ``exported_dir`` after its first
  ``build_cpu_fast(rmbg_int8=True)`` (fused UNet and text encoder, int8 RMBG calibrated on ``photos``), what that
  build returned, and the calibration photos. Read-only: build again in a copy (the engine cache is keyed by
  content, so a copy finds what was built).
- ``sdxl_export`` -> ``(folder, process)``: ``tiny_models_dir``'s ``sdxl-inpainting/``, ``lcm-lora-sdxl/`` and
  ``rmbg/`` exported by the installed ``trt-bgswap export`` in its own process with no other flag (fp32, opset 17:
  the defaults), and that finished process. Read-only.

Each is built once per session (a few seconds on CPU), when a test first asks for it. Every
folder handed out here is checked at the end of the session: a test that wrote into one
(instead of into its own copy) fails there, since the next test would see its changes.

Under pytest-xdist (``scripts/test.sh`` runs ``-n auto``) every worker is a session of its own: :func:`shared`
builds each of these folders once per test run, in the run's common temporary folder, for all workers.

- ``trt_gpu`` -> skips (with the reason) unless tensorrt, cuda-python and a CUDA device are all
  present; session-scoped, so it runs before (and so skips) any session-scoped export.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

# Every CPU build in the suite (in this process and the CLI processes it starts) rewrites all plain 3x3
# convolutions as Winograd F(2x2, 3x3): the product does it only from 320 channels (engines/winograd.py),
# which the tiny models never reach, so without this no parity test would run the rewritten graphs.
os.environ.setdefault("TRT_BGSWAP_WINOGRAD_MIN_CHANNELS", "1")


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def read_only(folder: Path) -> Iterator[Path]:
    """Yield ``folder``; afterwards fail if any file in it was added, removed or rewritten (copy a shared folder to change it)."""
    before = _listing(folder)
    yield folder
    after = _listing(folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test changed the shared read-only folder {folder}: {changed[:10]}"


T = TypeVar("T")


def shared(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], T]) -> T:
    """``build(folder)`` in a new empty folder, once per test run; what it returned (pickled for the other workers).

    Why: pytest-xdist runs each worker as its own session, so every worker would repeat each session fixture's export
    (10-30 s each on 2 cores), doubling the suite's setup. The first worker to ask builds under an exclusive lock in
    the run's common temporary folder; the others wait for it and reuse the folder. A build that raised left no
    result, so the next worker to ask builds again (in a clean folder) and meets the same error."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent / "shared"
    root.mkdir(exist_ok=True)
    folder, result = root / name, root / f"{name}.pickle"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if result.exists():
            return pickle.loads(result.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        value = build(folder)
        partial = root / f"{name}.pickle.partial"
        partial.write_bytes(pickle.dumps(value))
        partial.replace(result)
        return value


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from trt_bgswap.export.tiny import write_tiny_models

    def build(root: Path) -> Path:
        write_tiny_models(root, seed=0)
        return root

    yield from read_only(shared(tmp_path_factory, "tiny-models", build))


@pytest.fixture(scope="session")
def tiny_rmbg_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from trt_bgswap.export.tiny_rmbg import write_tiny_rmbg

    yield from read_only(shared(tmp_path_factory, "rmbg", lambda root: write_tiny_rmbg(root / "RMBG-1.4-tiny", seed=0)))


@pytest.fixture(scope="session")
def exported_dir(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from trt_bgswap.export.exporter import export_models

    def build(root: Path) -> Path:
        out = root / "export"
        export_models(tiny_models_dir / "sd-inpainting", tiny_models_dir / "lcm-lora", tiny_models_dir / "rmbg", out, precision="fp32", opset=17)
        return out

    yield from read_only(shared(tmp_path_factory, "exported", build))


@pytest.fixture(scope="session")
def device_export_dir(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny models exported with the fused step (``unet_step/``) and the device graphs (``vae_encoder_sample/``,
    ``vae_decoder_image/``, ``rmbg_full/``): one export for every test of those graphs (tests/test_device_chain.py,
    test_loader.py, test_unet_step.py)."""
    from trt_bgswap.export.exporter import export_models

    def build(root: Path) -> Path:
        out = root / "export"
        export_models(
            tiny_models_dir / "sd-inpainting", tiny_models_dir / "lcm-lora", tiny_models_dir / "rmbg", out,
            precision="fp32", opset=17, fused_step=True, device_graphs=True,
        )  # fmt: skip
        return out

    yield from read_only(shared(tmp_path_factory, "device-export", build))


@pytest.fixture(scope="session")
def sdxl_export(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, subprocess.CompletedProcess[str]]]:
    """The SDXL family's one export per session, made as a new user makes it (issue 12): test_sdxl_cli.py checks the command,
    test_sdxl_pipeline.py checks the graphs it wrote against diffusers."""
    from test_run_command import trt_bgswap

    def build(root: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
        out = root / "sdxl-export"
        models = [("--inpaint", "sdxl-inpainting"), ("--lcm-lora", "lcm-lora-sdxl"), ("--rmbg", "rmbg")]
        proc = trt_bgswap("export", *(a for flag, name in models for a in (flag, tiny_models_dir / name)), "--out", out, home=root / "home")
        assert proc.returncode == 0, proc.stderr[-2000:]
        return out, proc

    out, proc = shared(tmp_path_factory, "sdxl-export", build)
    for folder in read_only(out):
        yield folder, proc


@pytest.fixture(scope="session")
def exported_tiny_vae_dir(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny models exported with ``--vae tiny``: the tiny TAESD encodes and decodes (issue 15)."""
    from trt_bgswap.export.exporter import export_models

    def build(root: Path) -> Path:
        out = root / "export"
        export_models(
            tiny_models_dir / "sd-inpainting", tiny_models_dir / "lcm-lora", tiny_models_dir / "rmbg", out,
            precision="fp32", opset=17, tiny_vae_src=tiny_models_dir / "taesd",
        )  # fmt: skip
        return out

    yield from read_only(shared(tmp_path_factory, "exported-tiny-vae", build))


@pytest.fixture(scope="session")
def built_cpu_dir(exported_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of ``exported_dir`` after ``trt-bgswap build`` for ONNX Runtime on the CPU: the graphs the
    runtime then opens, attention tiled by ``com.microsoft.MultiHeadAttention`` (engines/attention.py)."""
    from trt_bgswap.engines.build import build_engines

    def build(root: Path) -> Path:
        folder = root / "export"
        shutil.copytree(exported_dir, folder)
        build_engines(folder, backend="ort", provider="cpu")
        return folder

    yield from read_only(shared(tmp_path_factory, "built-cpu", build))


@pytest.fixture(scope="session")
def cpu_fast_build(exported_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, object, dict, list]]:
    """`build --cpu-fast --rmbg-int8` once per session: test_cpu_fast.py checks this first build (nothing cached yet),
    test_loader.py runs the command on a copy (the fusions then come from the cache, the int8 RMBG is calibrated anew)."""
    from skimage import data

    from trt_bgswap.engines.cpu_fast import build_cpu_fast

    def build(root: Path) -> tuple[Path, object, dict, list]:
        folder = root / "export"
        shutil.copytree(exported_dir, folder)
        photos = [data.chelsea(), data.coffee()]
        report, entries = build_cpu_fast(folder, rmbg_int8=True, calibration_images=photos)
        return folder, report, entries, photos

    folder, report, entries, photos = shared(tmp_path_factory, "cpu-fast", build)
    for built in read_only(folder):
        yield built, report, entries, photos


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
