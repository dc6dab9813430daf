"""Parity of two ONNX graphs of one model: random inputs from its spec, per-output errors on ONNX Runtime's CPU.

A rewritten graph (fused, quantized, re-optimized) is only a speed-up if it computes what
the exported graph computes; these helpers measure that on the same random feeds, output
by output, so a mismatch names the tensor (tinygrad's ``validate`` style).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trt_bgswap.specs import ModelSpec


def random_feeds(spec: ModelSpec, dims: Mapping[str, int], seed: int = 0, id_limit: int = 1000) -> dict[str, np.ndarray]:
    """Random inputs of a model at ``dims`` (token ids below ``id_limit``, timesteps in [0, 1000))."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec.inputs:
        shape = tuple(d if isinstance(d, int) else int(dims[d]) for d in t.shape)
        if t.np_dtype.kind in "iu":
            feeds[t.name] = rng.integers(0, id_limit, shape).astype(t.np_dtype)
        elif t.name == "timestep":
            feeds[t.name] = rng.uniform(0, 999, shape).astype(t.np_dtype)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.np_dtype)
    return feeds


def compare_graphs(reference: Path, candidate: Path, feeds: Mapping[str, np.ndarray], candidate_level: str = "disable", threads: int = 0) -> dict[str, dict[str, float]]:
    """Per output: max |reference - candidate| and max |reference| of two graphs on the same feeds (ONNX Runtime CPU)."""
    import onnxruntime as ort

    def session(path: Path, level: str) -> Any:
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    ref = session(reference, "basic")
    names = [o.name for o in ref.get_outputs()]
    want = ref.run(names, dict(feeds))
    del ref
    got = session(candidate, candidate_level).run(names, dict(feeds))
    return {
        n: {"max_abs": float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))), "ref_max_abs": float(np.max(np.abs(a)))}
        for n, a, b in zip(names, want, got)
    }


def max_abs_errors(reference: Path, candidate: Path, feeds: Mapping[str, np.ndarray], candidate_level: str = "disable", threads: int = 0) -> dict[str, float]:
    """Per-output max |reference - candidate| (see :func:`compare_graphs`)."""
    return {k: v["max_abs"] for k, v in compare_graphs(reference, candidate, feeds, candidate_level, threads).items()}

