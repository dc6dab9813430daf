"""`python benchmarks/bench.py ...` is `trt-bgswap bench ...` (see README.md in this folder).

The measuring code lives in the package (``trt_bgswap.benchmarking``) so the installed CLI
can run it; this script only forwards its arguments.
"""

from __future__ import annotations

import sys

from trt_bgswap.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
