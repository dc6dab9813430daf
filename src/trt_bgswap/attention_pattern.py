"""Where an ONNX graph computes attention: ``MatMul -> Softmax -> MatMul`` node triples.

PyTorch's TorchScript ONNX exporter writes ``scaled_dot_product_attention`` (and diffusers'
classic attention processors) as scores = ``MatMul(Q, K^T)``, probabilities =
``Softmax(scores, axis=-1)``, output = ``MatMul(probabilities, V)``. The exporter's memory
facts (:mod:`trt_bgswap.export.memory_facts`) and the build's tiled-attention rewrite
(:mod:`trt_bgswap.engines.attention`) find attention the same way, here. Pure Python over
the graph's node list: no onnx import, so this module stays in the lean core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AttentionNodes:
    scores: Any  # MatMul(Q, K^T) node
    softmax: Any  # Softmax(scores) node
    mix: Any  # MatMul(probabilities, V) node

    @property
    def q(self) -> str:
        return str(self.scores.input[0])

    @property
    def k_t(self) -> str:
        return str(self.scores.input[1])

    @property
    def v(self) -> str:
        return str(self.mix.input[1])


def find_attention(nodes: Sequence[Any], graph_outputs: Sequence[str] = ()) -> tuple[list[AttentionNodes], list[str]]:
    """The graph's attention triples, and why any other Softmax is not one (by softmax name).

    A triple qualifies when the scores feed only the softmax over the last axis, and the
    probabilities feed only the second MatMul as its left operand, neither being a graph output.
    """
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = set(graph_outputs)
    found: list[AttentionNodes] = []
    other: list[str] = []
    for softmax in nodes:
        if softmax.op_type != "Softmax":
            continue
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
        scores = producer.get(softmax.input[0])
        users = consumers.get(softmax.output[0], [])
        if scores is None or scores.op_type != "MatMul" or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != softmax.output[0]:
            other.append(f"{softmax.name}: not MatMul -> Softmax -> MatMul")
        elif len(consumers.get(scores.output[0], [])) != 1 or {scores.output[0], softmax.output[0]} & outputs:
            other.append(f"{softmax.name}: the scores are used elsewhere")
        elif axis not in (-1, 3):
            other.append(f"{softmax.name}: softmax over axis {axis}, not the keys")
        else:
            found.append(AttentionNodes(scores, softmax, users[0]))
    return found, other
