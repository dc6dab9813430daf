"""CLIP tokenization for the lean runtime, on the ``tokenizers`` library alone (no transformers).

Rebuilds what transformers' ``CLIPTokenizer`` (``models/clip/tokenization_clip.py``) builds from
a Stable Diffusion ``tokenizer/`` folder, so the ids are the ones the text encoder was trained
with (Radford et al. 2021, CLIP; byte-level BPE as in openai/CLIP ``simple_tokenizer.py``):

1. normalize: NFC, every whitespace run -> one space, lowercase;
2. split with CLIP's regex (special tokens, contractions, letter runs, single digits,
   punctuation runs), then map bytes to CLIP's printable characters;
3. byte-pair-encode each word with ``</w>`` marking its last symbol;
4. ``<|startoftext|> ... <|endoftext|>``, truncated to ``model_max_length`` keeping the eos
   and padded with the folder's pad token, as diffusers' pipelines call the tokenizer
   (``padding="max_length", truncation=True``). SD1.5 pads with eos, SD2 with ``!``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from trt_bgswap.errors import ModelError

log = logging.getLogger(__name__)

# CLIP's word split, as transformers' CLIPTokenizer spells it for the tokenizers library.
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
END_OF_WORD = "</w>"
MERGES_HEADER = "#version"
# CLIPTokenizer's defaults when a folder's config does not name a token.
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read tokenizer file ({exc}); re-export the model folder") from exc


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt as the tokenizers library reads it: skip the ``#version`` header, ``left right`` per line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read merges ({exc}); re-export the model folder") from exc
    merges = []
    for n, line in enumerate(lines, start=1):
        if (n == 1 and line.startswith(MERGES_HEADER)) or not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ModelError(f"{path}:{n}: {line!r} is not a 'left right' merge; re-export the model folder")
        merges.append((parts[0], parts[1]))
    return merges


def _vocab_and_merges(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, bool]]:
    """Vocab, merges and added-token ``normalized`` flags: from tokenizer.json if present (as
    transformers prefers it), else from vocab.json + merges.txt (SD1.5's files, no flags)."""
    vocab_file, merges_file, tokenizer_file = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    normalized: dict[str, bool] = {}
    if tokenizer_file.is_file():
        data = _read_json(tokenizer_file)
        model = data.get("model", {}) if isinstance(data, dict) else {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise ModelError(f"{tokenizer_file}: not a BPE tokenizer (model type {model.get('type')!r}); a CLIP tokenizer folder is needed")
        vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        if any(len(m) != 2 for m in merges):
            raise ModelError(f"{tokenizer_file}: malformed merges; re-export the model folder")
        for token in data.get("added_tokens", []):
            if isinstance(token, dict) and "content" in token:
                normalized[str(token["content"])] = bool(token.get("normalized", False))
    elif vocab_file.is_file() and merges_file.is_file():
        vocab = _read_json(vocab_file)
        merges = _read_merges(merges_file)
    else:
        raise ModelError(f"{folder}: no vocab.json + merges.txt (or tokenizer.json); re-run `trt-bgswap export` to write the model folder again")
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise ModelError(f"{folder}: vocab must map token strings to integer ids; re-export the model folder")
    return vocab, merges, normalized  # type: ignore[return-value]


def _special_tokens(folder: Path) -> dict[str, str | dict[str, Any]]:
    """bos/eos/unk/pad as transformers resolves them: special_tokens_map.json over tokenizer_config.json over defaults."""
    tokens: dict[str, str | dict[str, Any]] = dict(DEFAULT_SPECIAL_TOKENS)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            data = _read_json(path)
            if not isinstance(data, dict):
                raise ModelError(f"{path}: expected a JSON object; re-export the model folder")
            for key in DEFAULT_SPECIAL_TOKENS:
                value = data.get(key)
                if isinstance(value, (str, dict)):
                    tokens[key] = value
    return tokens


def _content(token: str | dict[str, Any]) -> str:
    return token if isinstance(token, str) else str(token.get("content", ""))


class ClipTokenizer:
    """Prompt -> fixed-length int32 CLIP token ids, exactly as the pipeline's own tokenizer gives them."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, eos_id: int, pad_id: int) -> None:
        if max_length < 2:
            raise ModelError(f"max_length={max_length}: a CLIP tokenizer needs room for bos and eos; check model_max_length")
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.eos_id = eos_id
        self.pad_id = pad_id

    @classmethod
    def from_dir(cls, folder: str | Path, max_length: int | None = None) -> ClipTokenizer:
        """Load a ``tokenizer/`` folder; ``max_length`` defaults to its ``model_max_length``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelError(f"{folder}: tokenizer folder not found; re-run `trt-bgswap export` to write the model folder again")
        vocab, merges, file_flags = _vocab_and_merges(folder)
        specials = _special_tokens(folder)
        config_file = folder / "tokenizer_config.json"
        if max_length is None:
            config = _read_json(config_file) if config_file.is_file() else {}
            value = config.get("model_max_length") if isinstance(config, dict) else None
            if not isinstance(value, int):
                raise ModelError(
                    f"{config_file}: no integer model_max_length ({value!r}); re-run `trt-bgswap export` from a source whose "
                    "tokenizer_config.json has it (the text encoder's max_position_embeddings, 77 for CLIP)"
                )
            max_length = value
        ids = {}
        for key, token in specials.items():
            if _content(token) not in vocab:
                raise ModelError(f"{folder}: {key} {_content(token)!r} is not in the vocabulary; re-export the model folder")
            ids[key] = vocab[_content(token)]

        try:
            tok = Tokenizer(
                BPE(
                    vocab=vocab,
                    merges=merges,
                    dropout=None,
                    continuing_subword_prefix="",
                    end_of_word_suffix=END_OF_WORD,
                    fuse_unk=False,
                    unk_token=_content(specials["unk_token"]),
                )
            )
        except Exception as exc:  # the Rust side raises a bare Exception for merges outside the vocab
            raise ModelError(f"{folder}: inconsistent vocab/merges ({exc}); re-export the model folder") from exc
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        # Special tokens are matched in the text before the model. As in transformers: a
        # tokenizer.json's flags win; otherwise a token spelt as a plain string is matched
        # un-normalized, and a later attribute with the same content (pad after eos) decides.
        added: dict[str, AddedToken] = {}
        for token in specials.values():
            content = _content(token)
            normalized = bool(token.get("normalized", False)) if isinstance(token, dict) else False
            added[content] = AddedToken(content, normalized=file_flags.get(content, normalized), special=True)
        tok.add_special_tokens(list(added.values()))
        tok.post_processor = processors.RobertaProcessing(
            (_content(specials["eos_token"]), ids["eos_token"]),
            (_content(specials["bos_token"]), ids["bos_token"]),
            trim_offsets=False,
            add_prefix_space=False,
        )
        return cls(tok, max_length, ids["eos_token"], ids["pad_token"])

    def _fit(self, ids: list[int], prompt: str) -> tuple[np.ndarray, bool]:
        """Truncate keeping the final eos, pad to max_length (transformers' max_length + truncation)."""
        out = np.full((self.max_length,), self.pad_id, dtype=np.int32)
        truncated = len(ids) > self.max_length
        if truncated:
            log.warning(
                "prompt truncated to the text encoder's %d tokens: %d tokens dropped (prompt starts %r)",
                self.max_length,
                len(ids) - self.max_length,
                prompt[:40],
            )
            ids = ids[: self.max_length - 1] + [self.eos_id]
        out[: len(ids)] = ids
        return out, truncated

    def encode(self, prompt: str) -> tuple[np.ndarray, bool]:
        """(int32 ids of shape (max_length,), whether the prompt was truncated)."""
        return self._fit(self._tokenizer.encode(prompt).ids, prompt)

    def encode_batch(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(int32 ids of shape (len(prompts), max_length), bool truncated flags of shape (len(prompts),))."""
        encodings = self._tokenizer.encode_batch(list(prompts))
        rows = [self._fit(enc.ids, prompt) for enc, prompt in zip(encodings, prompts)]
        ids = np.stack([r[0] for r in rows]) if rows else np.zeros((0, self.max_length), dtype=np.int32)
        return ids, np.array([r[1] for r in rows], dtype=bool)
