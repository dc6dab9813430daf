"""The `trt-bgswap` command line (:mod:`trt_bgswap.cli.main`), one module per command as rembg keeps them."""

from trt_bgswap.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
