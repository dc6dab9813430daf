"""A tiny CLIP tokenizer folder in Stable Diffusion 1.5's ``tokenizer/`` file format, for offline tests.

The real SD1.5 tokenizer (``openai/clip-vit-large-patch14``) cannot be downloaded here, so
this writes a folder with the same files and the same vocabulary *structure* as CLIP's
(Radford et al. 2021; ``clip/simple_tokenizer.py`` in openai/CLIP):

- ``vocab.json``: the 256 byte-level characters in ``bytes_to_unicode()`` order, then the
  same 256 with the end-of-word suffix ``</w>``, then one token per merge in merge order,
  then ``<|startoftext|>`` and ``<|endoftext|>`` last;
- ``merges.txt``: a ``#version: 0.2`` header line, then one ``left right`` merge per line;
- ``special_tokens_map.json`` / ``tokenizer_config.json``: bos ``<|startoftext|>``, eos, unk
  *and pad* ``<|endoftext|>`` (SD1.5 pads with eos; SD2's tokenizer pads with ``!``),
  ``model_max_length`` 77.

The merges are learnt by a small byte-pair-encoding learner (Sennrich et al. 2016, "Neural
Machine Translation of Rare Words with Subword Units") over a built-in corpus of prompt-like
English, with ties broken by the pair's text, so the folder is identical on every run.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

from trt_bgswap.atomic import write_text_atomic
from trt_bgswap.errors import UsageError

log = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"
MODEL_MAX_LENGTH = 77  # SD1.5's tokenizer_config.json (CLIP's 77 text positions)
BYTE_TOKENS = 256
# 256 byte characters, the same with </w>, and the two special tokens: the vocabulary without merges.
BASE_VOCAB_SIZE = 2 * BYTE_TOKENS + 2

# CLIP's word split for lowercase ASCII text (the built-in corpus is ASCII; the runtime uses
# the full Unicode pattern). Contractions, letter runs, single digits, punctuation runs.
_ASCII_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")

# Prompt-like phrases: background-replacement prompts are short scene descriptions.
_SUBJECTS = (
    "a sunny beach with palm trees",
    "a snowy mountain range at dawn",
    "a busy city street at night with neon lights",
    "a quiet forest path covered in autumn leaves",
    "a modern office with large windows",
    "a cozy living room with a fireplace",
    "a field of sunflowers under a blue sky",
    "an old library full of wooden shelves",
    "a tropical waterfall in the jungle",
    "a desert with red sand dunes",
    "a rainy street in tokyo",
    "a garden full of roses and tulips",
    "a lake surrounded by pine trees",
    "the surface of the moon with stars",
    "a futuristic space station interior",
    "a medieval castle on a green hill",
    "a wooden dock on a calm lake",
    "a kitchen with white marble counters",
    "a photo studio with a grey backdrop",
    "an underwater coral reef with colorful fish",
    "a cafe terrace in paris",
    "a snowy village during christmas",
    "a lavender field in provence",
    "a rooftop bar overlooking the skyline",
    "a misty bamboo forest",
    "a vintage train station",
    "a green meadow with wild flowers",
    "a stone bridge over a river",
    "a harbor with fishing boats",
    "a concert stage with bright spotlights",
    "a classroom with a chalkboard",
    "a subway platform in new york",
    "a volcano erupting at sunset",
    "an icy glacier in iceland",
    "a vineyard in the hills of tuscany",
    "a neon arcade with retro games",
    "a hospital corridor",
    "a gym with weights and mirrors",
    "a canyon with orange rocks",
    "a foggy pier by the ocean",
)
_STYLES = (
    "photorealistic, highly detailed, 8k",
    "soft studio lighting, shallow depth of field",
    "cinematic lighting, golden hour",
    "oil painting, impressionist style",
    "watercolor illustration, pastel colors",
    "professional photography, sharp focus",
    "dramatic clouds, wide angle lens",
    "bokeh background, portrait photography",
    "digital art, trending on artstation",
    "warm tones, natural light",
    "black and white, high contrast",
    "anime style, vibrant colors",
    "35mm film, grainy texture",
    "minimalist, clean composition",
    "fantasy concept art, epic scale",
    "isometric 3d render, octane render",
)
_EXTRAS = (
    "don't include people",
    "it's a beautiful day",
    "the sky is clear and the water is calm",
    "there are birds flying in the distance",
    "we're looking at the horizon",
    "they've painted the walls yellow",
    "i'm standing in front of it",
    "you'll see reflections on the glass",
    "shot on a canon camera, f/1.8, iso 100",
    "trees, rocks, grass, sand, snow, water, clouds",
    "morning, evening, afternoon, midnight, twilight",
    "red, orange, yellow, green, blue, purple, pink, brown",
    "beautiful, amazing, stunning, gorgeous, peaceful, dreamy",
)


def _corpus() -> list[str]:
    """The built-in training text: every subject with two styles and one extra, deterministically."""
    lines = []
    for i, subject in enumerate(_SUBJECTS):
        for j in range(2):
            style = _STYLES[(3 * i + j) % len(_STYLES)]
            extra = _EXTRAS[(i + 5 * j) % len(_EXTRAS)]
            lines.append(f"{subject}, {style}. {extra}")
    return lines


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-character map, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(BYTE_TOKENS):
        if b not in bs:
            bs.append(b)
            cs.append(BYTE_TOKENS + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _word_counts(lines: list[str]) -> Counter[tuple[str, ...]]:
    """Words as symbol tuples, the last symbol carrying </w>, counted over the corpus."""
    byte_char = bytes_to_unicode()
    counts: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        for word in _ASCII_WORDS.findall(" ".join(line.lower().split())):
            chars = [byte_char[b] for b in word.encode("utf-8")]
            counts[tuple(chars[:-1]) + (chars[-1] + END_OF_WORD,)] += 1
    return counts


def learn_merges(lines: list[str], num_merges: int, known: set[str]) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair text).

    A pair whose concatenation is already a token (reachable by another merge path) is
    skipped so that every merge adds exactly one new vocabulary entry.
    """
    words = _word_counts(lines)
    tokens = set(known)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        candidates = [(-c, p) for p, c in pairs.items() if c >= 2 and p[0] + p[1] not in tokens]
        if not candidates:
            break
        _, best = min(candidates)
        merged = best[0] + best[1]
        merges.append(best)
        tokens.add(merged)
        new_words: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return merges


def _special(content: str) -> dict[str, object]:
    """An AddedToken entry as SD1.5's tokenizer files spell it."""
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tiny_clip_tokenizer(folder: str | Path, vocab_size: int = 1000, pad_token: str = EOS_TOKEN) -> Path:
    """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json; returns the folder.

    ``pad_token``: eos for SD1.5's (and SDXL's first) tokenizer, ``!`` for OpenCLIP's (SD2, SDXL's ``tokenizer_2``).

    ``vocab_size`` counts every entry (bytes, bytes with </w>, merges, two special tokens), so a
    text encoder built for the folder uses ``len(vocab.json)`` as its vocabulary size.
    """
    if vocab_size < BASE_VOCAB_SIZE:
        raise UsageError(f"vocab_size={vocab_size}: a CLIP vocabulary needs at least {BASE_VOCAB_SIZE} entries (bytes, bytes+</w>, 2 special tokens)")
    byte_chars = list(bytes_to_unicode().values())
    base = byte_chars + [c + END_OF_WORD for c in byte_chars]
    merges = learn_merges(_corpus(), vocab_size - BASE_VOCAB_SIZE, set(base))
    if len(merges) < vocab_size - BASE_VOCAB_SIZE:
        raise UsageError(
            f"vocab_size={vocab_size}: the built-in corpus supports at most {BASE_VOCAB_SIZE + len(merges)} entries; pass a smaller vocab_size"
        )
    tokens = base + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_text_atomic(folder / "merges.txt", "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in merges]) + "\n")
    special_map = {
        "bos_token": _special(BOS_TOKEN),
        "eos_token": _special(EOS_TOKEN),
        "pad_token": pad_token,  # SD1.5 pads with eos, OpenCLIP tokenizers with "!"
        "unk_token": _special(EOS_TOKEN),
    }
    write_text_atomic(folder / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **_special(BOS_TOKEN)},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **_special(EOS_TOKEN)},
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **_special(EOS_TOKEN)},
    }
    write_text_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    log.info("wrote a tiny CLIP tokenizer (%d entries, %d merges) to %s", len(vocab), len(merges), folder)
    return folder
