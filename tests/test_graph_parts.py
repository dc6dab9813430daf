"""``--low-memory`` runs a large graph in parts (trt_bgswap.graph_parts): only one part's weights in memory.

The parts are cut from the built (pre-optimized, contrib-op) UNet and share its external weights
file; running them in order must give the whole graph's outputs bit for bit, and a low-memory
pipeline on such a folder the default mode's image bit for bit. The tiny UNet is far below the
size the build cuts (PART_BYTES), so the tests cut it on purpose.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from skimage import data

from trt_bgswap.build_index import read_index
from page_residency import cached_fraction, evict
from trt_bgswap.engines.graph_split import MERGE_GAP, ensure_parts, split_graph, tensor_dtypes, weight_ranges
from trt_bgswap.graph_parts import parts_manifest_path, read_parts
from trt_bgswap.manifest import Manifest
from trt_bgswap.runtime.graph_parts_engine import PartsEngine
from trt_bgswap.runtime.ort_backend import OrtEngine
from trt_bgswap.runtime.pipeline import GenerationOptions, Pipeline
from trt_bgswap.runtime.residency import Residency

OPTIONS = GenerationOptions(prompt="a beach at dusk", steps=3, guidance=1.6, seed=5, size=(128, 64))
PARTS = 3


def photo() -> np.ndarray:
    return np.asarray(Image.fromarray(data.coffee()).convert("RGB").resize((140, 100), Image.Resampling.LANCZOS))


def built_unet(folder: Path) -> Path:
    entry = read_index(folder, "ort", "cpu")["unet"]
    return entry.resolve(folder / "engines")


@pytest.fixture(scope="module")
def parted_dir(built_cpu_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built tiny export with its UNet graph's weights moved to an external file (as the full-size one has), cut in 3."""
    folder = tmp_path_factory.mktemp("parts") / "export"
    shutil.copytree(built_cpu_dir, folder)
    unet = built_unet(folder)
    model = onnx.load(str(unet))
    onnx.save_model(model, str(unet), save_as_external_data=True, location=unet.name + ".data", size_threshold=1024)
    assert split_graph(unet, PARTS) is not None
    return folder


def test_the_parts_reference_the_weights_file_and_cover_the_graph(parted_dir: Path) -> None:
    unet = built_unet(parted_dir)
    parts = read_parts(unet)
    assert parts is not None and len(parts) == PARTS
    whole = onnx.load(str(unet), load_external_data=False)
    total = sum(p.weight_bytes for p in parts)
    assert total >= (unet.parent / (unet.name + ".data")).stat().st_size, "some weights are in no part"
    assert max(p.weight_bytes for p in parts) < 0.6 * total, f"unbalanced parts: {[p.weight_bytes for p in parts]}"
    nodes = 0
    for p in parts:
        g = onnx.load(str(unet.parent / p.file), load_external_data=False).graph
        nodes += len(g.node)
        inline = [t.name for t in g.initializer if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 1024]
        assert not inline, f"{p.file} holds weights instead of referencing the whole graph's file: {inline[:3]}"
    assert nodes == len(whole.graph.node)


def test_each_part_lists_the_weight_bytes_it_reads(parted_dir: Path) -> None:
    unet = built_unet(parted_dir)
    parts = read_parts(unet)
    assert parts is not None
    data = unet.name + ".data"
    for p in parts:
        assert p.weight_ranges and all(f == data for f, _, _ in p.weight_ranges), p.weight_ranges
        starts = [o for _, o, _ in p.weight_ranges]
        assert starts == sorted(starts) and all(a + n + MERGE_GAP <= b for (_, a, n), (_, b, _) in zip(p.weight_ranges, p.weight_ranges[1:]))
        for t in onnx.load(str(unet.parent / p.file), load_external_data=False).graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            ext = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
            lo, hi = ext.get("offset", 0), ext.get("offset", 0) + ext["length"]
            assert any(o <= lo and hi <= o + n for _, o, n in p.weight_ranges), f"{p.file}: {t.name} [{lo}, {hi}) is in no range"


def test_weight_ranges_merge_neighbours_per_file() -> None:
    def external(name: str, location: str, offset: int, length: int) -> onnx.TensorProto:
        t = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=[length // 4], data_location=onnx.TensorProto.EXTERNAL)
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        return t

    inline = onnx.numpy_helper.from_array(np.zeros(3, np.float32), "inline")
    inits = [external("c", "a.data", 5000, 100), external("a", "a.data", 0, 4096), external("b", "a.data", 4096 + 64, 400), external("d", "b.data", 0, 8), inline]
    assert weight_ranges(inits, merge_gap=1000) == (("a.data", 0, 5100), ("b.data", 0, 8))
    assert weight_ranges(inits, merge_gap=64) == (("a.data", 0, 4096), ("a.data", 4160, 400), ("a.data", 5000, 100), ("b.data", 0, 8))


def test_parts_without_weight_ranges_still_run(parted_dir: Path, tmp_path: Path) -> None:
    """A version-1 manifest (before the ranges) is read; the build cuts it again to add them."""
    folder = tmp_path / "export"
    shutil.copytree(parted_dir, folder)
    unet = built_unet(folder)
    path = parts_manifest_path(unet)
    d = json.loads(path.read_text())
    d["version"] = 1
    for p in d["parts"]:
        del p["weight_ranges"]
    path.write_text(json.dumps(d))
    old = read_parts(unet)
    assert old is not None and len(old) == PARTS and all(p.weight_ranges == () for p in old)
    ensure_parts([unet], part_bytes=sum(p.weight_bytes for p in old) // PARTS + 1)
    new = read_parts(unet)
    assert new is not None and all(p.weight_ranges for p in new)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore(2) and posix_fadvise: Linux")
def test_a_part_reads_its_own_weights_when_it_opens(parted_dir: Path, tmp_path: Path) -> None:
    """--low-memory with mapped weights: opening a part reads its ranges of the shared file, not the other parts'.

    Without the ranges nothing is read at open (a part names no weights file of its own; checked by hand)."""
    folder = tmp_path / "export"
    shutil.copytree(parted_dir, folder)
    unet = built_unet(folder)
    data = unet.parent / (unet.name + ".data")
    parts = read_parts(unet)
    assert parts is not None
    evict(data)
    if cached_fraction(data) > 0.1:
        pytest.skip(f"{tmp_path}'s file system keeps the file cached (tmpfs?): nothing to read ahead")
    spec = Manifest.load(folder).models["unet"].spec
    parted = OrtEngine(spec, unet, provider="cpu", intra_op_threads=1, prepack=False).low_memory_parts(Residency(0), "unet")
    assert isinstance(parted, PartsEngine)
    last = len(parts) - 1
    parted.parts[last].inner.load()  # what the residency does when the part's turn comes
    for _, offset, length in parts[last].weight_ranges:
        assert cached_fraction(data, offset, length) > 0.9
    # the bytes of the file in none of its ranges (other parts' weights) stay out of the cache
    size, outside, cached, at = data.stat().st_size, 0, 0.0, 0
    for _, offset, length in (*parts[last].weight_ranges, ("", size, 0)):
        if offset > at:
            outside += offset - at
            cached += cached_fraction(data, at, offset - at) * (offset - at)
        at = max(at, offset + length)
    assert outside > size / 3 and cached / outside < 0.2, (outside, cached)


def test_parts_in_order_equal_the_whole_graph(parted_dir: Path) -> None:
    unet = built_unet(parted_dir)
    spec = Manifest.load(parted_dir).models["unet"].spec
    residency = Residency(0)
    whole = OrtEngine(spec, unet, provider="cpu", intra_op_threads=2, graph_optimization="disable")
    parted = whole.low_memory_parts(residency, "unet")
    assert isinstance(parted, PartsEngine) and len(parted.parts) == PARTS
    rng = np.random.default_rng(0)
    cross = spec.inputs[2].shape  # (B, max_length, hidden) from the spec
    feeds = {
        "sample": rng.standard_normal((2, spec.inputs[0].shape[1], 8, 16), dtype=np.float32),
        "timestep": np.array([999.0, 500.0], np.float32).astype(spec.inputs[1].np_dtype),
        "encoder_hidden_states": rng.standard_normal((2, cross[1], cross[2]), dtype=np.float32),
    }
    want = whole.infer(feeds)
    got = parted.infer(feeds)
    np.testing.assert_array_equal(got["out_sample"], want["out_sample"])
    assert residency.loads == PARTS and sum(p.inner.session is not None for p in parted.parts) == 1, "one part open at a time"


def test_low_memory_pipeline_in_parts_is_bit_identical(parted_dir: Path) -> None:
    with Pipeline.load(parted_dir, provider="cpu", threads=2) as pipe:
        want = pipe.replace(photo(), OPTIONS)
    with Pipeline.load(parted_dir, provider="cpu", threads=2, low_memory=True) as pipe:
        assert isinstance(pipe.engines["unet"], PartsEngine)
        got = pipe.replace(photo(), OPTIONS)
        loads = pipe.stages.residency.loads
    np.testing.assert_array_equal(got.image, want.image)
    np.testing.assert_array_equal(got.generated, want.generated)
    # every UNet call opens each part again (one part's weights at a time); rmbg, text encoder, VAE once each
    assert loads == OPTIONS.steps * PARTS + len(Manifest.load(parted_dir).models) - 1, loads


def test_stale_parts_are_ignored(parted_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "export"
    shutil.copytree(parted_dir, folder)
    unet = built_unet(folder)
    model = onnx.load(str(unet), load_external_data=False)
    model.doc_string = "rebuilt"
    onnx.save_model(model, str(unet))
    with caplog.at_level(logging.WARNING):
        assert read_parts(unet) is None
    assert "made for another build" in caplog.text


def test_crossing_dtypes_follow_onnx_rules(parted_dir: Path) -> None:
    """Every tensor crossing a cut has the dtype ONNX Runtime gives it (checked by running: a wrong type fails to feed)."""
    unet = built_unet(parted_dir)
    types = tensor_dtypes(onnx.load(str(unet), load_external_data=False).graph)
    parts = read_parts(unet)
    assert parts is not None
    for p in parts:
        for name, dtype in (*p.inputs, *p.outputs):
            assert onnx.helper.tensor_dtype_to_np_dtype(types[name]) == np.dtype(dtype), name


def test_the_build_cuts_only_graphs_above_the_part_size(built_cpu_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    shutil.copytree(built_cpu_dir, folder)
    unet = built_unet(folder)
    weights = sum(int(np.prod(t.dims)) * 4 for t in onnx.load(str(unet)).graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    ensure_parts([unet])  # the tiny UNet is far below PART_BYTES: left whole
    assert not parts_manifest_path(unet).exists()
    ensure_parts([unet], part_bytes=weights // 2)
    parts = read_parts(unet)
    assert parts is not None and len(parts) >= 2


def test_a_new_cut_removes_the_previous_parts(parted_dir: Path, tmp_path: Path) -> None:
    """A rebuild cut into another number of parts leaves only its own part files beside the graph."""
    folder = tmp_path / "export"
    shutil.copytree(parted_dir, folder)
    unet = built_unet(folder)
    assert len(list(unet.parent.glob(f"{unet.name}.part*of{PARTS}.onnx"))) == PARTS
    parts = split_graph(unet, PARTS - 1)
    assert parts is not None and len(parts) == PARTS - 1
    assert sorted(p.name for p in unet.parent.glob(f"{unet.name}.part*of*.onnx")) == sorted(p.file for p in parts)
    assert read_parts(unet) is not None
