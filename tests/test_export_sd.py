"""Each exported SD graph vs its PyTorch source, same inputs, fp32 and fp16, batch 1 and 2, non-square sizes.

References: ``CLIPTextModel`` (last hidden state), ``UNet2DConditionModel`` with the LCM-LoRA
fused, diffusers' ``AutoencoderKL.encode`` posterior (mean, std) and ``AutoencoderKL.decode``.
Each output must match within the rounding noise of its graph on the same inputs
(:func:`tolerance.graph_tolerances`: every node's float32 or float16 rounding, propagated
through the network by Monte Carlo arithmetic): the ONNX graph and the PyTorch module compute
the same function, so they may differ by rounding and nothing else. fp16 graphs (run by ONNX
Runtime's CPU provider, fp32 I/O) carry float16 storage roundings at every node, hence their
looser bounds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from skimage import data
from tolerance import assert_within, graph_tolerances

from trt_bgswap.export import text_encoder as te_export
from trt_bgswap.export import unet as unet_export
from trt_bgswap.export import vae as vae_export
from trt_bgswap.export.onnx_export import DATA_FILE, MODEL_FILE
from trt_bgswap.onnx_graph import check_graph_against_spec
from trt_bgswap.manifest import Manifest

PROMPTS = ("a sunny beach with palm trees, photograph", "a snowy mountain village at dusk")
PHOTOS = (data.astronaut, data.chelsea)

# (model, batch, (height, width) in pixels); sizes are multiples of the tiny model's size multiple (64) for the UNet
CASES = [
    ("text_encoder", 1, None),
    ("text_encoder", 2, None),
    ("unet", 1, (64, 64)),
    ("unet", 2, (64, 128)),
    ("vae_encoder", 1, (64, 96)),
    ("vae_encoder", 2, (128, 64)),
    ("vae_decoder", 1, (64, 96)),
    ("vae_decoder", 2, (64, 64)),
]


@pytest.fixture(scope="module")
def fp16_dir(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp16 export of the SD models, the VAE included (the default keeps it fp32; here its fp16 path is tested)."""
    from trt_bgswap.export.exporter import export_models

    out = tmp_path_factory.mktemp("export-fp16") / "export"
    export_models(tiny_models_dir / "sd-inpainting", tiny_models_dir / "lcm-lora", None, out, precision="fp16", vae_precision="fp16")
    return out


@pytest.fixture(scope="module")
def torch_models(tiny_models_dir: Path) -> dict[str, torch.nn.Module]:
    src = tiny_models_dir / "sd-inpainting"
    vae = vae_export.load_vae(src)
    return {
        "text_encoder": te_export.wrap(te_export.load_text_encoder(src)),
        "unet": unet_export.wrap(unet_export.load_unet(src, tiny_models_dir / "lcm-lora")),
        "vae_encoder": vae_export.wrap_encoder(vae),
        "vae_decoder": vae_export.wrap_decoder(vae),
    }


@pytest.fixture(scope="module")
def sessions() -> dict[Path, ort.InferenceSession]:
    return {}


def _session(cache: dict[Path, ort.InferenceSession], path: Path) -> ort.InferenceSession:
    if path not in cache:
        cache[path] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return cache[path]


def _photo_batch(batch: int, size: tuple[int, int]) -> np.ndarray:
    """Real photos resized to (H, W), in [-1, 1], NCHW float32."""
    h, w = size
    imgs = [np.asarray(Image.fromarray(PHOTOS[i]()).resize((w, h), Image.BICUBIC), np.float32) / 127.5 - 1 for i in range(batch)]
    return np.stack(imgs).transpose(0, 3, 1, 2).copy()


def _inputs(model: str, batch: int, size: tuple[int, int] | None, manifest: Manifest, export_dir: Path) -> dict[str, np.ndarray]:
    cfg = manifest.inpaint
    assert cfg is not None
    rng = np.random.default_rng(7)
    if model == "text_encoder":
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(str(export_dir / cfg.tokenizer_dir))
        ids = tok(list(PROMPTS[:batch]), padding="max_length", max_length=cfg.max_length, truncation=True, return_tensors="np").input_ids
        return {"input_ids": ids.astype(np.int32)}
    assert size is not None
    h, w = size[0] // cfg.vae_scale_factor, size[1] // cfg.vae_scale_factor
    c = cfg.latent_channels
    if model == "unet":
        hidden = manifest.models["unet"].spec.tensor("encoder_hidden_states").shape[2]
        mask = (rng.random((batch, 1, h, w)) > 0.5).astype(np.float32)
        return {
            "sample": np.concatenate(
                [rng.standard_normal((batch, c, h, w)), mask, rng.standard_normal((batch, c, h, w)) * cfg.vae_scaling_factor], axis=1
            ).astype(np.float32),
            "timestep": np.array([999.0, 259.0][:batch], np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, cfg.max_length, hidden)).astype(np.float32),
        }
    if model == "vae_encoder":
        return {"sample": _photo_batch(batch, size)}
    return {"latent_sample": (rng.standard_normal((batch, c, h, w)) / cfg.vae_scaling_factor).astype(np.float32)}


def _reference(module: torch.nn.Module, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*(torch.from_numpy(feeds[n]) for n in names))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _errors(export_dir: Path, model: str, batch: int, size, torch_models, sessions) -> tuple[dict[str, float], dict[str, float]]:
    """Per output: (max abs error vs PyTorch, its rounding tolerance)."""
    manifest = Manifest.load(export_dir)
    entry = manifest.models[model]
    feeds = _inputs(model, batch, size, manifest, export_dir)
    got = _session(sessions, export_dir / entry.file).run(entry.spec.output_names, feeds)
    ref = _reference(torch_models[model], feeds, entry.spec.input_names)
    errs = {}
    for name, g, r in zip(entry.spec.output_names, got, ref):
        assert g.shape == r.shape, f"{model}.{name}: shape {g.shape} vs torch {r.shape}"
        assert np.isfinite(g).all(), f"{model}.{name}: non-finite values in the ONNX output"
        errs[name] = float(np.abs(g - r).max())
    # same function, two implementations: they differ by the graph's rounding noise on these inputs
    return errs, graph_tolerances(export_dir / entry.file, feeds, dict(zip(entry.spec.output_names, got)))


@pytest.mark.numerics
@pytest.mark.parametrize(("model", "batch", "size"), CASES)
def test_fp32_graph_matches_torch(exported_dir: Path, torch_models, sessions, model: str, batch: int, size) -> None:
    errs, tols = _errors(exported_dir, model, batch, size, torch_models, sessions)
    for name, err in errs.items():
        assert_within(err, tols[name], f"fp32 {model}.{name} batch {batch} size {size}")


@pytest.mark.numerics
@pytest.mark.parametrize(("model", "batch", "size"), [c for c in CASES if c[0] != "text_encoder"])
def test_built_cpu_graph_matches_torch(built_cpu_dir: Path, torch_models, model: str, batch: int, size) -> None:
    """What `trt-bgswap run` opens after `build` on the CPU: attention tiled (MultiHeadAttention, online softmax).

    Tolerance: the exported graph's rounding noise on these inputs (tolerance.graph_tolerances on
    the export's own model.onnx). The tiled kernel computes the same dot products (Q.K over the head
    size, P.V over the keys) and the same softmax sums as the exported MatMul -> Softmax -> MatMul,
    only in another order (a running max and rescaling per tile of keys): the same operations of the
    same lengths, so the same rounding model bounds it.
    """
    from trt_bgswap.build_index import ENGINES_DIR, ORT, read_index
    from trt_bgswap.runtime.ort_backend import OrtEngine

    manifest = Manifest.load(built_cpu_dir)
    entry = manifest.models[model]
    built = read_index(built_cpu_dir, ORT, "cpu")[model]
    assert built.attention == "bounded", f"{model}: the build left attention materialised"
    engine = OrtEngine(entry.spec, built.resolve(built_cpu_dir / ENGINES_DIR), provider="cpu", graph_optimization=built.graph_optimization)
    feeds = _inputs(model, batch, size, manifest, built_cpu_dir)
    got = engine(**feeds)
    tols = graph_tolerances(built_cpu_dir / entry.file, feeds)
    for name, ref in zip(entry.spec.output_names, _reference(torch_models[model], feeds, entry.spec.input_names)):
        assert_within(float(np.abs(got[name] - ref).max()), tols[name], f"built {model}.{name} batch {batch} size {size}")


@pytest.mark.parametrize(("model", "batch", "size"), CASES)
def test_fp16_graph_matches_torch(fp16_dir: Path, torch_models, sessions, model: str, batch: int, size) -> None:
    errs, tols = _errors(fp16_dir, model, batch, size, torch_models, sessions)
    for name, err in errs.items():
        assert_within(err, tols[name], f"fp16 {model}.{name} batch {batch} size {size}")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tolerance_sees_a_missing_lora(exported_dir: Path, fp16_dir: Path, tiny_models_dir: Path, sessions, precision: str) -> None:
    """The rounding tolerances are far below a real slip: the UNet graph vs PyTorch's UNet *without* the LCM-LoRA."""
    folder = exported_dir if precision == "fp32" else fp16_dir
    manifest = Manifest.load(folder)
    entry = manifest.models["unet"]
    feeds = _inputs("unet", 1, (64, 64), manifest, folder)
    got = _session(sessions, folder / entry.file).run(entry.spec.output_names, feeds)[0]
    (without_lora,) = _reference(unet_export.wrap(unet_export.load_unet(tiny_models_dir / "sd-inpainting")), feeds, entry.spec.input_names)
    err = float(np.abs(got - without_lora).max())
    tol = graph_tolerances(folder / entry.file, feeds, {"out_sample": got})["out_sample"]
    # fp32: four orders of magnitude; fp16 (float16 roundings at every node): still several times over
    assert err > (1e3 if precision == "fp32" else 2.0) * tol, f"{precision}: a missing LoRA moves out_sample by {err:.3g}, tolerance {tol:.3g}"


@pytest.mark.parametrize("model", ["text_encoder", "unet", "vae_encoder", "vae_decoder"])
def test_graph_io_follows_spec(exported_dir: Path, fp16_dir: Path, model: str) -> None:
    """Names, dtypes and fixed dims as the spec declares; every symbolic dim (B, h, w, H, W) left dynamic."""
    for folder, precision in ((exported_dir, "fp32"), (fp16_dir, "fp16")):
        entry = Manifest.load(folder).models[model]
        path = folder / entry.file
        check_graph_against_spec(path, entry.spec)
        graph = onnx.load(str(path), load_external_data=False).graph
        for value in (*graph.input, *graph.output):
            dims = value.type.tensor_type.shape.dim
            declared = entry.spec.tensor(value.name).shape
            assert [d.dim_param or d.dim_value for d in dims] == list(declared), f"{precision} {model}.{value.name}"
        onnx.checker.check_model(str(path))
        weights = onnx.load(str(path)).graph.initializer
        dtypes = {t.data_type for t in weights if t.dims and np.prod(t.dims) > 16}
        want = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
        assert want in dtypes, f"{precision} {model}: weight dtypes {dtypes}"
        if precision == "fp16":  # fp32 weights only where the graph keeps an fp32 island (mixed_precision)
            from trt_bgswap.mixed_precision import NORM_OPS, fp32_island_nodes

            model_proto = onnx.load(str(path))
            islands = set(fp32_island_nodes(model_proto, model)) | {n.name for n in model_proto.graph.node if n.op_type in NORM_OPS}
            fp32 = {t.name for t in model_proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims and np.prod(t.dims) > 16}
            outside = sorted({i for n in model_proto.graph.node if n.name not in islands for i in n.input if i in fp32})
            assert not outside, f"fp16 {model}: fp32 weight tensors read outside the fp32 islands: {outside[:5]}"


def test_external_data_unet(tiny_models_dir: Path, tmp_path: Path, torch_models) -> None:
    """The >2 GB path (forced here on the tiny UNet): weights in model.onnx_data, graph runs the same."""
    unet = unet_export.load_unet(tiny_models_dir / "sd-inpainting", tiny_models_dir / "lcm-lora")
    entry = unet_export.export_unet_module(unet, tmp_path / "unet", 77, external_data=True)
    graph_file, data_file = tmp_path / "unet" / MODEL_FILE, tmp_path / "unet" / DATA_FILE
    assert entry.file == f"unet/{MODEL_FILE}" and data_file.is_file()
    assert graph_file.stat().st_size < data_file.stat().st_size / 4, "weights should live in the data file"
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == [MODEL_FILE, DATA_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folders left behind"
    rng = np.random.default_rng(1)
    feeds = {
        "sample": rng.standard_normal((2, 9, 8, 16)).astype(np.float32),
        "timestep": np.array([500.0, 20.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32),
    }
    got = ort.InferenceSession(str(graph_file), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    (ref,) = _reference(torch_models["unet"], feeds, entry.spec.input_names)
    err = float(np.abs(got - ref).max())
    tol = graph_tolerances(graph_file, feeds, {"out_sample": got})["out_sample"]  # same function: rounding noise only
    assert_within(err, tol, "external-data unet out_sample")


def test_tiny_weights_are_not_degenerate(tiny_models_dir: Path) -> None:
    """No constant tensor (zero-initialised conv, unit norm scale) in the tiny weights: every layer matters."""
    from safetensors.numpy import load_file

    src = tiny_models_dir / "sd-inpainting"
    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        state = load_file(str(src / rel))
        constant = [k for k, v in state.items() if v.size > 1 and np.issubdtype(v.dtype, np.floating) and float(v.std()) == 0.0]
        assert not constant, f"{rel}: constant tensors {constant[:5]}"
