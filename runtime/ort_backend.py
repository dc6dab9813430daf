"""ONNX Runtime backend: explicit execution providers, and a log line naming the one that runs.

The most common complaint against rembg is a GPU silently not used; here the
providers are chosen explicitly (``auto`` tries TensorRT EP, CUDA EP, then CPU)
and the providers the session actually got are logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trt_bgswap.errors import BackendUnavailable, ModelError
from trt_bgswap.specs import ModelSpec
from trt_bgswap.runtime.engine import Engine
from trt_bgswap.runtime.page_cache import read_ahead, read_ahead_ranges, weights_beside

if TYPE_CHECKING:
    from trt_bgswap.runtime.residency import Residency

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PROVIDER_CHOICES = ("auto", *PROVIDER_NAMES)


def select_providers(
    requested: str,
    available: Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """Providers (with options) to ask ONNX Runtime for, most preferred first.

    ``auto`` takes every accelerated provider that is available, then CPU; a
    named provider that is not available is an error, not a silent fallback.
    """
    options = options or {}
    if requested == "auto":
        names = [PROVIDER_NAMES[k] for k in ("tensorrt", "cuda") if PROVIDER_NAMES[k] in available]
    elif requested in PROVIDER_NAMES:
        name = PROVIDER_NAMES[requested]
        if name not in available:
            hint = "pip install onnxruntime-gpu (and CUDA/cuDNN, plus TensorRT for the TensorRT provider)"
            raise BackendUnavailable(
                f"ONNX Runtime provider {name} is not available here (available: {', '.join(available)}); {hint}, "
                "or use --provider cpu"
            )
        names = [name] if requested == "cpu" else [name]
    else:
        raise BackendUnavailable(f"unknown provider {requested!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
    if PROVIDER_NAMES["cpu"] not in names:
        names.append(PROVIDER_NAMES["cpu"])  # ONNX Runtime places unsupported nodes on CPU anyway
    return [(n, dict(options.get(n, {}))) for n in names]


def _ort():  # noqa: ANN202 - lazy import keeps `import trt_bgswap` light
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - a core dependency
        raise BackendUnavailable("onnxruntime is not installed; pip install onnxruntime (or onnxruntime-gpu)") from e
    return ort


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


_SHARED_ARENA: list[bool] = []  # registered once per process (ONNX Runtime's environment is process-wide)
_SHARED_ARENA_LOCK = threading.Lock()


def shared_cpu_arena() -> bool:
    """Register one CPU arena for every session of this process that asks for it (idempotent).

    The stages run one after another, so one arena that grows by what is asked
    (``arena_extend_strategy`` 1 = kSameAsRequested, not the next power of two) serves them
    all at the peak of the largest; per-session arenas each keep their own peak. ONNX Runtime
    docs, "Share allocator(s) between sessions". False if this ONNX Runtime cannot.
    """
    with _SHARED_ARENA_LOCK:
        if not _SHARED_ARENA:
            ort = _ort()
            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
                _SHARED_ARENA.append(True)
            except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own untyped errors (e.g. already registered elsewhere)
                log.debug("no shared CPU arena (%s); sessions keep their own", e)
                _SHARED_ARENA.append(False)
        return _SHARED_ARENA[0]


class OrtEngine(Engine):
    """A model run by an ``onnxruntime.InferenceSession``."""

    def __init__(
        self,
        spec: ModelSpec,
        path: Path,
        provider: str = "auto",
        provider_options: Mapping[str, Mapping[str, Any]] | None = None,
        intra_op_threads: int = 0,
        graph_optimization: str = "all",
        optimized_model_path: Path | None = None,
        prepack: bool = True,
        weight_ranges: Sequence[tuple[Path, int, int]] | None = None,
    ) -> None:
        super().__init__(spec, path)
        self.provider = provider
        self.provider_options = provider_options
        self.intra_op_threads = intra_op_threads
        self.graph_optimization = graph_optimization
        self.optimized_model_path = optimized_model_path
        self.prepack = prepack  # False: weights run from their memory-mapped file (the build's choice, engines.ort_build.keeps_weights_mapped)
        self.weight_ranges = weight_ranges  # what to read ahead when prepack is False; None: the weights files beside the graph
        self.session: Any = None
        self._output_names: list[str] = []
        self._run_options: Any = None

    @property
    def backend(self) -> str:
        if self.session is None:
            return "onnxruntime (not loaded)"
        return "onnxruntime:" + ",".join(self.session.get_providers())

    def session_options(self) -> Any:
        ort = _ort()
        so = ort.SessionOptions()
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if self.graph_optimization not in levels:
            raise BackendUnavailable(f"graph_optimization={self.graph_optimization!r}: choose one of {sorted(levels)}")
        so.graph_optimization_level = levels[self.graph_optimization]
        if self.intra_op_threads:
            so.intra_op_num_threads = self.intra_op_threads
        if self.optimized_model_path is not None:
            so.optimized_model_filepath = str(self.optimized_model_path)
        so.log_severity_level = 3
        # Host memory (measured in benchmarks/README.md, "Peak memory by generation size"): the memory
        # pattern pre-plans one more block per input shape beside what the first run left in the arena,
        # which doubled every graph's activations (2.9 -> 1.5 GiB at 512x512, tiny models, same speed);
        # the shared arena holds the largest stage's tensors, not the sum of every stage's.
        so.enable_mem_pattern = False
        if not self.prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        if shared_cpu_arena():
            so.add_session_config_entry("session.use_env_allocators", "1")
        return so

    def load(self) -> None:
        if self.session is not None:
            return
        if not self.path.is_file():
            raise ModelError(f"{self.path}: model file missing; re-run `trt-bgswap export`")
        ort = _ort()
        providers = select_providers(self.provider, ort.get_available_providers(), self.provider_options)
        if not self.prepack:  # weights run from their mapping: read them now, not page by page in the first run
            if self.weight_ranges is None:
                read_ahead(weights_beside(self.path))
            else:
                read_ahead_ranges(self.weight_ranges)
        try:
            self.session = ort.InferenceSession(
                str(self.path),
                sess_options=self.session_options(),
                providers=[p for p, _ in providers],
                provider_options=[o for _, o in providers],
            )
        except Exception as e:  # onnxruntime raises its own untyped errors for corrupt files
            raise ModelError(f"{self.path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from e
        got = self.session.get_providers()
        wanted = [p for p, _ in providers]
        log.debug("%s: running on %s", self.spec.name, ", ".join(got))
        if got and wanted and got[0] != wanted[0]:
            log.warning("%s: asked for %s but ONNX Runtime runs %s", self.spec.name, wanted[0], got[0])
        names = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self.spec.output_names if n not in names]
        if missing:
            raise ModelError(f"{self.path}: graph lacks outputs {missing} declared for {self.spec.name} (has {sorted(names)})")
        self._output_names = self.spec.output_names
        self._run_options = ort.RunOptions()
        # The CPU arena gives back what a run freed (ONNX Runtime docs, "memory.enable_memory_arena_shrinkage"):
        # a stage's blocks would not fit the next stage's tensors and the process would hold both
        # (measured: +1.3 GiB at 512x512 with the full-size models); a run then costs only its own peak.
        self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            self.load()
        outs = self.session.run(self._output_names, dict(feeds), self._run_options)
        return dict(zip(self._output_names, outs))

    def low_memory_parts(self, residency: "Residency", name: str) -> Engine | None:
        """A graph the build cut into parts (trt_bgswap.graph_parts) runs part by part, one part's session open at a time."""
        from trt_bgswap.graph_parts import read_parts
        from trt_bgswap.runtime.graph_parts_engine import PartsEngine, part_spec
        from trt_bgswap.runtime.residency import ResidentEngine

        parts = read_parts(self.path)
        if not parts:
            return None
        log.debug("%s: --low-memory runs it in %d parts", name, len(parts))
        return PartsEngine(
            self.spec,
            self.path,
            [
                ResidentEngine(
                    OrtEngine(
                        part_spec(self.spec, i, part), self.path.parent / part.file, self.provider, self.provider_options,
                        self.intra_op_threads, self.graph_optimization, prepack=self.prepack,
                        weight_ranges=[(self.path.parent / f, offset, length) for f, offset, length in part.weight_ranges],
                    ),
                    f"{name}.part{i}",
                    residency,
                    cost=part.weight_bytes,
                )
                for i, part in enumerate(parts)
            ],
        )

    def unload(self) -> None:
        self.session = None
