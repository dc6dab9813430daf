"""RMBG (IS-Net) -> ``rmbg/model.onnx``, from published ONNX files or from RMBG-1.4 safetensors.

Two source kinds (``src``):

(a) **Published ONNX** (the ``onnx/`` files of briaai/RMBG-1.4 and look-alikes): an ``.onnx``
    file, or a folder with ``onnx/model.onnx`` (or ``model.onnx`` at its root). In a folder the
    precision picks the file: ``fp32`` -> ``model.onnx``; ``fp16`` -> ``model_fp16.onnx`` (else
    ``model.onnx`` converted); ``int8`` -> ``model_quantized.onnx`` (dynamic uint8; required).
    A file is taken as it is, except that an fp32 file is converted when ``fp16`` is asked;
    the manifest records the precision the graph really has. The graph keeps its own
    names and opset; its main mask output is found by
    :func:`trt_bgswap.runtime.masker.find_main_output`, the side outputs are dropped and the
    nodes only they need are pruned (an IS-Net computes five side masks and their upsampling
    for nothing otherwise). fp16 weights behind fp32 I/O (ONNX Runtime's ``keep_io_types``)
    pass through; a graph with fp16 I/O gets fp32 casts at its boundary.
(b) **RMBG-1.4 safetensors** (a folder with ``config.json`` + ``model.safetensors``, or the
    ``.safetensors`` file in such a folder): loaded strictly into
    :class:`trt_bgswap.export.isnet.BriaRMBG` and exported with one output ``output`` =
    ``sigmoid(d1)`` and a dynamic batch (``rmbg_spec``); fp16 goes through ONNX Runtime's
    converter with fp32 I/O. A folder holding both kinds exports from the weights, except for
    ``int8``, which only exists as the published quantized file.

Pickled checkpoints (``.bin``/``.pth``/``.pt``/``.ckpt``) are refused: unpickling runs code.
The preprocessing constants (:class:`RmbgConfig`) come from ``preprocessor_config.json``
beside the weights (beside an ONNX file or one folder up, the hub layout), else from the
registry's RMBG-1.4 defaults.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from trt_bgswap.errors import BackendUnavailable, ModelError
from trt_bgswap.export.onnx_export import (
    DATA_FILE,
    DEFAULT_OPSET,
    INSTALL_HINT,
    MODEL_FILE,
    export_onnx,
    require_export_stack,
)
from trt_bgswap.manifest import ModelEntry, RmbgConfig, sha256_file
from trt_bgswap.onnx_graph import cast_boundary_to_fp32, check_graph_against_spec, dims_of, graph_precision, prune_to_outputs, set_dims, type_name
from trt_bgswap.runtime.masker import (
    PREPROCESSOR_CONFIG,
    find_main_output,
    find_preprocessor_config,
    masker_variant,
    rmbg_config_for,
    spec_for_graph,
    static_input_size,
)
from trt_bgswap.specs import ONNX_TYPES, rmbg_spec

log = logging.getLogger(__name__)

MODEL_DIR = "rmbg"
RMBG_PRECISIONS = ("fp32", "fp16", "int8")
PUBLISHED_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_quantized.onnx"}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")
_SAMPLE_BATCH = 2  # traced with a batch unlike 1 so the tracer cannot freeze it


# --- (a) published ONNX graphs ---


def _published_file(src: Path, precision: str) -> Path:
    """The ONNX file a published folder offers for ``precision`` (fp16 falls back to model.onnx, converted later)."""
    for folder in (src / "onnx", src):
        wanted = folder / PUBLISHED_FILES[precision]
        if wanted.is_file():
            return wanted
        if precision == "fp16" and (folder / PUBLISHED_FILES["fp32"]).is_file():
            return folder / PUBLISHED_FILES["fp32"]
    if precision == "int8":
        raise ModelError(
            f"{src}: no onnx/{PUBLISHED_FILES['int8']} for precision int8; download the published quantized file "
            "or use precision fp32/fp16"
        )
    raise ModelError(
        f"{src}: no onnx/{PUBLISHED_FILES['fp32']} (nor config.json + {WEIGHTS_FILE}); give an RMBG .onnx file, "
        "a folder with onnx/model.onnx, or RMBG-1.4's safetensors folder"
    )


def _load_onnx(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf raises DecodeError and friends for non-ONNX bytes
        raise ModelError(f"{path}: not a readable ONNX file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); give an RMBG .onnx model") from e


def export_published_onnx(path: Path, out_dir: Path, precision: str, masker: str | None = None) -> tuple[ModelEntry, RmbgConfig]:
    """Source (a): prune a published RMBG graph to its main mask and write ``out_dir/rmbg/model.onnx``.

    An fp32 graph is converted when ``precision`` is fp16; any other graph keeps its own precision.
    """
    import onnx

    model = _load_onnx(path)
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in weights]
    if len(inputs) != 1:
        raise ModelError(f"{path}: {len(inputs)} graph inputs {[v.name for v in inputs]}; an RMBG graph has one image input")
    inp = inputs[0]
    in_dims = dims_of(inp)
    size = static_input_size(path, in_dims)
    floats = [(o.name, dims_of(o)) for o in graph.output if type_name(o.type.tensor_type.elem_type) in (ONNX_TYPES["float32"], ONNX_TYPES["float16"])]
    try:
        main = find_main_output(in_dims, floats)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from e
    actual = graph_precision(model)
    log.info("%s: input %r %s, main output %r of %d outputs, %s weights", path, inp.name, in_dims, main, len(graph.output), actual)

    pruned = prune_to_outputs(model, [main])
    del model
    cast_boundary_to_fp32(pruned, inp.name, main)
    spec = spec_for_graph(inp.name, main, in_dims, size)
    set_dims(next(v for v in pruned.graph.input if v.name == inp.name), spec.inputs[0].shape)
    set_dims(pruned.graph.output[0], spec.outputs[0].shape)
    cfg = rmbg_config_for(path, inp.name, main, size, find_preprocessor_config(path), masker)
    if precision == "fp16" and actual == "fp32":
        precision_out = "fp16"
    else:
        precision_out = actual
        if precision != actual:
            log.info("%s: holds %s weights; exporting them as they are (asked for %s)", path, actual, precision)

    target_dir = Path(out_dir) / MODEL_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR}.", dir=target_dir.parent))
    try:
        staged = stage / MODEL_FILE
        onnx.save_model(pruned, str(staged))
        if precision_out == "fp16" and actual == "fp32":
            from trt_bgswap.export.fp16 import convert_to_fp16

            log.info("%s: converting to fp16 (fp32 inputs and outputs kept)", path)
            onnx.save_model(convert_to_fp16(staged), str(staged))
        try:
            onnx.checker.check_model(str(staged))
        except onnx.checker.ValidationError as e:
            raise ModelError(f"{path}: the pruned RMBG graph is invalid ({str(e).splitlines()[0]})") from e
        check_graph_against_spec(staged, spec)
        os.replace(staged, target_dir / MODEL_FILE)
        with contextlib.suppress(FileNotFoundError):
            (target_dir / DATA_FILE).unlink()  # a stale external-data file from an earlier export
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    entry = ModelEntry(
        file=f"{MODEL_DIR}/{MODEL_FILE}",
        sha256=sha256_file(target_dir / MODEL_FILE),
        precision=precision_out,
        spec=spec,
    )
    return entry, cfg


# --- (b) RMBG-1.4 safetensors ---


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable RMBG config ({e}); restore config.json from the model repo") from e
    if not isinstance(d, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(d).__name__}; restore config.json from the model repo")
    return d


def load_rmbg_weights(folder: Path) -> Any:
    """RMBG-1.4's safetensors loaded strictly into :class:`BriaRMBG` (eval mode, float32)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from trt_bgswap.export.isnet import BriaRMBG

    config = _read_config(folder)
    model = BriaRMBG.from_config(config)
    if model.in_ch != 3:
        raise ModelError(f"{folder / CONFIG_FILE}: in_ch={model.in_ch}; RMBG takes 3-channel RGB input, give an RMBG-1.4 model")
    if model.out_ch != 1:
        raise ModelError(f"{folder / CONFIG_FILE}: out_ch={model.out_ch}; RMBG predicts one mask channel, give an RMBG-1.4 model")
    path = folder / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e}); re-download {WEIGHTS_FILE}") from e
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    own = model.state_dict()
    for key, value in own.items():  # counters only training reads; some savers drop them
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value.clone()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
        raise ModelError(
            f"{path}: does not fit RMBG-1.4's IS-Net ({len(missing)} missing keys e.g. {missing[:2]}, "
            f"{len(unexpected)} unexpected e.g. {unexpected[:2]}, {len(shapes)} shape mismatches e.g. {sorted(shapes)[:2]}); "
            "give BRIA's RMBG-1.4 model.safetensors with its config.json"
        ) from e
    return model.eval()


def export_from_weights(folder: Path, out_dir: Path, precision: str, opset: int) -> tuple[ModelEntry, RmbgConfig]:
    """Source (b): RMBG-1.4 safetensors -> one-output, dynamic-batch ONNX via the shared exporter."""
    require_export_stack()
    import torch

    if precision not in ("fp32", "fp16"):
        raise ModelError(f"{folder}: precision={precision!r} from safetensors weights; choose fp32 or fp16 (int8 comes only from a published model_quantized.onnx)")
    model = load_rmbg_weights(folder)
    names = rmbg_spec(None)  # the published names: input "input", output "output"
    preprocessor = folder / PREPROCESSOR_CONFIG  # beside the weights only: a parent folder's may be another model's
    cfg = rmbg_config_for(
        folder / WEIGHTS_FILE,
        names.input_names[0],
        names.output_names[0],
        None,
        preprocessor if preprocessor.is_file() else None,
    )
    size = cfg.input_size[0]
    spec = rmbg_spec(size)
    sample = torch.randn(_SAMPLE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    from trt_bgswap.export.isnet import MainMask

    entry = export_onnx(MainMask(model), spec, {spec.input_names[0]: sample}, Path(out_dir) / MODEL_DIR, precision=precision, opset=opset)
    return entry, cfg


# --- the entry point ---


def _refuse_pickle(path: Path) -> None:
    raise ModelError(
        f"{path}: pickled PyTorch weights are refused (loading them runs arbitrary code); "
        f"use RMBG-1.4's {WEIGHTS_FILE} with its config.json, or its onnx/model.onnx"
    )


def export_rmbg(
    src: str | Path, out_dir: str | Path, precision: str = "fp32", opset: int = DEFAULT_OPSET, masker: str | None = None
) -> tuple[ModelEntry, RmbgConfig]:
    """Export a masker (RMBG-1.4, BiRefNet, RMBG-2.0) to ``out_dir/rmbg/model.onnx``; returns its manifest entry and processing config.

    ``opset`` applies to exports from weights; published graphs keep their own. BiRefNet-architecture
    repos (their ``config.json`` says so) are exported from their published ONNX file; ``masker``
    names the variant where the files cannot tell (``--masker rmbg-2.0``).
    """
    src = Path(src)
    if precision not in RMBG_PRECISIONS:
        raise ModelError(f"precision={precision!r} for RMBG: choose one of {', '.join(RMBG_PRECISIONS)}")
    if not src.exists():
        raise ModelError(
            f"{src}: no such file or folder; give an RMBG .onnx file, a folder with onnx/model.onnx, "
            f"or a folder with config.json + {WEIGHTS_FILE} (RMBG-1.4)"
        )
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"exporting RMBG needs the onnx package; {INSTALL_HINT}") from e
    if src.is_file():
        suffix = src.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            _refuse_pickle(src)
        if suffix == ".onnx":
            return export_published_onnx(src, Path(out_dir), precision, masker)
        if suffix == ".safetensors":
            if src.name != WEIGHTS_FILE or not (src.parent / CONFIG_FILE).is_file():
                raise ModelError(f"{src}: safetensors weights need RMBG-1.4's layout: {WEIGHTS_FILE} with {CONFIG_FILE} beside it")
            return export_from_weights(src.parent, Path(out_dir), precision, opset)
        raise ModelError(f"{src}: unknown model file type {src.suffix!r}; give an .onnx file or an RMBG-1.4 model folder")

    has_onnx = any((f / PUBLISHED_FILES["fp32"]).is_file() or (f / PUBLISHED_FILES[precision]).is_file() for f in (src / "onnx", src))
    birefnet = masker_variant(src / "onnx" / PUBLISHED_FILES["fp32"], masker).postprocess != "minmax"
    has_weights = (src / WEIGHTS_FILE).is_file() and (src / CONFIG_FILE).is_file() and not birefnet  # weights: RMBG-1.4's IS-Net only
    if has_weights and (precision != "int8" or not has_onnx):
        return export_from_weights(src, Path(out_dir), precision, opset)
    if has_onnx:
        return export_published_onnx(_published_file(src, precision), Path(out_dir), precision, masker)
    pickles = sorted(p.name for p in src.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        _refuse_pickle(src / pickles[0])
    raise ModelError(
        f"{src}: no RMBG model here (looked for onnx/model.onnx, model.onnx and config.json + {WEIGHTS_FILE}); "
        "download briaai/RMBG-1.4 or give an .onnx file"
    )
