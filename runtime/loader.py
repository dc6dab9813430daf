"""Open an exported folder's models on the chosen backend, using what `trt-bgswap build` made.

The build index (:mod:`trt_bgswap.build_index`) names, per model, the artifact to open:
a TensorRT plan, or an ONNX Runtime graph with its optimization level and provider options.
Without a build, ONNX Runtime opens the exported graphs directly (slower to start; the log
says how to fix it); TensorRT without plans is an error with the command.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_bgswap.build_index import ENGINES_DIR, TRT, read_index
from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.manifest import Manifest
from trt_bgswap.runtime.backends import Availability, BackendChoice, choose_backend
from trt_bgswap.runtime.engine import Engine
from trt_bgswap.runtime.ort_backend import OrtEngine

log = logging.getLogger(__name__)

# --provider values: ONNX Runtime providers, plus "trt" for native TensorRT engines
PROVIDER_TO_BACKEND = {"auto": "auto", "cpu": "cpu", "cuda": "ort-cuda", "tensorrt": "ort-tensorrt", "trt": "trt"}


def resolve_backend(provider: str, facts: Availability | None = None, announce: bool = True) -> BackendChoice:
    """--provider (auto, cpu, cuda, tensorrt, trt, or a backends.py name) -> the backend that will run."""
    requested = PROVIDER_TO_BACKEND.get(provider, provider)
    return choose_backend(requested, facts if facts is not None else Availability.probe(), announce)


@dataclass
class OpenedEngines:
    """Engines (not yet loaded) and what they share: the CUDA stream and activation block, closed last."""

    engines: dict[str, Engine]
    shared: list[Any] = field(default_factory=list)  # objects with close(), e.g. the one CUDA stream

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        for resource in self.shared:
            resource.close()
        self.shared.clear()


def open_engines(
    folder: str | Path,
    manifest: Manifest,
    choice: BackendChoice,
    threads: int = 0,
    share_activations: bool = True,
    names: Sequence[str] | None = None,
) -> OpenedEngines:
    """One unloaded engine per model of the manifest (or of ``names`` only), on ``choice``'s backend.

    TensorRT engines share one CUDA stream and (``share_activations``) one activation
    block sized to the largest engine's need: the stages run one after another, so a
    small GPU pays for one engine's scratch memory, not five.
    """
    folder = Path(folder)
    index = read_index(folder, choice.engine, choice.provider)
    models = {k: v for k, v in manifest.models.items() if names is None or k in names}
    engines_dir = folder / ENGINES_DIR
    if choice.engine == TRT:
        if index is None:
            raise ModelError(
                f"{folder}: no TensorRT engines built; run `trt-bgswap build {folder} --backend trt` first "
                "(or use --provider cpu/cuda)"
            )
        from trt_bgswap.runtime.cuda_device import Stream
        from trt_bgswap.runtime.trt_backend import SharedActivations, TrtEngine

        stream = Stream()
        shared = SharedActivations() if share_activations else None
        opened = OpenedEngines({}, [stream])
        for name, entry in models.items():
            if name not in index:
                raise ModelError(f"{folder}: no TensorRT engine for {name}; re-run `trt-bgswap build {folder} --backend trt`")
            opened.engines[name] = TrtEngine(entry.spec, index[name].resolve(engines_dir), stream=stream, shared_activations=shared)
        return opened
    if choice.provider is None:
        raise UsageError(f"backend {choice.name} names no ONNX Runtime provider")
    if index is None:
        log.info("no pre-optimized graphs for %s; `trt-bgswap build %s` makes sessions start faster", choice.provider, folder)
    opened = OpenedEngines({})
    for name, entry in models.items():
        built = (index or {}).get(name)
        if built is None:
            opened.engines[name] = OrtEngine(entry.spec, folder / entry.file, provider=choice.provider, intra_op_threads=threads)
            continue
        opened.engines[name] = OrtEngine(
            entry.spec,
            built.resolve(engines_dir),
            provider=choice.provider,
            provider_options=built.provider_options,
            intra_op_threads=threads,
            graph_optimization=built.graph_optimization or "all",
            prepack=built.prepack,
        )
    return opened
