"""fp16 ONNX graphs with explicit fp32 islands: precision is decided in the graph, not by a builder flag.

TensorRT 11 builds every network strongly typed and removed ``BuilderFlag.FP16`` (NvInfer.h@v11.1:
11567-11568; pyCore.cpp@v11.1:1599-1623); 10.12 deprecated weak typing ("We recommend using AutoCast
... then build strongly typed", samples/python/strongly_type_autocast/README.md@v11.1:25). So the
graph itself must say which tensors are fp16 and which stay fp32, and the graph ONNX Runtime runs on
CPU is exactly the graph TensorRT builds, so its numerics are checked here (tests/test_mixed_precision.py).

The pass: ONNX Runtime's converter (``onnxruntime.transformers.float16.convert_float_to_float16``,
the one its own Stable Diffusion optimizer uses; ``keep_io_types=True`` keeps fp32 I/O) with a
``node_block_list`` / ``op_block_list`` that keeps these islands in fp32, each for a reason of
arithmetic, not of measurement on one machine:

- **the timestep embedding** (diffusers' ``time_proj`` / ``time_embedding`` modules): the sinusoidal
  projection takes ``sin``/``cos`` of ``t * f`` with ``t`` up to 999; fp16's spacing at 999 is 0.5,
  so the phases (and the whole conditioning on ``t``) would be noise;
- **the guidance + LCM arithmetic of ``unet_step``** (every node outside the wrapped UNet,
  ``/model/``): ``x0 = (x - sqrt(1-a) * eps) / sqrt(a)`` divides by ``sqrt(a)`` ~ 0.07 at t = 999,
  amplifying eps's fp16 rounding 14x, and ``uncond + g * (cond - uncond)`` cancels;
- **normalisation statistics** (``InstanceNormalization`` = torch's GroupNorm export,
  ``LayerNormalization``, ``GroupNormalization``): means and variances over thousands of values
  accumulate rounding and the variance of large activations overflows fp16;
- **the VAE** is not converted at all (:data:`FP32_GRAPHS`): SD1.5's decoder activations pass
  65504 (see :mod:`trt_bgswap.export.fp16`), unless an export deliberately made it fp16.

The converter computes a blocked node in fp32 but stores its output as fp16 again (Cast fp32 ->
fp16 after it, Cast fp16 -> fp32 before the next blocked node), and rounds fp32 graph inputs to
fp16 before they reach a blocked node: the islands would compute in fp32 on fp16-rounded values.
:func:`drop_fp16_round_trips` removes every such fp32 -> fp16 -> fp32 pair (the fp16 consumers keep
their fp16 copy), so an island is fp32 from its inputs to its outputs; a strongly typed TensorRT
build honours each remaining Cast.

Why not NVIDIA ModelOpt AutoCast (``nvidia-modelopt``), which NVIDIA recommends: it hard-requires
torch (imported with ``modelopt.onnx``) and its ``[onnx]`` extra pins ``onnxruntime-gpu`` and cupy,
so ``trt-bgswap build`` on a GPU box would need torch; and its islands come from magnitudes measured
on calibration data (``data_max`` 512), which would miss the timestep embedding at a calibration
``t`` that happens to be small. The islands above are semantic and cost two list arguments to a
converter that is already a dependency.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trt_bgswap.errors import BackendUnavailable, ModelError
from trt_bgswap.specs import UNET_STEP, VAE_DECODER, VAE_DECODER_IMAGE, VAE_ENCODER, VAE_ENCODER_SAMPLE

log = logging.getLogger(__name__)

# Graphs kept in fp32 unless the export made them fp16 on purpose (fp16 VAEs overflow).
FP32_GRAPHS = frozenset({VAE_ENCODER, VAE_DECODER, VAE_ENCODER_SAMPLE, VAE_DECODER_IMAGE})
# Normalisation ops whose statistics stay fp32 (torch exports GroupNorm as InstanceNormalization).
NORM_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization")
# diffusers' module names of the timestep embedding (UNet2DConditionModel.time_proj / .time_embedding).
TIMESTEP_MODULES = ("/time_proj/", "/time_embedding/")
# The wrapped UNet inside the fused step graph (export/unet_step.py: UNetStep.model); the rest is the step arithmetic.
STEP_UNET_PREFIX = "/model/"


def keeps_fp32(graph_name: str) -> bool:
    """Whether a graph stays fp32 when fp16 is asked for (the VAE)."""
    return graph_name in FP32_GRAPHS


def fp32_island_nodes(model: Any, graph_name: str | None) -> list[str]:
    """Names of the nodes that stay fp32 (besides :data:`NORM_OPS`): the timestep embedding and the step arithmetic."""
    keep = []
    for node in model.graph.node:
        if any(m in node.name for m in TIMESTEP_MODULES):
            keep.append(node.name)
        elif graph_name == UNET_STEP and node.name and not node.name.startswith(STEP_UNET_PREFIX):
            keep.append(node.name)
    return keep


def to_mixed_fp16(path: str | Path, graph_name: str | None = None) -> Any:
    """The fp32 graph at ``path`` as fp16 with fp32 islands and fp32 I/O (an ``onnx.ModelProto``).

    Working from the path lets the converter run shape inference on graphs over 2 GB; the node
    names are read without the weights.
    """
    try:
        import onnx
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError as e:  # pragma: no cover - onnx and onnxruntime are core dependencies
        raise BackendUnavailable(f"fp16 conversion needs onnx and onnxruntime's transformers tools ({e}); pip install onnx onnxruntime") from e
    islands = fp32_island_nodes(onnx.load(str(path), load_external_data=False), graph_name)
    log.info("%s: fp16 with %d fp32 island node(s) and %s statistics in fp32", graph_name or path, len(islands), "/".join(NORM_OPS))
    model = convert_float_to_float16(
        str(path), keep_io_types=True, node_block_list=islands, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *NORM_OPS]
    )
    if not model.graph.node:  # onnx's infer_shapes_path leaves an empty file when it cannot write (a full disk)
        raise ModelError(f"{path}: the fp16 conversion read back an empty graph; check the free space in {Path(path).parent} and export again")
    # the converter appends the boundary casts after their consumers; ONNX requires topological order
    OnnxModel(model).topological_sort()
    dropped = drop_fp16_round_trips(model)
    log.debug("%s: %d fp32 -> fp16 -> fp32 round trip(s) removed from the islands", graph_name or path, dropped)
    return model


def _cast_to(node: Any) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def drop_fp16_round_trips(model: Any) -> int:
    """Make every ``Cast(fp32)`` of a ``Cast(fp16)`` of an fp32 tensor read that tensor; drop the casts left idle.

    Only removes roundings (the result is the fp32 value the pair rounded), never adds a type change:
    the source must be known fp32. A cast that became fp32 -> fp32 is bypassed (kept, as an identity,
    only where it writes a graph output). Returns the round trips removed.
    """
    from onnx import TensorProto

    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    removed = 0
    rename: dict[str, str] = {}
    for node in g.node:
        if _cast_to(node) != TensorProto.FLOAT:
            continue
        half = producer.get(node.input[0])
        if half is not None and _cast_to(half) == TensorProto.FLOAT16 and types.get(half.input[0]) == TensorProto.FLOAT:
            node.input[0] = half.input[0]  # now an fp32 -> fp32 cast: the identity
            removed += 1
            if node.output[0] not in outputs:
                rename[node.output[0]] = node.input[0]
    if not removed:
        return 0
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    keep = list(g.node)
    while True:  # drop casts nobody reads (the bypassed identities, then the fp16 casts only they read)
        used = {i for n in keep for i in n.input} | outputs
        idle = [n for n in keep if n.op_type == "Cast" and n.output[0] not in used]
        if not idle:
            break
        keep = [n for n in keep if n not in idle]
    gone = {o for n in g.node for o in n.output} - {o for n in keep for o in n.output}
    del g.node[:]
    g.node.extend(keep)
    kept_info = [v for v in g.value_info if v.name not in gone]
    del g.value_info[:]
    g.value_info.extend(kept_info)
    return removed
