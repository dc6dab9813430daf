"""Build a TensorRT plan from an ONNX graph: the thin layer that touches ``tensorrt``.

Follows the TensorRT 10 Python API as NVIDIA documents it ("The Python API" in
the TensorRT developer guide): ``trt.Builder`` -> ``create_network(0)``
(explicit batch is the only mode in TensorRT 10) -> ``trt.OnnxParser.parse_from_file``
(so external weight files beside the graph are found) -> ``IBuilderConfig`` with
the FP16/TF32 flags, a workspace limit (``set_memory_pool_limit``),
``builder_optimization_level``, one ``IOptimizationProfile`` per entry of
:mod:`trt_bgswap.engines.profiles` (``set_shape(name, min, opt, max)``), a timing
cache persisted across builds (``create_timing_cache`` / ``set_timing_cache`` /
``serialize``), and progress through ``trt.IProgressMonitor`` where the installed
TensorRT has it -> ``build_serialized_network``.

Every decision (profiles, flags, key parts) is made in plain Python elsewhere
and unit-tested on CPU; this module only applies it. ``tensorrt`` is imported
lazily and its absence raises :class:`~trt_bgswap.errors.BackendUnavailable`.
The resulting plans are plain TensorRT engines (``trtexec --loadEngine=...``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import write_bytes_atomic
from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.runtime.trt_backend import import_tensorrt

from trt_bgswap.runtime.trt_shapes import ShapeProfile

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32")
OPT_LEVELS = range(0, 6)  # builder_optimization_level: 0 fastest build .. 5 most tactics; TensorRT's default is 3


def tensorrt_version() -> str:
    return str(import_tensorrt().__version__)


@dataclass(frozen=True)
class TrtBuildOptions:
    """Builder settings; all of them are part of the engine cache key."""

    precision: str = "fp16"
    opt_level: int = 3
    workspace_bytes: int | None = None  # None: TensorRT's default (all device memory)
    tf32: bool = True  # TF32 matmuls/convs on Ampere+ for fp32 layers; TensorRT's default
    timing_cache: bool = True  # reuse kernel timings across builds (cuts rebuilds from minutes to seconds)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.opt_level not in OPT_LEVELS:
            raise UsageError(f"--opt-level {self.opt_level}: TensorRT's builder optimization level is 0..5 (default 3)")
        if self.workspace_bytes is not None and self.workspace_bytes < 1 << 20:
            raise UsageError(f"workspace {self.workspace_bytes} bytes is below 1 MiB; give --workspace-mb >= 1")

    def builder_flags(self) -> dict[str, bool]:
        """``trt.BuilderFlag`` names to set (True) or clear (False)."""
        return {"FP16": self.precision == "fp16", "TF32": self.tf32}

    def key_parts(self) -> dict[str, Any]:
        return {
            "opt_level": self.opt_level,
            "workspace_bytes": self.workspace_bytes,
            "flags": self.builder_flags(),
            "timing_cache": self.timing_cache,
        }


class BuildProgress:
    """Turns TensorRT's phase/step callbacks into log lines, at most one per phase every ``interval`` s.

    Builds of the full-size UNet take minutes; this is how the user sees they move.
    """

    def __init__(self, label: str, interval: float = 5.0) -> None:
        self.label = label
        self.interval = interval
        self.steps: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self.lines: list[str] = []

    def _emit(self, text: str) -> None:
        self.lines.append(text)
        log.info("%s: %s", self.label, text)

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        self.steps[phase_name] = num_steps
        self._last[phase_name] = time.monotonic()
        if parent_phase is None:
            self._emit(f"{phase_name} ({num_steps} steps)")

    def step_complete(self, phase_name: str, step: int) -> bool:
        now = time.monotonic()
        total = self.steps.get(phase_name, 0)
        if now - self._last.get(phase_name, 0.0) >= self.interval:
            self._last[phase_name] = now
            self._emit(f"{phase_name}: step {step + 1}/{total}")
        return True  # False would cancel the build

    def phase_finish(self, phase_name: str) -> None:
        self.steps.pop(phase_name, None)
        self._last.pop(phase_name, None)


def _progress_monitor(trt: Any, progress: BuildProgress) -> Any:
    """A ``trt.IProgressMonitor`` delegating to ``progress`` (the class exists from TensorRT 10.0)."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            progress.phase_finish(phase_name)

    return _Monitor()


def _logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that forwards TensorRT's messages to :mod:`logging`."""
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            logging.getLogger("tensorrt").log(levels.get(severity, logging.INFO), "%s", msg)

    return _Logger()


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    profiles: Sequence[ShapeProfile],
    options: TrtBuildOptions,
    timing_cache_path: Path | None = None,
    label: str = "tensorrt",
) -> None:
    """Parse ``onnx_path`` and write the serialized engine to ``plan_path``.

    ``plan_path`` is expected to be a temp file from :class:`EngineCache.store`
    (atomic rename happens there). The timing cache is read before and written
    (atomically) after the build.
    """
    trt = import_tensorrt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(f"{onnx_path}: TensorRT's ONNX parser failed: {'; '.join(errors) or 'no detail'}; re-export or use --backend ort")

    config = builder.create_builder_config()
    for flag, on in options.builder_flags().items():
        (config.set_flag if on else config.clear_flag)(getattr(trt.BuilderFlag, flag))
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.opt_level

    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for p in profiles:
        profile = builder.create_optimization_profile()
        for t in p.tensors:
            if t.name not in network_inputs:
                raise ModelError(f"{onnx_path}: profile names input {t.name!r} but the graph has {sorted(network_inputs)}")
            profile.set_shape(t.name, t.min, t.opt, t.max)
        config.add_optimization_profile(profile)

    cache = None
    if options.timing_cache:
        blob = timing_cache_path.read_bytes() if timing_cache_path is not None and timing_cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("%s: timing cache %s does not match this TensorRT/GPU; starting a fresh one", label, timing_cache_path)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=True)

    progress = BuildProgress(label)
    monitor = _progress_monitor(trt, progress) if hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config.progress_monitor = monitor  # the local keeps it alive for the whole build, as TensorRT requires

    log.info("%s: building a TensorRT %s plan (%d profile(s), opt level %d); this takes minutes for full-size models",
             label, options.precision, len(profiles), options.opt_level)
    started = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"{onnx_path}: TensorRT failed to build an engine (see the tensorrt log lines above)")
    with open(plan_path, "wb") as f:
        f.write(memoryview(serialized))
    log.info("%s: built in %.0f s", label, time.monotonic() - started)

    if cache is not None and timing_cache_path is not None:
        write_bytes_atomic(timing_cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
