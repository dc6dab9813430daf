"""CPU fast path (engines/optimize.py): fused graphs match the export; the index makes the runtime use them.

The fusions are pinned at one size while optimizing; parity is checked at other sizes and
batch 2 (classifier-free guidance), so a fused graph that secretly depends on the pinned
size fails here. Max abs errors are in the assertion messages.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from skimage import data
from tolerance import assert_within, graph_tolerances

from trt_bgswap.engines.optimize import PARITY_RTOL, build_cpu_fast, fuse_transformer, max_abs_errors, random_feeds
from trt_bgswap.errors import UsageError
from trt_bgswap.manifest import Manifest


@pytest.mark.parametrize(
    "model, model_type, dims, fused",
    [
        ("unet", "unet", {"B": 2, "h": 16, "w": 24}, "MultiHeadAttention"),
        ("unet", "unet", {"B": 1, "h": 8, "w": 8}, "SkipLayerNormalization"),
        ("text_encoder", "clip", {"B": 2}, "SkipLayerNormalization"),
    ],
)
def test_fused_graph_matches_export(exported_dir: Path, tmp_path: Path, model: str, model_type: str, dims: dict, fused: str) -> None:
    manifest = Manifest.load(exported_dir)
    src = exported_dir / manifest.models[model].file
    out = tmp_path / "fused.onnx"
    counts = fuse_transformer(src, out, model_type, {"B": 1, "h": 16, "w": 16}, None)
    assert counts.get(fused, 0) > 0, f"{model}: no {fused} fused ({counts})"
    # every attention is tiled (engines/attention.py) before the optimizer, whose own contrib Attention holds the scores
    assert "Attention" not in counts, f"{model}: contrib Attention fused ({counts})"
    feeds = random_feeds(manifest.models[model].spec, dims)
    errors = max_abs_errors(src, out, feeds, candidate_level="all")
    tols = graph_tolerances(src, feeds)  # fused attention / layer norms compute the same function: rounding only
    for name, err in errors.items():
        assert_within(err, tols[name], f"{model}.{name} at {dims}: fused vs export")


def test_build_cpu_fast_writes_the_index_the_runtime_reads(exported_dir: Path, tmp_path: Path) -> None:
    import shutil

    from trt_bgswap.runtime.pipeline import GenerationOptions, Pipeline

    export = tmp_path / "export"
    shutil.copytree(exported_dir, export)
    photos = [data.chelsea(), data.coffee()]
    report, entries = build_cpu_fast(export, rmbg_int8=True, calibration_images=photos)
    index = json.loads(report.index_path.read_text(encoding="utf-8"))
    assert set(index) == set(Manifest.load(export).models)
    assert index["unet"]["path"].endswith("model.fused.onnx") and index["unet"]["graph_optimization"] == "disable"
    assert index["rmbg"]["path"].endswith("model.int8.onnx")
    parity = entries["unet"].details
    # the build checked the fused graph itself (its own limit, PARITY_RTOL of the output's scale) and recorded it
    assert not entries["unet"].cache_hit and parity["parity_max_abs"]["out_sample"] <= PARITY_RTOL * max(parity["parity_ref_max_abs"]["out_sample"], 1.0)
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
