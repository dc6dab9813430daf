"""Fusions (engines/fusion.py): fused graphs match the export at sizes and batches other than the pinned one.

The fusions are pinned at one size while optimizing; parity (engines/parity.py) is checked at
other sizes and batch 2 (classifier-free guidance), so a fused graph that secretly depends on
the pinned size fails here. Max abs errors are in the assertion messages.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

import pytest
from tolerance import assert_within, graph_tolerances

from trt_bgswap.engines.fusion import fuse_transformer
from trt_bgswap.engines.parity import max_abs_errors, random_feeds
from trt_bgswap.manifest import Manifest

PINNED = {"B": 1, "h": 16, "w": 16}  # the size the fusions are optimized at; parity is checked at others

Fused = Callable[[str, str], tuple[Path, dict[str, int]]]


@pytest.fixture(scope="module")
def fused_loaded(exported_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Fused:
    """``(model, model_type) -> (fused graph, fusion counts)``: ``fuse_transformer`` of the exported graph, weights in the
    proto, pinned at :data:`PINNED`; run once per model for all the tests below (the same call gives the same graph).
    Read-only: the tests open the fused file, never write it."""
    made: dict[tuple[str, str], tuple[Path, dict[str, int]]] = {}

    def fused(model: str, model_type: str) -> tuple[Path, dict[str, int]]:
        if (model, model_type) not in made:
            src = exported_dir / Manifest.load(exported_dir).models[model].file
            out = tmp_path_factory.mktemp(f"fused-{model}") / "fused.onnx"
            made[model, model_type] = out, fuse_transformer(src, out, model_type, PINNED, None)
        return made[model, model_type]

    return fused


@pytest.mark.parametrize(
    "model, model_type, dims, fused",
    [
        ("unet", "unet", {"B": 2, "h": 16, "w": 24}, "MultiHeadAttention"),
        ("unet", "unet", {"B": 1, "h": 8, "w": 8}, "SkipLayerNormalization"),
        ("text_encoder", "clip", {"B": 2}, "SkipLayerNormalization"),
    ],
)
def test_fused_graph_matches_export(exported_dir: Path, fused_loaded: Fused, model: str, model_type: str, dims: dict, fused: str) -> None:
    manifest = Manifest.load(exported_dir)
    src = exported_dir / manifest.models[model].file
    out, counts = fused_loaded(model, model_type)
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


@pytest.mark.parametrize("model, model_type", [("unet", "unet"), ("text_encoder", "clip")])
def test_fusing_with_weights_left_on_disk_gives_the_same_graph(exported_dir: Path, fused_loaded: Fused, tmp_path: Path, model: str, model_type: str) -> None:
    """Large weights stay on disk while the optimizer runs (the full SD1.5 UNet peaked at 20.3 GB with them loaded):
    the fused graph is the one fusing the loaded weights gives, node for node and weight for weight."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from trt_bgswap.engines.fusion import PARKED, park_large_weights

    entry = Manifest.load(exported_dir).models[model]
    loaded = onnx.load(str(exported_dir / entry.file))
    external = tmp_path / "external"
    external.mkdir()  # the layout of a full-size export: every weight in model.onnx_data
    onnx.save_model(loaded, str(external / "model.onnx"), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    light = onnx.load(str(external / "model.onnx"), load_external_data=False)
    park_above = 1024  # bytes: the tiny weights are far below the default threshold (1 MiB)
    parked = park_large_weights(light, external, park_above)
    assert parked, "the tiny graph has weights above the parking threshold"
    with pytest.raises(Exception, match=PARKED):  # a pass that reads a parked weight fails loudly, never on zeros
        numpy_helper.to_array(next(t for t in light.graph.initializer if t.name in parked))

    fuse_transformer(external / "model.onnx", tmp_path / "parked.onnx", model_type, PINNED, "parked.onnx.data", park_above)
    loaded_file, _ = fused_loaded(model, model_type)  # the same fusion with the weights in the proto
    a, b = onnx.load(str(tmp_path / "parked.onnx")), onnx.load(str(loaded_file))
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == [(n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
    weights_a = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    weights_b = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert weights_a.keys() == weights_b.keys()
    for name, value in weights_a.items():
        np.testing.assert_array_equal(value, weights_b[name], err_msg=name)
    feeds = random_feeds(entry.spec, {"B": 2, "h": 8, "w": 24})
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    for x, y in zip(run(tmp_path / "parked.onnx"), run(loaded_file)):
        np.testing.assert_array_equal(x, y)
