"""CPU fast path (engines/cpu_fast.py): fused and int8 graphs built, parity-checked, cached; the index makes the runtime use them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from skimage import data

from trt_bgswap.engines.cpu_fast import PARITY_RTOL, build_cpu_fast
from trt_bgswap.errors import UsageError
from trt_bgswap.manifest import Manifest


def test_build_cpu_fast_writes_the_index_the_runtime_reads(cpu_fast_build, tmp_path: Path) -> None:  # noqa: ANN001
    import shutil

    from trt_bgswap.runtime.pipeline import GenerationOptions, Pipeline

    # build_cpu_fast(rmbg_int8=True) on a copy of the tiny export, calibrated on two photos: the session's first build
    built, report, entries, photos = cpu_fast_build
    index = json.loads(report.index_path.read_text(encoding="utf-8"))
    assert set(index) == set(Manifest.load(built).models)
    assert index["unet"]["path"].endswith("model.fused.onnx") and index["unet"]["graph_optimization"] == "disable"
    assert index["rmbg"]["path"].endswith("model.int8.onnx")
    parity = entries["unet"].details
    # the build checked the fused graph itself (its own limit, PARITY_RTOL of the output's scale) and recorded it
    assert not entries["unet"].cache_hit and parity["parity_max_abs"]["out_sample"] <= PARITY_RTOL * max(parity["parity_ref_max_abs"]["out_sample"], 1.0)
    fused_ops = [n.op_type for n in onnx.load(str(entries["unet"].path), load_external_data=False).graph.node]
    assert "Resize" not in fused_ops and "DepthToSpace" in fused_ops, "the fused UNet upsamples on the small image (engines/upsample.py)"
    export = tmp_path / "export"  # built again in a copy: the shared folder stays as built
    shutil.copytree(built, export)
    _, again = build_cpu_fast(export, rmbg_int8=True, calibration_images=photos)
    assert all(e.cache_hit for e in again.values()), {k: e.cache_hit for k, e in again.items()}

    pipe = Pipeline.load(export, provider="cpu")
    paths = {k: str(e.path) for k, e in pipe.engines.items()}
    assert paths["unet"].endswith("model.fused.onnx"), paths
    rgb = data.astronaut()[::4, ::4].copy()
    r = pipe.replace(rgb, GenerationOptions("a beach", steps=2, seed=1, size=(128, 128)))
    assert r.image.shape == rgb.shape and np.isfinite(r.generated).all()


def test_unknown_model_is_refused(exported_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="rmbg"):
        build_cpu_fast(exported_dir, out_dir=tmp_path / "engines", fuse=("rmbg",))
