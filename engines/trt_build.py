"""Build a TensorRT plan from an ONNX graph: the thin layer that touches ``tensorrt``.

Follows the TensorRT Python API of 10.x and 11.x as NVIDIA's bindings define it
(tests/emulation/SOURCES.md cites each name): ``trt.Builder`` -> ``create_network(flags)``
-> ``trt.OnnxParser.parse_from_file`` (so external weight files beside the graph are found)
-> ``IBuilderConfig`` with TF32, a workspace limit (``set_memory_pool_limit``),
``builder_optimization_level``, one ``IOptimizationProfile`` per entry of
:mod:`trt_bgswap.engines.profiles` (``set_shape(name, min, opt, max)``), a timing
cache persisted across builds (``create_timing_cache`` / ``set_timing_cache`` /
``serialize``), and progress through ``trt.IProgressMonitor`` -> ``build_serialized_network``.

Precision is a property of the ONNX graph. Networks are **strongly typed**: on 10.x with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (NvInfer.h@v10.16:12113), on 11.x always
("The network is always strongly typed", NvInfer.h@v11.1:11567-11568; its flag is deprecated and
ignored, so none is passed). An fp16 engine asked of an fp32 graph is built from that graph
converted to fp16 with fp32 islands (:func:`trt_bgswap.mixed_precision.to_mixed_fp16`, the same
pass the export uses); ``BuilderFlag.FP16`` (deprecated in 10.12, removed in 11:
pyCore.cpp@v11.1:1599-1623) is touched only by the explicit weakly typed fallback on 10.x
(:attr:`TrtBuildOptions.weak_fp16`), never cleared for fp32 builds. This is NVIDIA's own
migration path (samples/python/strongly_type_autocast/README.md@v11.1:25, 63-66).

Every decision (profiles, flags, key parts) is made in plain Python elsewhere
and unit-tested on CPU; this module only applies it. ``tensorrt`` is imported
lazily and its absence raises :class:`~trt_bgswap.errors.BackendUnavailable`.
The resulting plans are plain TensorRT engines (``trtexec --loadEngine=...``).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import write_bytes_atomic
from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.mixed_precision import to_mixed_fp16
from trt_bgswap.runtime.trt_backend import import_tensorrt, trt_logger

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
    # TensorRT 10.x only: a weakly typed network with BuilderFlag.FP16, where TensorRT picks each layer's precision
    # (deprecated in 10.12, gone in 11); the explicit fallback for a graph the fp16 pass cannot convert.
    weak_fp16: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.weak_fp16 and self.precision != "fp16":
            raise UsageError("--weak-fp16 is a way to build fp16 engines; it needs --precision fp16")
        if self.opt_level not in OPT_LEVELS:
            raise UsageError(f"--opt-level {self.opt_level}: TensorRT's builder optimization level is 0..5 (default 3)")
        if self.workspace_bytes is not None and self.workspace_bytes < 1 << 20:
            raise UsageError(f"workspace {self.workspace_bytes} bytes is below 1 MiB; give --workspace-mb >= 1")

    def builder_flags(self) -> dict[str, bool]:
        """``trt.BuilderFlag`` names to set (True) or clear (False): TF32 (in every release), FP16 only when weakly typed."""
        return {"TF32": self.tf32} | ({"FP16": True} if self.weak_fp16 else {})

    def key_parts(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "opt_level": self.opt_level,
            "workspace_bytes": self.workspace_bytes,
            "flags": self.builder_flags(),
            "typing": "weak" if self.weak_fp16 else "strong",
            "timing_cache": self.timing_cache,
        }


def network_flags(trt: Any, options: TrtBuildOptions) -> int:
    """``create_network`` flags: strongly typed (10.x: the STRONGLY_TYPED bit; 11.x: always, no flag), or weak on 10.x."""
    major = int(str(trt.__version__).split(".")[0])
    if options.weak_fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise UsageError(
                f"--weak-fp16 needs TensorRT 10.x: TensorRT {trt.__version__} builds strongly typed networks only; "
                "drop --weak-fp16 (fp16 engines come from the fp16 graph with fp32 islands)"
            )
        return 0
    if major >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def needs_fp16_pass(own_precision: str, options: TrtBuildOptions) -> bool:
    """An fp16 engine of an fp32 graph is built from the graph's fp16 conversion (weak typing converts nothing)."""
    return options.precision == "fp16" and not options.weak_fp16 and own_precision == "fp32"


@contextlib.contextmanager
def graph_to_build(onnx_path: Path, options: TrtBuildOptions, graph_name: str, keep_at: Path | None, workdir: Path) -> Iterator[Path]:
    """The ONNX file TensorRT parses: ``onnx_path`` itself, or for an fp16 build of an fp32 graph its mixed-fp16 conversion.

    The conversion is written to ``keep_at`` (the engine cache keeps it beside the plan: the exact
    graph the engine was built from, which ONNX Runtime can run on CPU), else to a temporary folder
    in ``workdir`` for the length of the build (the parser holds the weights it read).
    """
    import onnx

    from trt_bgswap.onnx_graph import graph_precision

    own = graph_precision(onnx.load(str(onnx_path), load_external_data=False))
    if options.precision == "fp32" and own != "fp32":
        log.warning("%s: the graph is %s (its export's choice); a strongly typed build follows the graph, not --precision fp32", graph_name, own)
    if not needs_fp16_pass(own, options):
        yield onnx_path
        return

    def save(target: Path) -> Path:
        model = to_mixed_fp16(onnx_path, graph_name)
        onnx.save_model(model, str(target), save_as_external_data=True, location=target.name + ".data", size_threshold=1024)
        return target

    if keep_at is not None:
        yield save(keep_at)
        return
    with tempfile.TemporaryDirectory(prefix=f".{graph_name}-fp16.", dir=workdir) as tmp:
        yield save(Path(tmp) / "model.fp16.onnx")


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


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    profiles: Sequence[ShapeProfile],
    options: TrtBuildOptions,
    timing_cache_path: Path | None = None,
    label: str = "tensorrt",
    graph_name: str | None = None,
    fp16_graph: Path | None = None,
) -> None:
    """Parse ``onnx_path`` and write the serialized engine to ``plan_path``.

    ``plan_path`` is expected to be a temp file from :class:`EngineCache.store`
    (atomic rename happens there). The timing cache is read before and written
    (atomically) after the build. ``graph_name`` (default ``label``) names the graph for the fp16 pass's
    islands; ``fp16_graph``, if given, is where a converted graph is kept (else it lives only during the build).
    """
    trt = import_tensorrt()
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, options))
    parser = trt.OnnxParser(network, logger)
    with graph_to_build(onnx_path, options, graph_name or label, fp16_graph, plan_path.parent) as graph:
        if not parser.parse_from_file(str(graph)):
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

        log.info("%s: building a %s TensorRT %s plan (%d profile(s), opt level %d); this takes minutes for full-size models",
                 label, "weakly typed" if options.weak_fp16 else "strongly typed", options.precision, len(profiles), options.opt_level)
        started = time.monotonic()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelError(f"{onnx_path}: TensorRT failed to build an engine (see the tensorrt log lines above)")
        with open(plan_path, "wb") as f:
            f.write(memoryview(serialized))
        log.info("%s: built in %.0f s", label, time.monotonic() - started)

    if cache is not None and timing_cache_path is not None:
        write_bytes_atomic(timing_cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
