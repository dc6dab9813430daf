"""Static int8 quantization of RMBG (QDQ format), calibrated on real photos.

ONNX Runtime's post-training static quantization (``onnxruntime.quantization.quantize_static``;
ONNX Runtime docs, "Quantize ONNX models"): a calibration pass records activation ranges
(min/max) on representative inputs, then every ``Conv`` gets int8 weights (per output channel,
symmetric) and uint8 activations, written as ``QuantizeLinear``/``DequantizeLinear`` pairs
around float ops (the QDQ format, which ONNX Runtime's CPU provider turns into integer
kernels when it opens the graph). The graph is first prepared with ``quant_pre_process``
(shape inference and ONNX Runtime's basic optimizations, as the docs recommend).

Why static and not dynamic: a convolutional encoder-decoder spends its time in ``Conv``;
dynamic quantization only covers MatMul/Gemm-like ops well and recomputes activation
scales at run time, and on this CPU class it was much slower than fp32, while static
int8 ran about 2x faster. Calibration inputs go through RMBG-1.4's own preprocessing
(:meth:`trt_bgswap.runtime.masker.Masker.preprocess`), so the ranges are those the
runtime will feed.

:func:`mask_agreement` measures what int8 costs: IoU of the masks binarised at 0.5
and the mean absolute difference of the soft alphas, against the fp32 graph.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trt_bgswap.errors import BackendUnavailable, ModelError, UsageError
from trt_bgswap.manifest import RmbgConfig
from trt_bgswap.specs import ModelSpec

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
MIN_CALIBRATION_IMAGES = 1
MASK_THRESHOLD = 0.5  # the level at which IoU binarises both masks


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    calibration_images: int
    method: str
    seconds: float
    quantized_nodes: dict[str, int]  # QDQ-wrapped op types and their counts


def _quantization() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError as e:  # pragma: no cover - part of onnxruntime, needs onnx too
        raise BackendUnavailable(f"int8 quantization needs onnx and onnxruntime's quantization tools ({e}); pip install onnx") from e
    return quantization


def _masker_for_preprocessing(spec: ModelSpec, onnx_path: Path, cfg: RmbgConfig) -> Any:
    """A Masker whose preprocessing we reuse; its engine is never loaded."""
    from trt_bgswap.runtime.masker import Masker
    from trt_bgswap.runtime.ort_backend import OrtEngine

    return Masker(OrtEngine(spec, onnx_path, provider="cpu"), cfg)


def calibration_batches(spec: ModelSpec, onnx_path: Path, cfg: RmbgConfig, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """RMBG inputs (1x3xSxS, float32) for each uint8 RGB calibration image."""
    masker = _masker_for_preprocessing(spec, onnx_path, cfg)
    return [{cfg.input_name: masker.preprocess(im)[None].astype(np.float32)} for im in images]


def quantize_rmbg(
    fp32_path: str | Path,
    out_path: str | Path,
    spec: ModelSpec,
    cfg: RmbgConfig,
    calibration_images: Sequence[np.ndarray],
    method: str = "minmax",
) -> QuantizeResult:
    """Write a static-int8 QDQ copy of the RMBG graph ``fp32_path`` to ``out_path`` (atomically)."""
    q = _quantization()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if method not in CALIBRATION_METHODS:
        raise UsageError(f"calibration method {method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
    if len(calibration_images) < MIN_CALIBRATION_IMAGES:
        raise UsageError("static int8 needs calibration photos; give at least one RGB image")
    if not fp32_path.is_file():
        raise ModelError(f"{fp32_path}: no such RMBG graph; run `trt-bgswap export` first")
    batches = calibration_batches(spec, fp32_path, cfg, calibration_images)

    class Reader(q.CalibrationDataReader):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(batches)

    methods = {
        "minmax": q.CalibrationMethod.MinMax,
        "entropy": q.CalibrationMethod.Entropy,
        "percentile": q.CalibrationMethod.Percentile,
    }
    t0 = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".quantize.", dir=out_path.parent))
    try:
        prepared = stage / "prepared.onnx"
        q.quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        cache = stage / "calibration.json"
        _calibrate(q, prepared, stage, Reader(), methods[method], cache)
        staged = stage / "model.int8.onnx"
        q.quantize_static(
            str(prepared),
            str(staged),
            Reader(),
            calibration_cache_path=str(cache),
            quant_format=q.QuantFormat.QDQ,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            per_channel=True,
            calibrate_method=methods[method],
            extra_options={"CalibTensorRangeSymmetric": False, "WeightSymmetric": True},
        )
        staged.replace(out_path)  # same filesystem: an atomic rename
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    seconds = time.perf_counter() - t0
    counts = quantized_op_counts(out_path)
    log.info("rmbg int8 (QDQ, %s, %d photos) in %.1f s: %s", method, len(batches), seconds, counts)
    return QuantizeResult(out_path, len(batches), method, seconds, counts)


def _calibrate(q: Any, prepared: Path, stage: Path, reader: Any, method: Any, cache: Path) -> None:
    """Collect activation ranges with a lean session, into the calibration cache ``quantize_static`` reads.

    ONNX Runtime's calibrator runs the graph augmented with a ReduceMin/ReduceMax per
    activation in a session with the default memory arena; for RMBG at 1024x1024 that
    session was killed at 24 GB RSS. The same augmented graph run without the arena and
    without pre-planned memory patterns frees each activation after its last use.
    """
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(
        prepared, [], augmented_model_path=str(stage / "augmented.onnx"), calibrate_method=method, extra_options={"symmetric": False}
    )
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    so.log_severity_level = 3
    calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, so, providers=["CPUExecutionProvider"])
    calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), cache)


def quantized_op_counts(path: str | Path) -> dict[str, int]:
    """Op types fed by a DequantizeLinear (what runs in int8 once ONNX Runtime fuses the QDQ pairs)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq_outputs for i in n.input):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def mask_agreement(reference: np.ndarray, candidate: np.ndarray, threshold: float = MASK_THRESHOLD) -> dict[str, float]:
    """IoU of the binarised masks (1.0 when both are empty) and mean/max absolute alpha difference."""
    if reference.shape != candidate.shape:
        raise UsageError(f"masks differ in shape: {reference.shape} vs {candidate.shape}")
    a, b = reference >= threshold, candidate >= threshold
    union = int(np.logical_or(a, b).sum())
    iou = 1.0 if union == 0 else float(np.logical_and(a, b).sum()) / union
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    return {"iou": iou, "mae": float(diff.mean()), "max_abs": float(diff.max())}
