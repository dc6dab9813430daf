"""The text stage: a prompt -> a CLIP text encoder graph's outputs, each distinct prompt encoded once."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from trt_bgswap.runtime.denoise import cast_for
from trt_bgswap.runtime.engine import Engine, EngineStage
from trt_bgswap.runtime.tokenizer import ClipTokenizer
from trt_bgswap.specs import TextEncoderIO

PROMPT_CACHE_SIZE = 64  # a batch with one prompt (or a server with a few popular ones) skips the encoder


class TextEncoder(EngineStage):
    """Tokenizer + text encoder graph; every output of the graph (hidden states, SDXL's ``text_embeds``) as float32."""

    def __init__(self, engine: Engine, tokenizer: ClipTokenizer, cache_size: int = PROMPT_CACHE_SIZE) -> None:
        super().__init__(engine)
        self.tokenizer, self.cache_size = tokenizer, cache_size
        self._cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()

    def outputs(self, prompt: str) -> dict[str, np.ndarray]:
        """Every output of the graph for one prompt (batch 1), from the cache when the prompt was encoded before."""
        cached = self._cache.get(prompt)
        if cached is not None:
            self._cache.move_to_end(prompt)
            return cached
        ids, _ = self.tokenizer.encode(prompt)  # the tokenizer warns when it truncates
        out = self.engine(**{TextEncoderIO.INPUT_IDS: cast_for(self.engine, TextEncoderIO.INPUT_IDS, ids[None])})
        result = {name: np.asarray(out[name], dtype=np.float32) for name in self.engine.spec.output_names}
        self._cache[prompt] = result
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)  # least recently used goes first
        return result

    def embeddings(self, prompt: str) -> np.ndarray:
        """(1, S, D) hidden states: the graph's first output (the last layer's for SD1/SD2, the penultimate for SDXL)."""
        return self.outputs(prompt)[self.engine.spec.output_names[0]]

    def close(self) -> None:
        self._cache.clear()
        super().close()
