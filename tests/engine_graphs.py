"""Small ONNX graphs with the built-in models' I/O specs, and a mini export folder made of them.

Built with ``onnx.helper`` in milliseconds, so engine-layer tests (profiles,
cache, ONNX Runtime pre-optimization, TensorRT parser checks, TensorRT parity on
a GPU) do not wait for the tiny PyTorch export. Each graph has the real
tensor names, dtypes and dynamic axes of its spec and a little real compute
(convolutions, a gather, reductions) that ONNX Runtime's optimizers rewrite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trt_bgswap.manifest import InpaintConfig, Manifest, ModelEntry, RmbgConfig, sha256_file
from trt_bgswap.specs import ModelSpec, rmbg_spec, text_encoder_spec, unet_spec, vae_decoder_spec, vae_encoder_spec

OPSET = 17
MAX_LENGTH = 8
HIDDEN = 16
VOCAB = 50
LATENT = 4
VAE_FACTOR = 8
RMBG_SIDE = 32

ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int32": TensorProto.INT32}


def _value_info(spec_tensor) -> onnx.ValueInfoProto:  # noqa: ANN001 - a TensorSpec
    return helper.make_tensor_value_info(spec_tensor.name, ONNX_TYPES[spec_tensor.dtype], list(spec_tensor.shape))


def _init(name: str, rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.2) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _const_i64(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def graph_for(spec: ModelSpec, seed: int = 0) -> onnx.ModelProto:
    """A small graph computing something real with exactly ``spec``'s inputs and outputs."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    if spec.name == "text_encoder":
        inits.append(_init("embed", rng, (VOCAB, HIDDEN)))
        nodes += [
            helper.make_node("Gather", ["embed", "input_ids"], ["tok"], name="embed_lookup"),
            helper.make_node("LayerNormalization", ["tok", "ln_w", "ln_b"], ["last_hidden_state"], axis=-1, name="ln"),
        ]
        inits += [_init("ln_w", rng, (HIDDEN,)), _init("ln_b", rng, (HIDDEN,))]
    elif spec.name == "unet":
        in_ch, out_ch = spec.inputs[0].shape[1], spec.outputs[0].shape[1]
        inits += [_init("w1", rng, (8, in_ch, 3, 3)), _init("b1", rng, (8,)), _init("w2", rng, (out_ch, 8, 3, 3))]
        inits += [_const_i64("axes123", [1, 2, 3]), _const_i64("axes3", [3])]
        nodes += [
            helper.make_node("Conv", ["sample", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
            helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
            helper.make_node("Unsqueeze", ["timestep", "axes123"], ["t4"], name="t4"),
            helper.make_node("ReduceMean", ["encoder_hidden_states"], ["e3"], axes=[1, 2], keepdims=1, name="emean"),
            helper.make_node("Unsqueeze", ["e3", "axes3"], ["e4"], name="e4"),
            helper.make_node("Mul", ["t4", "e4"], ["te"], name="te"),
            helper.make_node("Add", ["c2", "te"], ["out_sample"], name="add"),
        ]
    elif spec.name == "vae_encoder":
        inits += [_init("wm", rng, (LATENT, 3, VAE_FACTOR, VAE_FACTOR), 0.05), _init("ws", rng, (LATENT, 3, VAE_FACTOR, VAE_FACTOR), 0.05)]
        nodes += [
            helper.make_node("Conv", ["sample", "wm"], ["latent_mean"], strides=[VAE_FACTOR, VAE_FACTOR], name="mean"),
            helper.make_node("Conv", ["sample", "ws"], ["logstd"], strides=[VAE_FACTOR, VAE_FACTOR], name="logstd"),
            helper.make_node("Exp", ["logstd"], ["latent_std"], name="std"),
        ]
    elif spec.name == "vae_decoder":
        inits += [_init("wd", rng, (LATENT, 3, VAE_FACTOR, VAE_FACTOR), 0.1), _init("bd", rng, (3,))]
        nodes += [
            helper.make_node("ConvTranspose", ["latent_sample", "wd", "bd"], ["up"], strides=[VAE_FACTOR, VAE_FACTOR], name="up"),
            helper.make_node("Tanh", ["up"], ["sample"], name="tanh"),
        ]
    elif spec.name == "rmbg":
        inits += [_init("wr", rng, (1, 3, 3, 3)), _init("br", rng, (1,))]
        nodes += [
            helper.make_node("Conv", [spec.inputs[0].name, "wr", "br"], ["logit"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Sigmoid", ["logit"], [spec.outputs[0].name], name="sigmoid"),
        ]
    else:
        raise ValueError(f"no test graph for {spec.name}")
    graph = helper.make_graph(
        nodes, spec.name, [_value_info(t) for t in spec.inputs], [_value_info(t) for t in spec.outputs], initializer=inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="trt-bgswap-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save_graph(model: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + "_data", size_threshold=256
        )
    else:
        onnx.save_model(model, str(path))
    return path


def mini_specs() -> dict[str, ModelSpec]:
    return {
        "text_encoder": text_encoder_spec(MAX_LENGTH, HIDDEN),
        "unet": unet_spec(2 * LATENT + 1, LATENT, MAX_LENGTH, HIDDEN),
        "vae_encoder": vae_encoder_spec(3, LATENT),
        "vae_decoder": vae_decoder_spec(3, LATENT),
        "rmbg": rmbg_spec(None),  # dynamic side S, fixed by the RMBG config at build time
    }


def write_mini_export(folder: Path, external_unet: bool = True, seed: int = 0) -> Path:
    """An exported folder (manifest + five graphs) in the layout of :mod:`trt_bgswap.manifest`."""
    models = {}
    for i, (name, spec) in enumerate(mini_specs().items()):
        path = save_graph(graph_for(spec, seed + i), folder / name / "model.onnx", external=external_unet and name == "unet")
        models[name] = ModelEntry(f"{name}/model.onnx", sha256_file(path), "fp32", spec)
    inpaint = InpaintConfig(
        vae_scaling_factor=0.18215,
        vae_shift_factor=None,
        vae_scale_factor=VAE_FACTOR,
        latent_channels=LATENT,
        unet_in_channels=2 * LATENT + 1,
        size_multiple=2 * VAE_FACTOR,
        default_size=64,
        max_length=MAX_LENGTH,
        scheduler={},
    )
    rmbg = RmbgConfig((RMBG_SIDE, RMBG_SIDE), (0.5, 0.5, 0.5), (1.0, 1.0, 1.0), "input", "output")
    Manifest(precision="fp32", opset=OPSET, models=models, inpaint=inpaint, rmbg=rmbg).save(folder)
    return folder


def random_feeds(spec: ModelSpec, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ``spec`` at ``dims``: token ids in the vocabulary, floats in a sane range."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec.inputs:
        shape = t.resolve(dims)
        if t.dtype == "int32":
            feeds[t.name] = rng.integers(0, VOCAB, size=shape).astype(np.int32)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.np_dtype)
    return feeds
