"""The runtime opens what `trt-bgswap build` made, and falls back clearly when it is absent."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
from skimage import data
from tolerance import NOISE_SAMPLES, assert_within, network_tolerance, noisy_pipeline

from trt_bgswap.errors import BackendUnavailable, ModelError
from trt_bgswap.manifest import Manifest
from trt_bgswap.runtime.backends import Availability, BackendChoice
from trt_bgswap.runtime.loader import open_engines, resolve_backend
from trt_bgswap.runtime.pipeline import GenerationOptions, Pipeline, Result

NO_GPU = Availability(cuda_devices=0, tensorrt=False, ort_providers=("CPUExecutionProvider",))


def test_pipeline_uses_preoptimized_graphs(built_cpu_dir: Path, exported_dir: Path, tmp_path: Path) -> None:
    plain = Pipeline.load(exported_dir, provider="cpu")
    fast = Pipeline.load(built_cpu_dir, provider="cpu")  # a copy of exported_dir after `build` for ONNX Runtime on the CPU
    engines_dir = (built_cpu_dir / "engines").resolve()
    for name, engine in fast.engines.items():
        assert engines_dir in engine.path.resolve().parents, f"{name} opened {engine.path}, not the built graph"
    assert engines_dir in fast.stages.masker.engine.path.resolve().parents
    rgb = data.chelsea()[::2, ::2].copy()
    opts = GenerationOptions("a garden", steps=2, seed=3, size=(128, 128))
    a = plain.replace(rgb, opts)
    b = fast.replace(rgb, opts)
    # optimized graphs compute the same functions with other kernels and fusions: rounding noise only
    @functools.cache
    def noisy() -> list[Result]:
        pipe = noisy_pipeline(exported_dir, tmp_path / "noisy")
        return [pipe.replace(rgb, opts) for _ in range(NOISE_SAMPLES)]

    generated_err, alpha_err = float(np.abs(a.generated - b.generated).max()), float(np.abs(a.alpha - b.alpha).max())
    assert_within(generated_err, lambda: network_tolerance(a.generated, [n.generated for n in noisy()]), "pre-optimized graphs: generated image")
    assert_within(alpha_err, lambda: network_tolerance(a.alpha, [n.alpha for n in noisy()]), "pre-optimized graphs: alpha")


def test_without_build_opens_exported_graphs(exported_dir: Path) -> None:
    manifest = Manifest.load(exported_dir)
    engines = open_engines(exported_dir, manifest, BackendChoice("cpu", "ort", "cpu", "test"))
    assert {k: e.path for k, e in engines.engines.items()} == {k: exported_dir / v.file for k, v in manifest.models.items()}


def test_trt_without_plans_names_the_build_command(exported_dir: Path) -> None:
    manifest = Manifest.load(exported_dir)
    with pytest.raises(ModelError, match="trt-bgswap build .* --backend trt"):
        open_engines(exported_dir, manifest, BackendChoice("trt", "trt", None, "test"))


@pytest.mark.parametrize("provider, expected", [("auto", "cpu"), ("cpu", "cpu")])
def test_provider_names_map_to_backends(provider: str, expected: str) -> None:
    assert resolve_backend(provider, NO_GPU).name == expected


@pytest.mark.parametrize("provider", ["trt", "cuda", "tensorrt"])
def test_unavailable_backend_is_an_error_not_a_fallback(provider: str) -> None:
    with pytest.raises(BackendUnavailable, match="pip install|auto"):
        resolve_backend(provider, NO_GPU)


@pytest.fixture(scope="module")
def fused_dir(device_export_dir: Path) -> Path:
    """The tiny models exported with the fused step graph (the session's, tests/conftest.py; the device graphs beside it go unused here)."""
    return device_export_dir


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_pipeline_with_fused_step_graph_matches_host_loop(fused_dir: Path, exported_dir: Path, guidance: float, tmp_path: Path) -> None:
    host = Pipeline.load(exported_dir, provider="cpu")
    fused = Pipeline.load(fused_dir, provider="cpu")
    assert "unet_step" in fused.engines and "unet_step" not in host.engines
    rgb = data.coffee()[::3, ::3].copy()
    mask = np.full(rgb.shape[:2], 255, np.uint8)
    mask[40:120, 60:160] = 0
    opts = GenerationOptions("a wooden table", steps=4, guidance=guidance, seed=9, size=(192, 128))
    got = fused.inpaint(rgb, mask, opts)

    def tol() -> float:  # the same UNet and LCM step arithmetic in other graphs: the whole loop's rounding noise
        noisy = noisy_pipeline(fused_dir, tmp_path / "noisy")
        return network_tolerance(got, [noisy.inpaint(rgb, mask, opts) for _ in range(NOISE_SAMPLES)])

    assert_within(float(np.abs(host.inpaint(rgb, mask, opts) - got).max()), tol, f"guidance={guidance}: fused step graph vs host loop")


def test_cli_build_cpu_fast_is_what_run_opens(cpu_fast_build, tmp_path: Path) -> None:  # noqa: ANN001
    """`build --cpu-fast --rmbg-int8` writes the index the runtime reads: run opens the fused and int8 graphs.

    On a copy of the session's cpu-fast build without its index (tests/conftest.py; test_cpu_fast.py checks that
    first build): the command finds the fused graphs in the engine cache, quantizes the RMBG for its own calibration
    photos, and must write the index itself."""
    from PIL import Image

    from trt_bgswap.cli import main

    built, report, _, _ = cpu_fast_build
    folder = tmp_path / "export"
    shutil.copytree(built, folder)
    (folder / report.index_path.relative_to(built)).unlink()
    photos = tmp_path / "calib"
    photos.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()[::4, ::4]).save(photos / f"{name}.png")
    assert main(["-q", "build", str(folder), "--cpu-fast", "--rmbg-int8", "--calibration", str(photos)]) == 0
    p = Pipeline.load(folder, provider="cpu")
    assert p.engines["unet"].path.name == "model.fused.onnx"
    assert p.stages.masker.engine.path.name == "model.int8.onnx"
    r = p.replace(data.chelsea()[::2, ::2].copy(), GenerationOptions("a garden", steps=1, seed=1, size=(128, 128)))
    assert r.image.shape == (150, 226, 3)
    assert main(["-q", "build", str(folder), "--rmbg-int8"]) == 2  # calibration photos are required
