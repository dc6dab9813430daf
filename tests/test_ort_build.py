"""``build_engines(backend="ort")``: pre-optimized graphs that compute what the originals compute, a cache
reused on the second run and invalidated by each key part, and TensorRT/CUDA EP options."""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from engine_graphs import graph_for, mini_specs, random_feeds, save_graph, write_mini_export
from tolerance import assert_within, graph_tolerances

from trt_bgswap.engines.build import build_engines
from trt_bgswap.engines.cache import EngineCache, onnx_graph_hash
from trt_bgswap.engines.ort_build import (
    OPTIMIZED_NAME,
    TRT_EP_OPTIONS_NAME,
    host_fingerprint,
    onnxruntime_version,
    ort_key,
    tensorrt_provider_options,
)
from trt_bgswap.engines.profiles import GenerationShapes, model_profiles
from trt_bgswap.errors import BackendUnavailable, UsageError
from trt_bgswap.manifest import Manifest
from trt_bgswap.runtime.ort_backend import OrtEngine
from trt_bgswap.specs import pipeline_dims

SIZE = (64, 48)  # (width, height): non-square, a multiple of the mini export's size multiple (16)
MODELS = ("text_encoder", "unet", "vae_encoder", "vae_decoder", "rmbg")


@pytest.fixture()
def export(tmp_path: Path) -> Path:
    return write_mini_export(tmp_path / "export")


def dims_for(manifest: Manifest, model: str) -> dict[str, int]:
    dims = pipeline_dims(1, SIZE[1], SIZE[0], manifest.inpaint.vae_scale_factor)
    dims["S"] = manifest.rmbg.input_size[0]
    return dims


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith("index-")}


def assert_parity(manifest: Manifest, folder: Path, model: str, optimized: Path, level: str, prepack: bool = True) -> None:
    """The optimized graph, opened the way the runtime will open it, computes what the original computes.

    Fusions and layout changes re-order the arithmetic: the two may differ by the original
    graph's rounding noise on these inputs (:mod:`tolerance`), computed only if they differ at all.
    """
    spec = manifest.models[model].spec
    original = manifest.model_path(folder, model)
    feeds = random_feeds(spec, dims_for(manifest, model), seed=3)
    ref = OrtEngine(spec, original, provider="cpu", graph_optimization="disable")(**feeds)
    got = OrtEngine(spec, optimized, provider="cpu", graph_optimization=level, prepack=prepack)(**feeds)
    tols = functools.cache(lambda: graph_tolerances(original, feeds, ref))
    for name in spec.output_names:
        err = float(np.max(np.abs(got[name] - ref[name])))
        assert_within(err, lambda name=name: tols()[name], f"{model}.{name}: optimized graph vs the original")


def test_build_produces_artifacts_that_match_the_originals(export: Path) -> None:
    report = build_engines(export, backend="ort", provider="cpu", sizes=[SIZE])
    manifest = Manifest.load(export)
    assert sorted(report.models) == sorted(MODELS)
    assert sorted(report.rebuilt) == sorted(MODELS)
    assert report.index_path == export / "engines" / "index-ort-cpu.json" and report.index_path.is_file()
    for model, built in report.models.items():
        assert built.path == export / "engines" / model / OPTIMIZED_NAME and built.path.is_file()
        assert built.graph_optimization == "disable" and built.provider == "cpu"
        assert built.reasons == ("not built yet",)
        assert_parity(manifest, export, model, built.path, built.graph_optimization)
    # the UNet's weights live in external data: the optimized graph keeps them external, under a key-unique name
    unet_files = sorted(p.name for p in (export / "engines" / "unet").iterdir())
    assert any(n.startswith(OPTIMIZED_NAME + ".") and n.endswith(".data") for n in unet_files), unet_files


def _config_entry(session: ort.InferenceSession, key: str) -> str | None:
    try:
        return session.get_session_options().get_session_config_entry(key)
    except RuntimeError:  # ONNX Runtime raises for a key never set
        return None


def test_mapped_weights_run_unpacked_and_the_rest_prepacked(export: Path) -> None:
    """The UNet's weights are in a file: the index says to run them from the mapping, and the runtime's session does."""
    from trt_bgswap.build_index import ORT, read_index
    from trt_bgswap.runtime.loader import open_engines, resolve_backend

    build_engines(export, backend="ort", provider="cpu", sizes=[SIZE], models=["unet", "text_encoder"])
    index = read_index(export, ORT, "cpu")
    assert index is not None and {m: index[m].prepack for m in index} == {"unet": False, "text_encoder": True}
    manifest = Manifest.load(export)
    engines = open_engines(export, manifest, resolve_backend("cpu", announce=False), names=["unet", "text_encoder"]).engines
    for name, engine in engines.items():
        engine.load()
        assert _config_entry(engine.session, "session.disable_prepacking") == ("1" if name == "unet" else None), name
    assert_parity(manifest, export, "unet", index["unet"].resolve(export / "engines"), "disable", prepack=False)


def test_optimized_graph_really_is_optimized(export: Path) -> None:
    """Guards against a build that just copies the graph: ONNX Runtime's 'all' level rewrites the UNet."""
    import onnx

    report = build_engines(export, backend="ort", provider="cpu", sizes=[SIZE], models=["unet"])
    before = [n.op_type for n in onnx.load(str(export / "unet" / "model.onnx"), load_external_data=False).graph.node]
    after = [n.op_type for n in onnx.load(str(report.models["unet"].path), load_external_data=False).graph.node]
    assert before != after, after  # e.g. Conv+Relu fused, NCHWc layout nodes


def test_second_run_reuses_everything(export: Path, caplog: pytest.LogCaptureFixture) -> None:
    build_engines(export, backend="ort", sizes=[SIZE])
    before = mtimes(export / "engines")
    with caplog.at_level(logging.INFO, logger="trt_bgswap.engines"):
        report = build_engines(export, backend="ort", sizes=[SIZE])
    assert report.rebuilt == []
    assert all(m.cache_hit for m in report.models.values())
    assert mtimes(export / "engines") == before, "a cache hit rewrote files"
    assert "5 reused from the cache, 0 built" in caplog.text


def test_changed_graph_rebuilds_only_that_model_and_says_why(export: Path, caplog: pytest.LogCaptureFixture) -> None:
    build_engines(export, backend="ort", sizes=[SIZE])
    save_graph(graph_for(mini_specs()["vae_decoder"], seed=99), export / "vae_decoder" / "model.onnx")
    with caplog.at_level(logging.INFO, logger="trt_bgswap.engines"):
        report = build_engines(export, backend="ort", sizes=[SIZE])
    assert report.rebuilt == ["vae_decoder"]
    assert any(r.startswith("onnx changed") for r in report.models["vae_decoder"].reasons)
    assert "vae_decoder: cached model.optimized.onnx is stale: onnx changed" in caplog.text
    assert_parity(Manifest.load(export), export, "vae_decoder", report.models["vae_decoder"].path, "disable")


def test_changed_external_weights_rebuild_the_unet(export: Path) -> None:
    build_engines(export, backend="ort", sizes=[SIZE], models=["unet"])
    data = export / "unet" / "model.onnx_data"
    blob = bytearray(data.read_bytes())
    blob[-4:] = np.float32(7.0).tobytes()  # one weight changes; model.onnx itself is untouched
    data.write_bytes(bytes(blob))
    report = build_engines(export, backend="ort", sizes=[SIZE], models=["unet"])
    assert report.rebuilt == ["unet"] and report.models["unet"].reasons[0].startswith("onnx changed")
    assert_parity(Manifest.load(export), export, "unet", report.models["unet"].path, "disable")


@pytest.mark.parametrize("level", ["basic", "extended"])
def test_changed_optimization_level_rebuilds_everything(export: Path, level: str) -> None:
    build_engines(export, backend="ort", sizes=[SIZE], graph_optimization="all")
    report = build_engines(export, backend="ort", sizes=[SIZE], graph_optimization=level)
    assert sorted(report.rebuilt) == sorted(MODELS)
    for m in report.models.values():
        assert any(r.startswith("graph_optimization changed") for r in m.reasons), m.reasons
        assert any(r.startswith("host changed") for r in m.reasons), m.reasons  # 'all' was host specific, these are not
    assert_parity(Manifest.load(export), export, "unet", report.models["unet"].path, "disable")


def test_sizes_do_not_touch_cpu_artifacts(export: Path) -> None:
    """A CPU pre-optimized graph keeps its dynamic axes: a new --size must not force a rebuild."""
    build_engines(export, backend="ort", sizes=[SIZE])
    assert build_engines(export, backend="ort", sizes=[(128, 64)]).rebuilt == []


@pytest.mark.parametrize(
    "part, change",
    [
        ("onnxruntime", {"ort_version": "0.0.1"}),
        ("host", {"host": "riscv64:"}),
        ("provider", {"provider": "cuda"}),
    ],
)
def test_environment_key_parts_invalidate_a_built_entry(export: Path, part: str, change: dict) -> None:
    """ONNX Runtime version and host CPU cannot change on this machine; the built entry is checked against keys that differ."""
    report = build_engines(export, backend="ort", sizes=[SIZE], models=["unet"])
    manifest = Manifest.load(export)
    profiles = model_profiles(manifest.models["unet"].spec, GenerationShapes((SIZE,)), manifest.inpaint.vae_scale_factor)
    facts = {
        "onnx_hash": onnx_graph_hash(export / "unet" / "model.onnx"),
        "provider": "cpu",
        "level": "all",
        "precision": "fp16",
        "profiles": profiles,
        "opt_level": 3,
        "workspace_bytes": None,
        "ort_version": onnxruntime_version(),
        "host": host_fingerprint(),
    }
    cache = EngineCache(report.out_dir)
    assert cache.lookup("unet", OPTIMIZED_NAME, ort_key(**facts)).hit  # the same facts: reused
    facts.update(change)
    found = cache.lookup("unet", OPTIMIZED_NAME, ort_key(**facts))
    assert not found.hit and any(r.startswith(f"{part} changed") for r in found.reasons), found.reasons


# --- TensorRT execution provider: options and their cache entry (no GPU needed to produce them) ---


def test_tensorrt_ep_options_and_cache(export: Path) -> None:
    report = build_engines(export, backend="ort", provider="tensorrt", sizes=[SIZE, (128, 64)], batches=(1, 2))
    built = report.models["unet"]
    assert built.path == export / "unet" / "model.onnx"  # the EP gets the original graph
    assert report.index_path.name == "index-ort-tensorrt.json"
    opts = built.provider_options["TensorrtExecutionProvider"]
    f = Manifest.load(export).inpaint.vae_scale_factor
    # the envelope of 4 static profiles: batch 1..2, latent from the smaller to the larger size
    assert opts["trt_profile_min_shapes"] == f"sample:1x9x{SIZE[1] // f}x{SIZE[0] // f},timestep:1,encoder_hidden_states:1x8x16"
    assert opts["trt_profile_max_shapes"] == f"sample:2x9x{64 // f}x{128 // f},timestep:2,encoder_hidden_states:2x8x16"
    assert opts["trt_profile_opt_shapes"] == f"sample:1x9x{SIZE[1] // f}x{SIZE[0] // f},timestep:1,encoder_hidden_states:1x8x16"
    assert opts["trt_fp16_enable"] == "True" and opts["trt_engine_cache_enable"] == "True"
    engine_dir = Path(opts["trt_engine_cache_path"])
    assert engine_dir.is_dir() and Path(opts["trt_timing_cache_path"]).is_dir()
    assert "CUDAExecutionProvider" in built.provider_options
    assert (export / "engines" / "unet" / TRT_EP_OPTIONS_NAME).is_file()

    again = build_engines(export, backend="ort", provider="tensorrt", sizes=[SIZE, (128, 64)], batches=(1, 2))
    assert again.rebuilt == []

    # an engine the EP cached earlier must not survive a change of precision
    (engine_dir / "TensorrtExecutionProvider_cached.engine").write_bytes(b"stale engine")
    changed = build_engines(export, backend="ort", provider="tensorrt", sizes=[SIZE, (128, 64)], batches=(1, 2), precision="fp32")
    assert sorted(changed.rebuilt) == sorted(MODELS)
    assert any(r.startswith("precision changed") for r in changed.models["unet"].reasons)
    assert list(engine_dir.iterdir()) == []
    assert changed.models["unet"].provider_options["TensorrtExecutionProvider"]["trt_fp16_enable"] == "False"


@pytest.mark.parametrize(
    "change, part",
    [({"sizes": [(128, 64)]}, "profiles"), ({"opt_level": 5}, "builder"), ({"workspace_mb": 512}, "builder")],
)
def test_tensorrt_ep_key_parts(export: Path, change: dict, part: str) -> None:
    base = {"backend": "ort", "provider": "tensorrt", "sizes": [SIZE]}
    build_engines(export, **base)
    report = build_engines(export, **{**base, **change})
    assert "unet" in report.rebuilt
    assert any(r.startswith(f"{part} changed") for r in report.models["unet"].reasons), report.models["unet"].reasons


def test_tensorrt_ep_option_strings() -> None:
    spec = mini_specs()["vae_decoder"]
    (p,) = model_profiles(spec, GenerationShapes(((64, 64),), dynamic=((32, 32), (128, 96))), 8)
    opts = tensorrt_provider_options(Path("/e"), Path("/t"), "fp16", [p], 4, 1 << 30)
    assert opts["trt_profile_min_shapes"] == "latent_sample:1x4x4x4"
    assert opts["trt_profile_opt_shapes"] == "latent_sample:1x4x8x8"
    assert opts["trt_profile_max_shapes"] == "latent_sample:1x4x12x16"
    assert opts["trt_builder_optimization_level"] == "4" and opts["trt_max_workspace_size"] == str(1 << 30)
    assert all(isinstance(v, str) for v in opts.values())  # ONNX Runtime takes string options


def test_cuda_provider_needs_onnxruntime_gpu(export: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the error path cannot be exercised here")
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        build_engines(export, backend="ort", provider="cuda", sizes=[SIZE])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"backend": "tensorrt"}, "build supports trt, ort"),
        ({"provider": "rocm"}, "choose one of cpu, cuda, tensorrt"),
        ({"models": ["controlnet"]}, "not in"),
        ({"sizes": [(60, 48)]}, "multiple of 16"),
        ({"graph_optimization": "max"}, "basic, extended, all"),
    ],
)
def test_bad_arguments(export: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        build_engines(export, **kwargs)


def test_host_fingerprint_reads_isa_flags() -> None:
    x86 = "processor : 0\nflags : fpu sse avx avx2 fma avx512f foo\n"
    arm = "processor : 0\nFeatures : fp asimd asimdhp sve\n"
    assert host_fingerprint(x86).endswith(":avx,avx2,fma,avx512f")
    assert host_fingerprint(arm).endswith(":asimd,asimdhp,sve")


def test_real_export_builds_and_matches(exported_dir: Path, tmp_path: Path) -> None:
    """The real tiny export (PyTorch-exported graphs): optimized UNet and VAE decoder match the originals."""
    out = tmp_path / "engines"
    manifest = Manifest.load(exported_dir)
    size = (manifest.inpaint.size_multiple * 2, manifest.inpaint.size_multiple)
    models = ["unet", "vae_decoder"]
    report = build_engines(exported_dir, backend="ort", sizes=[size], models=models, out_dir=out)
    assert sorted(report.rebuilt) == models
    spec_dims = pipeline_dims(1, size[1], size[0], manifest.inpaint.vae_scale_factor)
    for model in models:
        spec = manifest.models[model].spec
        feeds = random_feeds(spec, spec_dims, seed=5)
        if model == "unet":
            feeds["timestep"] = np.full_like(feeds["timestep"], 500.0)
        original = manifest.model_path(exported_dir, model)
        ref = OrtEngine(spec, original, provider="cpu", graph_optimization="disable")(**feeds)
        got = OrtEngine(spec, report.models[model].path, provider="cpu", graph_optimization="disable")(**feeds)
        tols = graph_tolerances(original, feeds, ref)  # optimized = same function, re-ordered arithmetic: rounding only
        for name in spec.output_names:
            assert_within(float(np.max(np.abs(got[name] - ref[name]))), tols[name], f"{model}.{name}: optimized vs original")
    assert build_engines(exported_dir, backend="ort", sizes=[size], models=models, out_dir=out).rebuilt == []
    shutil.rmtree(out)
