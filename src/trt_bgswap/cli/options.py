"""Argument types and option groups shared by the commands: a bad value fails with the option's name and the fix."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from trt_bgswap.errors import UsageError

if TYPE_CHECKING:
    from trt_bgswap.export.lora import LoraSource


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default in --help unless its text already says it, or it has none worth showing (flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "default" in text or not action.option_strings or default is None or default is False or default is argparse.SUPPRESS or default == "":
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the problem and where to look, exit code 2) and defaults shown in --help."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def int_range(name: str, lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{name}={v}: must be between {lo} and {hi}")
        return v

    return parse


def float_range(name: str, lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not lo <= v <= hi:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{name}={v}: must be between {lo} and {hi}")
        return v

    return parse


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' (or one number for a square) -> (width, height)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: write WIDTHxHEIGHT, e.g. 576x448") from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) <= 0:
        raise argparse.ArgumentTypeError(f"--size {text!r}: write WIDTHxHEIGHT with positive numbers, e.g. 576x448")
    return nums[0], nums[1]


def lora_spec(text: str) -> "LoraSource":
    """--lora FILE[:SCALE]: an existing path wins over a ':SCALE' reading; a bad scale or a missing file exits 2."""
    from trt_bgswap.export.lora import parse_lora_spec  # pure Python: no torch

    try:
        source = parse_lora_spec(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not source.path.exists():
        raise argparse.ArgumentTypeError(f"--lora {text!r}: no such file or folder {source.path}; give a LoRA .safetensors file or its folder")
    return source


def byte_size(text: str) -> int:
    """'6G', '512M', a number of bytes (trt_bgswap.memory.parse_bytes)."""
    from trt_bgswap.memory import parse_bytes

    try:
        return parse_bytes(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def color(text: str) -> tuple[int, int, int]:
    from trt_bgswap.colors import parse_color

    try:
        return parse_color(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def verbosity_parent() -> argparse.ArgumentParser:
    """-v/-q, accepted before and after the sub-command (`trt-bgswap -q run ...` and `trt-bgswap run ... -q`)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging and tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and errors")
    return p


def add_batch_options(sp: argparse.ArgumentParser, providers: tuple[str, ...]) -> None:
    """Inputs, outputs and the backend: what every batch command (run, mask) takes."""
    sp.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, folders or globs")
    sp.add_argument("--recursive", action="store_true", help="look into sub-folders of folder inputs (the tree is mirrored under -o)")
    sp.add_argument("--overwrite", action="store_true", help="redo outputs that exist (default: skip them)")
    sp.add_argument(
        "--provider",
        choices=providers,
        default="auto",
        help="auto (TensorRT engines, then ONNX Runtime CUDA, then CPU), trt (TensorRT engines), tensorrt/cuda (ONNX Runtime providers) or cpu",
    )
    sp.add_argument("--threads", type=int_range("--threads", 0, 256), default=0, help="intra-op threads (0: all cores)")
    sp.add_argument("--max-pixels", type=int_range("--max-pixels", 1, 2**40), default=None, help="refuse larger images (decompression-bomb guard; default 2**26)")
    sp.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
    sp.add_argument("--strip-metadata", action="store_true", help="write no EXIF metadata (default: keep the input's, minus orientation and GPS)")
    sp.add_argument("--keep-gps", action="store_true", help="keep the input's GPS position in the written EXIF (dropped by default)")
