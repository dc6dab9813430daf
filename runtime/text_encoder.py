"""The text stage: a prompt -> the CLIP text encoder's hidden states, each distinct prompt encoded once."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from trt_bgswap.runtime.denoise import cast_for
from trt_bgswap.runtime.engine import Engine, EngineStage
from trt_bgswap.runtime.tokenizer import ClipTokenizer
from trt_bgswap.specs import TextEncoderIO

PROMPT_CACHE_SIZE = 64  # a batch with one prompt (or a server with a few popular ones) skips the encoder


class TextEncoder(EngineStage):
    def __init__(self, engine: Engine, tokenizer: ClipTokenizer, cache_size: int = PROMPT_CACHE_SIZE) -> None:
        super().__init__(engine)
        self.tokenizer, self.cache_size = tokenizer, cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def embeddings(self, prompt: str) -> np.ndarray:
        """(1, S, D) hidden states, from the cache when the prompt was encoded before (least recently used goes first)."""
        cached = self._cache.get(prompt)
        if cached is not None:
            self._cache.move_to_end(prompt)
            return cached
        ids, _ = self.tokenizer.encode(prompt)  # the tokenizer warns when it truncates
        out = self.engine(**{TextEncoderIO.INPUT_IDS: cast_for(self.engine, TextEncoderIO.INPUT_IDS, ids[None])})
        hidden = out[TextEncoderIO.HIDDEN_STATES].astype(np.float32)
        self._cache[prompt] = hidden
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return hidden

    def close(self) -> None:
        self._cache.clear()
        super().close()
