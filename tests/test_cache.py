"""The engine cache: reuse only on an identical key, say which part changed, never hand out a half-written entry."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from engine_graphs import graph_for, mini_specs, save_graph

from trt_bgswap.engines.cache import CacheKey, EngineCache, onnx_graph_hash, tensorrt_key
from trt_bgswap.onnx_graph import external_data_files
from trt_bgswap.engines.profiles import GenerationShapes, model_profiles
from trt_bgswap.engines.trt_build import TrtBuildOptions
from trt_bgswap.errors import ModelError

ARTIFACT = "model.plan"
UNET = mini_specs()["unet"]


def key_with(**changes: object) -> CacheKey:
    """A TensorRT key; ``changes`` override one fact at a time."""
    options = changes.pop("options", TrtBuildOptions())
    sizes = changes.pop("sizes", ((64, 64),))
    profiles = [p.to_json() for p in model_profiles(UNET, GenerationShapes(tuple(sizes)), 8)]  # type: ignore[arg-type]
    facts = {
        "onnx_hash": "a" * 64,
        "precision": options.precision,  # type: ignore[attr-defined]
        "profiles": profiles,
        "builder": options.key_parts(),  # type: ignore[attr-defined]
        "tensorrt_version": "10.1.0",
        "compute_capability": "8.6",
    }
    facts.update(changes)
    return tensorrt_key(**facts)  # type: ignore[arg-type]


def store_bytes(cache: EngineCache, key: CacheKey, data: bytes = b"plan-bytes") -> Path:
    def write(tmp: Path) -> list[str]:
        tmp.write_bytes(data)
        return []

    return cache.store("unet", ARTIFACT, key, write)


@pytest.fixture()
def cache(tmp_path: Path) -> EngineCache:
    return EngineCache(tmp_path / "engines")


def test_digest_is_stable_and_order_independent() -> None:
    a = CacheKey({"x": 1, "y": [1, 2], "z": {"b": 2, "a": 1}})
    b = CacheKey({"z": {"a": 1, "b": 2}, "y": (1, 2), "x": 1})
    assert a.digest == b.digest
    assert a.digest != CacheKey({"x": 2, "y": [1, 2], "z": {"b": 2, "a": 1}}).digest


def test_same_key_hits_after_store(cache: EngineCache) -> None:
    key = key_with()
    first = cache.lookup("unet", ARTIFACT, key)
    assert not first.hit and first.reasons == ("not built yet",)
    store_bytes(cache, key)
    again = cache.lookup("unet", ARTIFACT, key_with())
    assert again.hit, again.reasons
    assert again.path.read_bytes() == b"plan-bytes"


CHANGES = {
    "onnx": {"onnx_hash": "b" * 64},
    "precision": {"options": TrtBuildOptions(precision="fp32")},
    "profiles": {"sizes": ((64, 128),)},
    "builder": {"options": TrtBuildOptions(opt_level=5)},
    "builder ": {"options": TrtBuildOptions(workspace_bytes=1 << 30)},
    "builder  ": {"options": TrtBuildOptions(tf32=False)},
    "builder   ": {"options": TrtBuildOptions(timing_cache=False)},
    "tensorrt": {"tensorrt_version": "10.3.0"},
    "compute_capability": {"compute_capability": "8.9"},
}


@pytest.mark.parametrize("part", list(CHANGES))
def test_every_key_part_invalidates_and_is_named(cache: EngineCache, part: str, caplog: pytest.LogCaptureFixture) -> None:
    store_bytes(cache, key_with())
    with caplog.at_level(logging.INFO, logger="trt_bgswap.engines.cache"):
        found = cache.lookup("unet", ARTIFACT, key_with(**CHANGES[part]))
    assert not found.hit
    named = part.strip()
    assert any(r.startswith(f"{named} changed") for r in found.reasons), found.reasons
    if named == "precision":  # fp32 also clears the FP16 builder flag
        assert any(r.startswith("builder changed") for r in found.reasons), found.reasons
    assert "stale" in caplog.text and f"{named} changed" in caplog.text


def test_stale_reason_shows_small_values(cache: EngineCache) -> None:
    store_bytes(cache, key_with())
    found = cache.lookup("unet", ARTIFACT, key_with(tensorrt_version="10.3.0"))
    assert 'tensorrt changed: "10.1.0" -> "10.3.0"' in found.reasons


def test_interrupted_rebuild_never_leaves_a_loadable_entry(cache: EngineCache) -> None:
    old = key_with()
    store_bytes(cache, old, b"old plan")
    new = key_with(tensorrt_version="10.3.0")

    def crash(tmp: Path) -> list[str]:
        tmp.write_bytes(b"half a pl")
        raise KeyboardInterrupt  # e.g. Ctrl-C mid-build

    with pytest.raises(KeyboardInterrupt):
        cache.store("unet", ARTIFACT, new, crash)
    # the temp file is gone, the old plan untouched but no longer vouched for by a sidecar
    assert [p.name for p in cache.path("unet", ARTIFACT).parent.iterdir()] == [ARTIFACT]
    assert cache.path("unet", ARTIFACT).read_bytes() == b"old plan"
    for key in (old, new):
        found = cache.lookup("unet", ARTIFACT, key)
        assert not found.hit and "no sidecar" in found.reasons[0]


def test_crash_on_a_fresh_entry_leaves_nothing(cache: EngineCache) -> None:
    def crash(tmp: Path) -> list[str]:
        tmp.write_bytes(b"partial")
        (tmp.parent / EngineCache.companion_name(ARTIFACT, key_with(), ".data")).write_bytes(b"partial weights")
        raise RuntimeError("builder died")

    with pytest.raises(RuntimeError):
        cache.store("unet", ARTIFACT, key_with(), crash)
    assert list(cache.path("unet", ARTIFACT).parent.iterdir()) == []


def test_truncated_artifact_is_stale(cache: EngineCache) -> None:
    path = store_bytes(cache, key_with(), b"0123456789")
    path.write_bytes(b"01234")
    found = cache.lookup("unet", ARTIFACT, key_with())
    assert not found.hit and "5 bytes but was written as 10" in found.reasons[0]


def test_same_size_tampering_is_caught_when_verifying_hashes(tmp_path: Path) -> None:
    fast, careful = EngineCache(tmp_path), EngineCache(tmp_path, verify_hashes=True)
    path = store_bytes(fast, key_with(), b"0123456789")
    path.write_bytes(b"9876543210")
    assert fast.lookup("unet", ARTIFACT, key_with()).hit  # sizes only: cheap for multi-GB plans
    found = careful.lookup("unet", ARTIFACT, key_with())
    assert not found.hit and "modified after it was built" in found.reasons[0]


@pytest.mark.parametrize("sidecar_text", ["", "{not json", json.dumps({"format": 999, "key": {}, "files": {}})])
def test_unreadable_or_foreign_sidecar_is_stale(cache: EngineCache, sidecar_text: str) -> None:
    store_bytes(cache, key_with())
    cache.sidecar("unet", ARTIFACT).write_text(sidecar_text)
    found = cache.lookup("unet", ARTIFACT, key_with())
    assert not found.hit and "unreadable or of another format" in found.reasons[0]


def test_companion_files_are_checked_and_replaced(cache: EngineCache) -> None:
    def writer(payload: bytes, key: CacheKey):  # noqa: ANN202
        def write(tmp: Path) -> list[str]:
            name = EngineCache.companion_name(ARTIFACT, key, ".data")
            (tmp.parent / name).write_bytes(payload)
            tmp.write_bytes(b"graph")
            return [name]

        return write

    k1, k2 = key_with(), key_with(onnx_hash="c" * 64)
    cache.store("unet", ARTIFACT, k1, writer(b"w1", k1))
    d1 = cache.path("unet", EngineCache.companion_name(ARTIFACT, k1, ".data"))
    assert d1.is_file() and cache.lookup("unet", ARTIFACT, k1).hit
    d1.unlink()
    missing = cache.lookup("unet", ARTIFACT, k1)
    assert not missing.hit and f"{d1.name} is missing" in missing.reasons
    cache.store("unet", ARTIFACT, k2, writer(b"w2", k2))
    d2 = cache.path("unet", EngineCache.companion_name(ARTIFACT, k2, ".data"))
    assert d2.read_bytes() == b"w2" and cache.lookup("unet", ARTIFACT, k2).hit


def test_companions_of_a_replaced_entry_are_removed(cache: EngineCache) -> None:
    def write_with(key: CacheKey):  # noqa: ANN202
        def write(tmp: Path) -> list[str]:
            name = EngineCache.companion_name(ARTIFACT, key, ".data")
            (tmp.parent / name).write_bytes(b"w")
            tmp.write_bytes(b"g")
            return [name]

        return write

    k1, k2 = key_with(), key_with(precision="fp32")
    cache.store("unet", ARTIFACT, k1, write_with(k1))
    cache.store("unet", ARTIFACT, k2, write_with(k2))
    names = sorted(p.name for p in cache.path("unet", ARTIFACT).parent.iterdir())
    assert names == sorted([ARTIFACT, ARTIFACT + ".json", EngineCache.companion_name(ARTIFACT, k2, ".data")])


# --- the ONNX graph hash covers the graph and its external weights ---


def test_graph_hash_changes_with_the_graph(tmp_path: Path) -> None:
    a = save_graph(graph_for(UNET, seed=0), tmp_path / "a" / "model.onnx")
    b = save_graph(graph_for(UNET, seed=0), tmp_path / "b" / "model.onnx")
    c = save_graph(graph_for(UNET, seed=1), tmp_path / "c" / "model.onnx")
    assert onnx_graph_hash(a) == onnx_graph_hash(b)
    assert onnx_graph_hash(a) != onnx_graph_hash(c)


def test_graph_hash_covers_external_data(tmp_path: Path) -> None:
    path = save_graph(graph_for(UNET), tmp_path / "model.onnx", external=True)
    (data,) = external_data_files(path)
    assert data.name == "model.onnx_data" and data.is_file()
    before = onnx_graph_hash(path)
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one weight byte; the graph file itself is unchanged
    data.write_bytes(bytes(blob))
    assert onnx_graph_hash(path) != before


def test_graph_hash_refuses_missing_external_data(tmp_path: Path) -> None:
    path = save_graph(graph_for(UNET), tmp_path / "model.onnx", external=True)
    (tmp_path / "model.onnx_data").unlink()
    with pytest.raises(ModelError, match="model.onnx_data is missing"):
        onnx_graph_hash(path)


def test_graph_hash_of_a_corrupt_file_is_a_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\xff\xff\xff garbage")
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        onnx_graph_hash(bad)


def test_a_failed_rebuild_leaves_no_orphaned_weights(cache: EngineCache) -> None:
    """A rebuild that fails (an exception in the builder) un-vouches the old entry; its weights file goes with it,
    since no later build would know it (a full UNet's companion is 3.5 GB)."""
    k1, k2 = key_with(), key_with(precision="fp32")

    def write_k1(tmp: Path) -> list[str]:
        name = EngineCache.companion_name(ARTIFACT, k1, ".data")
        (tmp.parent / name).write_bytes(b"weights")
        tmp.write_bytes(b"graph")
        return [name]

    def crash(tmp: Path) -> list[str]:
        (tmp.parent / EngineCache.companion_name(ARTIFACT, k2, ".data")).write_bytes(b"half")
        raise ValueError("the builder refused a weights file")

    cache.store("unet", ARTIFACT, k1, write_k1)
    with pytest.raises(ValueError):
        cache.store("unet", ARTIFACT, k2, crash)
    assert [p.name for p in cache.path("unet", ARTIFACT).parent.iterdir()] == [ARTIFACT]
    assert not cache.lookup("unet", ARTIFACT, k1).hit
