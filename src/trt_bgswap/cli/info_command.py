"""`trt-bgswap info`: versions, backends, GPUs and what the caches hold."""

from __future__ import annotations

import argparse
import sys

NAME = "info"
HELP = "versions, backends, GPU and cache contents"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    from trt_bgswap.info import info_text

    sys.stdout.write(info_text() + "\n")
    return 0
