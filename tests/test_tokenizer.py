"""The tiny CLIP tokenizer folder and the lean ClipTokenizer, against transformers' CLIPTokenizer."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode as reference_bytes_to_unicode

from trt_bgswap.errors import ModelError, UsageError
from trt_bgswap.export.tiny_tokenizer import write_tiny_clip_tokenizer
from trt_bgswap.runtime.tokenizer import ClipTokenizer

MAX_LENGTH = 77
LONG_PROMPT = " ".join(["a sunny beach with palm trees and golden sand under a clear sky"] * 16)  # 208 words

PROMPTS = {
    "empty": "",
    "plain": "a sunny beach with palm trees",
    "punctuation": "a city street, at night; neon lights!!! (wet asphalt) -- cinematic...",
    "digits": "shot on a 35mm camera, f/1.8, iso 100, 8k, 2024",
    "contractions": "don't include people, it's a calm day, we're here, they've gone, i'm fine, you'll see, he'd go",
    "accents": "café terrace in Paris, naïve ÉCOLE, crème brûlée, Straße",
    "emoji_cjk": "a beach 🌴🏖️ at sunset 😀 東京の夜 москва",
    "whitespace": "  a   forest \n\n path \t in   autumn  \r\n",
    "uppercase": "A SNOWY MOUNTAIN Range At DAWN",
    "special_literals": "<|endoftext|> text <|ENDOFTEXT|> and <|STARTOFTEXT|> <|startoftext|>",
    "unknown_words": "xylophone quokka zygote qwerty",
    "long_truncated": LONG_PROMPT,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def ours(tiny_dir: Path) -> ClipTokenizer:
    return ClipTokenizer.from_dir(tiny_dir)


def _reference_ids(tok: CLIPTokenizer, prompt: str) -> tuple[list[int], int]:
    """The ids diffusers' pipelines feed the text encoder, and the untruncated length."""
    ids = tok(prompt, padding="max_length", max_length=MAX_LENGTH, truncation=True)["input_ids"]
    return ids, len(tok(prompt)["input_ids"])


def _first_diff(a: list[int], b: list[int]) -> str:
    idx = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return f"first differing position {idx}: ours {a[idx] if idx is not None else None} vs transformers {b[idx] if idx is not None else None}"


@pytest.mark.parametrize("prompt", list(PROMPTS.values()), ids=list(PROMPTS))
def test_ids_equal_transformers(prompt: str, ours: ClipTokenizer, reference: CLIPTokenizer) -> None:
    expected, full_length = _reference_ids(reference, prompt)
    ids, truncated = ours.encode(prompt)
    assert ids.dtype == np.int32 and ids.shape == (MAX_LENGTH,)
    assert ids.tolist() == expected, _first_diff(ids.tolist(), expected)
    assert truncated == (full_length > MAX_LENGTH), f"truncated={truncated} but transformers' untruncated length is {full_length}"


def test_long_prompt_truncates_and_warns(ours: ClipTokenizer, reference: CLIPTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    _, full_length = _reference_ids(reference, LONG_PROMPT)
    assert full_length > MAX_LENGTH  # precondition: the prompt really is too long
    with caplog.at_level(logging.WARNING, logger="trt_bgswap.runtime.tokenizer"):
        ids, truncated = ours.encode(LONG_PROMPT)
    assert truncated and ids[-1] == ours.eos_id
    assert f"{full_length - MAX_LENGTH} tokens dropped" in caplog.text, caplog.text


def test_short_prompt_does_not_warn(ours: ClipTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="trt_bgswap.runtime.tokenizer"):
        _, truncated = ours.encode(PROMPTS["plain"])
    assert not truncated and caplog.text == ""


def test_encode_batch_equals_encode(ours: ClipTokenizer) -> None:
    prompts = list(PROMPTS.values())
    ids, truncated = ours.encode_batch(prompts)
    assert ids.shape == (len(prompts), MAX_LENGTH) and ids.dtype == np.int32 and truncated.dtype == bool
    for row, flag, prompt in zip(ids, truncated, prompts):
        single, single_flag = ours.encode(prompt)
        np.testing.assert_array_equal(row, single, err_msg=repr(prompt))
        assert flag == single_flag


def test_tokenizer_json_folder_equals_transformers(tiny_dir: Path, tmp_path: Path) -> None:
    """A folder saved by transformers (tokenizer.json, no vocab.json/merges.txt) tokenizes the same."""
    CLIPTokenizer.from_pretrained(str(tiny_dir)).save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "vocab.json").exists()
    reference, ours = CLIPTokenizer.from_pretrained(str(tmp_path)), ClipTokenizer.from_dir(tmp_path)
    for name, prompt in PROMPTS.items():
        expected, _ = _reference_ids(reference, prompt)
        assert ours.encode(prompt)[0].tolist() == expected, f"{name}: {_first_diff(ours.encode(prompt)[0].tolist(), expected)}"


def test_sd2_style_pad_token_equals_transformers(tiny_dir: Path, tmp_path: Path) -> None:
    """SD2's tokenizer pads with '!' (id 0), not eos: the folder's pad token is honoured."""
    folder = tmp_path / "sd2_tokenizer"
    shutil.copytree(tiny_dir, folder)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text(encoding="utf-8"))
        data["pad_token"] = "!"
        (folder / name).write_text(json.dumps(data), encoding="utf-8")
    reference, ours = CLIPTokenizer.from_pretrained(str(folder)), ClipTokenizer.from_dir(folder)
    assert ours.pad_id == reference.pad_token_id == 0
    for name in ("plain", "special_literals", "long_truncated"):
        expected, _ = _reference_ids(reference, PROMPTS[name])
        assert ours.encode(PROMPTS[name])[0].tolist() == expected, name


def test_tiny_folder_has_clip_structure(tiny_dir: Path, reference: CLIPTokenizer) -> None:
    vocab = json.loads((tiny_dir / "vocab.json").read_text(encoding="utf-8"))
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert sorted(vocab.values()) == list(range(len(vocab))) == list(range(1000))
    byte_chars = list(reference_bytes_to_unicode().values())
    assert tokens[:256] == byte_chars
    assert tokens[256:512] == [c + "</w>" for c in byte_chars]
    lines = (tiny_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert tokens[512:-2] == [line.replace(" ", "") for line in lines[1:]]
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = json.loads((tiny_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert config["model_max_length"] == reference.model_max_length == MAX_LENGTH
    assert special["pad_token"] == config["pad_token"] == "<|endoftext|>"
    assert reference.pad_token_id == reference.eos_token_id == vocab["<|endoftext|>"]
    assert reference.bos_token_id == vocab["<|startoftext|>"]


def test_tiny_folder_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_clip_tokenizer(tmp_path / "again")
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name


@pytest.mark.parametrize("vocab_size", [514, 700, 1200])
def test_tiny_folder_vocab_size(vocab_size: int, tmp_path: Path) -> None:
    folder = write_tiny_clip_tokenizer(tmp_path, vocab_size=vocab_size)
    assert len(json.loads((folder / "vocab.json").read_text(encoding="utf-8"))) == vocab_size
    assert len(CLIPTokenizer.from_pretrained(str(folder))) == vocab_size


@pytest.mark.parametrize("vocab_size", [100, 513, 100_000])
def test_tiny_folder_bad_vocab_size(vocab_size: int, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"vocab_size={vocab_size}"):
        write_tiny_clip_tokenizer(tmp_path, vocab_size=vocab_size)


def _corrupt(folder: Path, case: str) -> None:
    if case == "missing_merges":
        (folder / "merges.txt").unlink()
    elif case == "vocab_not_json":
        (folder / "vocab.json").write_text("{not json", encoding="utf-8")
    elif case == "merge_outside_vocab":
        with (folder / "merges.txt").open("a", encoding="utf-8") as f:
            f.write("qqq zzz\n")
    elif case == "bad_merge_line":
        with (folder / "merges.txt").open("a", encoding="utf-8") as f:
            f.write("a b c\n")
    elif case == "eos_not_in_vocab":
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        del vocab["<|endoftext|>"]
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    elif case == "no_model_max_length":
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        del config["model_max_length"]
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing_merges", "no vocab.json"),
        ("vocab_not_json", "vocab.json: cannot read"),
        ("merge_outside_vocab", "inconsistent vocab/merges"),
        ("bad_merge_line", "not a 'left right' merge"),
        ("eos_not_in_vocab", "not in the vocabulary"),
        ("no_model_max_length", "model_max_length"),
    ],
)
def test_corrupt_folder_raises_model_error(case: str, match: str, tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_dir, folder)
    _corrupt(folder, case)
    with pytest.raises(ModelError, match=match):
        ClipTokenizer.from_dir(folder)


def test_missing_folder_raises_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        ClipTokenizer.from_dir(tmp_path / "nope")


@pytest.mark.parametrize("module", ["trt_bgswap.runtime.tokenizer", "trt_bgswap.runtime.scheduler"])
def test_import_pulls_in_no_heavy_stack(module: str) -> None:
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'diffusers'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"importing {module} imported: {proc.stdout.strip()}"
