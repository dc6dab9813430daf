"""`trt-bgswap tiny-models DIR`: tiny random-weight models in the real formats, for offline smoke tests."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("trt_bgswap")

NAME = "tiny-models"
HELP = "write tiny random-weight models in the real formats (offline smoke tests)"


def add_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("dir")


def run(args: argparse.Namespace) -> int:
    from trt_bgswap.export.tiny import write_tiny_models

    for name, path in write_tiny_models(Path(args.dir)).items():
        log.info("%s: %s", name, path)
    return 0
