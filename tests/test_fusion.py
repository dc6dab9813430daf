"""Fusions (engines/fusion.py): fused graphs match the export at sizes and batches other than the pinned one.

The fusions are pinned at one size while optimizing; parity (engines/parity.py) is checked at
other sizes and batch 2 (classifier-free guidance), so a fused graph that secretly depends on
the pinned size fails here. Max abs errors are in the assertion messages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import pytest
from tolerance import assert_within, graph_tolerances

from trt_bgswap.engines.fusion import fuse_transformer
from trt_bgswap.engines.parity import max_abs_errors, random_feeds
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


def test_attention_tiling_infers_shapes_without_the_weights(exported_dir: Path) -> None:
    """Shape inference runs on a weightless copy: the full-size UNet with its weights loaded (3.4 GB) is over
    protobuf's 2 GiB message limit, and `build --cpu-fast` failed there. Same tiling either way; weights untouched."""
    import onnx

    from trt_bgswap.engines.attention import WEIGHTLESS_ABOVE, _without_weight_data, bound_attention

    entry = Manifest.load(exported_dir).models["unet"]
    model = onnx.load(str(exported_dir / entry.file))
    light = _without_weight_data(model)
    sizes = {t.name: len(t.raw_data) for t in model.graph.initializer}
    for t in light.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        assert (n > WEIGHTLESS_ABOVE) == (t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data), t.name
    assert {t.name for t in light.graph.initializer} == set(sizes) and len(light.graph.node) == len(model.graph.node)
    before = [(t.name, t.raw_data) for t in model.graph.initializer]
    tiling = bound_attention(model)
    assert tiling.tiled and not tiling.left, tiling.left
    assert [(t.name, t.raw_data) for t in model.graph.initializer] == before, "tiling changed a weight"
