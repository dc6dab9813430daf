"""The shared PyTorch -> ONNX step every model wrapper goes through.

One wrapper module + its :class:`~trt_bgswap.specs.ModelSpec` in, one checked ONNX file
out: input/output names and dynamic axes come from the spec (declared once), the graph
is exported with the TorchScript exporter (``torch.onnx.export(dynamo=False)``), optionally
converted to fp16 with fp32 I/O, saved with its weights in ``model.onnx_data`` when it
would not fit protobuf's 2 GB limit (the SD1.5 UNet is 3.4 GB in fp32), checked with
``onnx.checker`` and strict shape inference, and checked against the spec. Files are
staged in a temporary folder beside the destination and renamed into place, so a crash
never leaves a half-written model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import require_free_space
from trt_bgswap.errors import BackendUnavailable, ModelError
from trt_bgswap.manifest import ModelEntry, sha256_file
from trt_bgswap.onnx_graph import check_graph_against_spec, stamp_spec, weights_nbytes, write_with_external_data
from trt_bgswap.specs import ModelSpec

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
PRECISIONS = ("fp32", "fp16")
DEFAULT_OPSET = 17
# Room for graph protos, shape-inferred copies and the checker's files besides the weights.
STAGING_SLACK = 64 * 2**20
# Weights above this go to model.onnx_data: protobuf refuses to serialize messages over 2 GiB.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
INSTALL_HINT = "pip install 'trt-bgswap[export]'"



def require_export_stack() -> None:
    """Fail early, with the install hint, when torch/onnx are missing."""
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"exporting needs torch and onnx ({e.name} is missing); {INSTALL_HINT}") from e


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ModelError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")


def _check_saved(path: Path, spec: ModelSpec) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
        inferred = path.with_name(path.name + ".inferred")
        try:
            onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=True, strict_mode=True)
        finally:
            with contextlib.suppress(FileNotFoundError):
                inferred.unlink()
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelError(f"{path}: the exported {spec.name} graph is invalid ({str(e).splitlines()[0]})") from e
    check_graph_against_spec(path, spec)


def export_onnx(
    module: Any,
    spec: ModelSpec,
    sample: Mapping[str, Any],
    out_dir: str | Path,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> ModelEntry:
    """Export ``module`` (called with the spec's inputs, in order) to ``out_dir/model.onnx``.

    ``sample`` holds one tensor per spec input; use a batch of 2 and sizes unlike any fixed
    dim so the tracer cannot bake a symbolic dim into a constant. ``external_data=None``
    stores weights in ``model.onnx_data`` only when they approach 2 GiB. Returns the model's
    manifest entry (``file`` relative to ``out_dir``'s parent, i.e. the export folder).
    """
    require_export_stack()
    check_precision(precision)
    import onnx
    import torch

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    missing = [n for n in spec.input_names if n not in sample]
    if missing:
        raise ModelError(f"export of {spec.name}: no sample tensor for inputs {missing}")
    args = tuple(sample[n] for n in spec.input_names)
    # staged: the traced fp32 weights and the final ones side by side, then renamed into place
    fp32_bytes = sum(t.numel() * 4 for t in (*module.parameters(), *module.buffers()) if t.is_floating_point())
    require_free_space(
        out_dir.parent, fp32_bytes + fp32_bytes // (2 if precision == "fp16" else 1) + STAGING_SLACK,
        f"exporting {spec.name}", "free some space or export to another folder",
    )
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        raw = stage / "raw"
        raw.mkdir()
        log.info("%s: tracing to ONNX (opset %d)", spec.name, opset)
        module.eval()
        with torch.no_grad(), warnings.catch_warnings():
            # diffusers branches on Python shape values; the tracer warns about each. The
            # resulting constraint (sizes divisible by the size multiple) is in InpaintConfig,
            # and the parity tests run other batch sizes and shapes than the traced ones.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                module,
                args,
                str(raw / MODEL_FILE),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        if precision == "fp16":
            from trt_bgswap.export.fp16 import convert_to_fp16

            log.info("%s: converting to fp16 (fp32 inputs and outputs kept)", spec.name)
            model = convert_to_fp16(raw / MODEL_FILE, spec.name)
        else:  # the graph only: the weights the tracer wrote to files stay there until copied
            model = onnx.load(str(raw / MODEL_FILE), load_external_data=False)
        stamp_spec(model, spec)
        nbytes = weights_nbytes(model)
        use_external = nbytes >= EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
        final = stage / "final"
        final.mkdir()
        if use_external:
            write_with_external_data(model, raw, final / MODEL_FILE, DATA_FILE)
        else:
            onnx.load_external_data_for_model(model, str(raw))  # no-op when the tracer kept them in the proto
            onnx.save_model(model, str(final / MODEL_FILE))
        del model
        if use_external:  # onnx creates the data file owner-only; give it the graph file's permissions
            os.chmod(final / DATA_FILE, stat.S_IMODE((final / MODEL_FILE).stat().st_mode))
        _check_saved(final / MODEL_FILE, spec)
        out_dir.mkdir(parents=True, exist_ok=True)
        # data first, graph last: a model.onnx never points at a missing or stale data file
        data_target = out_dir / DATA_FILE
        if use_external:
            os.replace(final / DATA_FILE, data_target)
        os.replace(final / MODEL_FILE, out_dir / MODEL_FILE)
        if not use_external:
            with contextlib.suppress(FileNotFoundError):
                data_target.unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info(
        "%s: wrote %s (%.1f MB of weights%s, %s)",
        spec.name,
        out_dir / MODEL_FILE,
        nbytes / 1e6,
        f" in {DATA_FILE}" if use_external else "",
        precision,
    )
    return ModelEntry(
        file=f"{out_dir.name}/{MODEL_FILE}",
        sha256=sha256_file(out_dir / MODEL_FILE),
        precision=precision,
        spec=spec,
    )
