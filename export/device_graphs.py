"""Device-graph variants: the host arithmetic around the VAE and RMBG moved into their ONNX graphs.

The default pipeline does small numpy steps between graphs (``runtime/pipeline.py``,
``runtime/masker.py``); on TensorRT each one would cost a device -> host -> device round
trip. These variants wrap the *already exported* graphs (so the network part is the very
graph the host path runs) with ONNX nodes that do the same arithmetic in the same order:

- ``vae_encoder_sample``: ``(mean + std * eps [- shift]) * scaling_factor``, the posterior
  draw of diffusers' ``DiagonalGaussianDistribution.sample`` with the pipeline's scaling
  (``StableDiffusionInpaintPipeline._encode_vae_image``), constants from the VAE config;
- ``vae_decoder_image``: ``latents / scaling_factor [+ shift]``, the decoder, then
  ``clamp(x / 2 + 0.5, 0, 1)`` (``VaeImageProcessor.denormalize``);
- ``rmbg_full``: BRIA's RMBG-1.4 reference pre/post-processing (``utilities.py`` of
  briaai/RMBG-1.4): bilinear resize to the net's size (ONNX ``Resize`` linear with
  ``half_pixel`` = torch ``align_corners=False``, no antialias), ``x / 255``, mean/std,
  the net's main output, bilinear resize back, min-max normalisation per image (a constant
  prediction is clipped to [0, 1] instead of dividing by zero, as the masker does).
  The photo goes in as uint8 NHWC (what the image decoder yields): no host transpose or
  float conversion, and a quarter of a float32 upload.

Composition works on any source of the inner graph (exported from weights or a published
ONNX file), at the inner graph's own opset. Weights are copied into the new graphs
(the host-path graphs stay for ONNX Runtime's default path).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trt_bgswap.errors import ModelError
from trt_bgswap.export.onnx_export import DATA_FILE, EXTERNAL_DATA_THRESHOLD, MODEL_FILE
from trt_bgswap.manifest import InpaintConfig, ModelEntry, RmbgConfig, sha256_file
from trt_bgswap.onnx_graph import check_graph_against_spec, opset_of, prune_to_outputs, value_info
from trt_bgswap.specs import RMBG_FULL, VAE_DECODER_IMAGE, VAE_ENCODER_SAMPLE, ModelSpec, rmbg_full_spec, vae_decoder_image_spec, vae_encoder_sample_spec

log = logging.getLogger(__name__)

PREFIX = "dg_"  # every tensor the wrappers add is named dg_*; a clash with the inner graph is refused
PIXEL_SCALE = 255.0  # RMBG's reference divides 0..255 pixels by 255 (runtime.masker.PIXEL_SCALE)
MIN_OPSET = 11  # Resize's half_pixel mode and Clip's min/max inputs


def _const(name: str, value: Any, dtype: Any = np.float32) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def wrap_graph(
    model: Any,
    spec: ModelSpec,
    kept_inputs: Sequence[str],
    pre: Sequence[Any],
    post: Sequence[Any],
    constants: Sequence[Any],
) -> Any:
    """A copy of ``model`` with ``pre`` nodes feeding it and ``post`` nodes reading it; I/O as ``spec`` declares.

    ``kept_inputs`` are inner-graph inputs that stay graph inputs (same names); every other
    inner input must be produced by ``pre``. Inner outputs become internal tensors.
    """
    import onnx

    g = model.graph
    existing = {v.name for v in (*g.input, *g.output, *g.value_info)} | {t.name for t in g.initializer}
    existing |= {n for node in g.node for n in (*node.input, *node.output)}
    added = {o for node in (*pre, *post) for o in node.output} | {c.name for c in constants}
    new_io = {t.name for t in (*spec.inputs, *spec.outputs)} - set(kept_inputs)
    clash = sorted((added | new_io) & existing - {v.name for v in g.input if v.name not in kept_inputs})
    if clash:
        raise ModelError(f"{spec.name}: the wrapper's tensor names {clash} already exist in the inner graph; rename them")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    og = out.graph
    inner_inputs = {v.name: v for v in g.input}
    nodes = [*pre, *g.node, *post]
    inputs = [inner_inputs[t.name] if t.name in kept_inputs else value_info(t) for t in spec.inputs]
    for field in ("node", "input", "output"):
        og.ClearField(field)
    og.node.extend(nodes)
    og.input.extend(inputs)
    og.output.extend(value_info(t) for t in spec.outputs)
    og.initializer.extend(constants)
    og.name = spec.name
    return prune_to_outputs(out, spec.output_names)  # drops side outputs' nodes and weights


def vae_encoder_sample_graph(encoder: Any, cfg: InpaintConfig) -> tuple[Any, ModelSpec]:
    """The exported ``vae_encoder`` graph + ``(mean + std * eps [- shift]) * scaling_factor``."""
    from onnx import helper

    spec = vae_encoder_sample_spec(_channels(encoder, "sample"), cfg.latent_channels)
    n = helper.make_node
    consts = [_const(f"{PREFIX}scaling", cfg.vae_scaling_factor)]
    post = [n("Mul", ["latent_std", "eps"], [f"{PREFIX}std_eps"]), n("Add", ["latent_mean", f"{PREFIX}std_eps"], [f"{PREFIX}z"])]
    z = f"{PREFIX}z"
    if cfg.vae_shift_factor is not None:
        consts.append(_const(f"{PREFIX}shift", cfg.vae_shift_factor))
        post.append(n("Sub", [z, f"{PREFIX}shift"], [f"{PREFIX}z_shifted"]))
        z = f"{PREFIX}z_shifted"
    post.append(n("Mul", [z, f"{PREFIX}scaling"], ["masked_image_latents"]))
    return wrap_graph(encoder, spec, ["sample"], [], post, consts), spec


def vae_decoder_image_graph(decoder: Any, cfg: InpaintConfig) -> tuple[Any, ModelSpec]:
    """``latents / scaling_factor [+ shift]`` + the exported ``vae_decoder`` graph + ``clamp(x / 2 + 0.5, 0, 1)``."""
    from onnx import helper

    spec = vae_decoder_image_spec(_channels(decoder, "sample", output=True), cfg.latent_channels)
    n = helper.make_node
    consts = [_const(f"{PREFIX}scaling", cfg.vae_scaling_factor), _const(f"{PREFIX}two", 2.0), _const(f"{PREFIX}half", 0.5)]
    consts += [_const(f"{PREFIX}zero", 0.0), _const(f"{PREFIX}one", 1.0)]
    if cfg.vae_shift_factor is None:
        pre = [n("Div", ["latents", f"{PREFIX}scaling"], ["latent_sample"])]
    else:
        consts.append(_const(f"{PREFIX}shift", cfg.vae_shift_factor))
        pre = [n("Div", ["latents", f"{PREFIX}scaling"], [f"{PREFIX}unscaled"]), n("Add", [f"{PREFIX}unscaled", f"{PREFIX}shift"], ["latent_sample"])]
    post = [
        n("Div", ["sample", f"{PREFIX}two"], [f"{PREFIX}halved"]),
        n("Add", [f"{PREFIX}halved", f"{PREFIX}half"], [f"{PREFIX}shifted"]),
        n("Clip", [f"{PREFIX}shifted", f"{PREFIX}zero", f"{PREFIX}one"], ["image"]),
    ]
    return wrap_graph(decoder, spec, [], pre, post, consts), spec


def _resize(opset: int, x: str, sizes: str, out: str, consts: list[Any]) -> Any:
    """Bilinear resize to ``sizes`` as torch's ``interpolate(mode="bilinear", align_corners=False)``."""
    from onnx import helper

    if opset >= 13:
        roi, scales = "", ""  # optional inputs left out (the pattern torch.onnx emits)
    else:  # opset 11/12: roi and scales are positional; empty tensors mean "use sizes"
        roi, scales = f"{PREFIX}roi", f"{PREFIX}scales"
        if not any(c.name == roi for c in consts):
            consts += [_const(roi, np.zeros(0)), _const(scales, np.zeros(0))]
    return helper.make_node("Resize", [x, roi, scales, sizes], [out], mode="linear", coordinate_transformation_mode="half_pixel")


def _reduce(op: str, opset: int, x: str, out: str, axes: str) -> Any:
    from onnx import helper

    if opset >= 18:
        return helper.make_node(op, [x, axes], [out], keepdims=1)
    return helper.make_node(op, [x], [out], axes=[1, 2, 3], keepdims=1)


def rmbg_full_graph(rmbg: Any, cfg: RmbgConfig) -> tuple[Any, ModelSpec]:
    """uint8 (B, PH, PW, 3) photo -> float32 (B, 1, PH, PW) alpha: RMBG-1.4's reference steps around the net."""
    from onnx import helper

    opset = opset_of(rmbg)
    if opset < MIN_OPSET:
        raise ModelError(f"the RMBG graph has opset {opset}; rmbg_full needs >= {MIN_OPSET} (Resize half_pixel); re-export it")
    inner_in = next(v for v in rmbg.graph.input if v.name == cfg.input_name)
    batch_dim = inner_in.type.tensor_type.shape.dim[0]
    batch: int | str = batch_dim.dim_value if batch_dim.HasField("dim_value") and batch_dim.dim_value > 0 else "B"
    spec = rmbg_full_spec(batch)
    p = PREFIX
    n = helper.make_node
    side_h, side_w = cfg.input_size
    consts = [
        _const(f"{p}scale", PIXEL_SCALE),
        _const(f"{p}mean", np.reshape(cfg.mean, (1, 3, 1, 1))),
        _const(f"{p}std", np.reshape(cfg.std, (1, 3, 1, 1))),
        _const(f"{p}net_hw", [side_h, side_w], np.int64),
        _const(f"{p}i0", [0], np.int64),
        _const(f"{p}i2", [2], np.int64),
        _const(f"{p}i4", [4], np.int64),
        _const(f"{p}axes", [1, 2, 3], np.int64),
        _const(f"{p}zero", 0.0),
        _const(f"{p}one", 1.0),
    ]
    pre = [
        n("Cast", ["image"], [f"{p}hwc"], to=1),  # uint8 -> float32 first: TensorRT transposes/resizes floats only
        n("Transpose", [f"{p}hwc"], [f"{p}x"], perm=[0, 3, 1, 2]),
        n("Shape", [f"{p}x"], [f"{p}shape"]),
        n("Slice", [f"{p}shape", f"{p}i0", f"{p}i2"], [f"{p}nc"]),
        n("Slice", [f"{p}shape", f"{p}i2", f"{p}i4"], [f"{p}hw"]),
        n("Concat", [f"{p}nc", f"{p}net_hw"], [f"{p}net_sizes"], axis=0),
    ]
    pre.append(_resize(opset, f"{p}x", f"{p}net_sizes", f"{p}small", consts))
    pre += [
        n("Div", [f"{p}small", f"{p}scale"], [f"{p}unit"]),
        n("Sub", [f"{p}unit", f"{p}mean"], [f"{p}centred"]),
        n("Div", [f"{p}centred", f"{p}std"], [cfg.input_name]),
    ]
    out = cfg.output_name
    post = [
        n("Shape", [out], [f"{p}mask_shape"]),
        n("Slice", [f"{p}mask_shape", f"{p}i0", f"{p}i2"], [f"{p}mask_nc"]),
        n("Concat", [f"{p}mask_nc", f"{p}hw"], [f"{p}full_sizes"], axis=0),
        _resize(opset, out, f"{p}full_sizes", f"{p}y", consts),
        _reduce("ReduceMin", opset, f"{p}y", f"{p}lo", f"{p}axes"),
        _reduce("ReduceMax", opset, f"{p}y", f"{p}hi", f"{p}axes"),
        n("Sub", [f"{p}hi", f"{p}lo"], [f"{p}range"]),
        n("Greater", [f"{p}hi", f"{p}lo"], [f"{p}varies"]),
        n("Where", [f"{p}varies", f"{p}range", f"{p}one"], [f"{p}denom"]),  # never divide by zero
        n("Sub", [f"{p}y", f"{p}lo"], [f"{p}y0"]),
        n("Div", [f"{p}y0", f"{p}denom"], [f"{p}norm"]),
        n("Clip", [f"{p}y", f"{p}zero", f"{p}one"], [f"{p}flat"]),  # a constant prediction, clipped (masker's guard)
        n("Where", [f"{p}varies", f"{p}norm", f"{p}flat"], ["alpha"]),
    ]
    return wrap_graph(rmbg, spec, [], pre, post, consts), spec


def _channels(model: Any, name: str, output: bool = False) -> int:
    values = model.graph.output if output else model.graph.input
    for v in values:
        if v.name == name:
            d = v.type.tensor_type.shape.dim[1]
            if d.HasField("dim_value") and d.dim_value > 0:
                return int(d.dim_value)
    raise ModelError(f"graph {model.graph.name!r}: no {name!r} {'output' if output else 'input'} with a fixed channel count")


def save_graph(model: Any, spec: ModelSpec, out_dir: Path, precision: str) -> ModelEntry:
    """Check ``model`` (checker, strict shape inference, spec) and write ``out_dir/model.onnx`` atomically."""
    import onnx

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    external = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
    try:
        staged = stage / MODEL_FILE
        onnx.save_model(model, str(staged), save_as_external_data=external, all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=0)
        try:
            onnx.checker.check_model(str(staged), full_check=False)
            onnx.shape_inference.infer_shapes_path(str(staged), str(stage / "inferred.onnx"), check_type=True, strict_mode=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise ModelError(f"{spec.name}: the composed graph is invalid ({str(e).splitlines()[0]})") from e
        check_graph_against_spec(staged, spec)
        out_dir.mkdir(parents=True, exist_ok=True)
        if external:  # data first, graph last: a model.onnx never points at a missing data file
            os.replace(stage / DATA_FILE, out_dir / DATA_FILE)
        os.replace(staged, out_dir / MODEL_FILE)
        if not external:
            with contextlib.suppress(FileNotFoundError):
                (out_dir / DATA_FILE).unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("%s: wrote %s", spec.name, out_dir / MODEL_FILE)
    return ModelEntry(file=f"{out_dir.name}/{MODEL_FILE}", sha256=sha256_file(out_dir / MODEL_FILE), precision=precision, spec=spec)


def export_device_graphs(
    export_dir: str | Path,
    models: dict[str, ModelEntry],
    inpaint: InpaintConfig | None,
    rmbg: RmbgConfig | None,
) -> dict[str, ModelEntry]:
    """Write the device-graph variants of whatever ``models`` (already in ``export_dir``) allow; their entries."""
    import onnx

    export_dir = Path(export_dir)
    out: dict[str, ModelEntry] = {}
    if inpaint is not None and "vae_encoder" in models and "vae_decoder" in models:
        enc, dec = models["vae_encoder"], models["vae_decoder"]
        model, spec = vae_encoder_sample_graph(onnx.load(str(export_dir / enc.file)), inpaint)
        out[VAE_ENCODER_SAMPLE] = save_graph(model, spec, export_dir / VAE_ENCODER_SAMPLE, enc.precision)
        model, spec = vae_decoder_image_graph(onnx.load(str(export_dir / dec.file)), inpaint)
        out[VAE_DECODER_IMAGE] = save_graph(model, spec, export_dir / VAE_DECODER_IMAGE, dec.precision)
    if rmbg is not None and "rmbg" in models:
        entry = models["rmbg"]
        model, spec = rmbg_full_graph(onnx.load(str(export_dir / entry.file)), rmbg)
        out[RMBG_FULL] = save_graph(model, spec, export_dir / RMBG_FULL, entry.precision)
    return out
