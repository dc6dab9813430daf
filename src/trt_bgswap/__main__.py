"""`python -m trt_bgswap ...`: the same as the `trt-bgswap` console script."""

import sys

from trt_bgswap.cli.main import main

sys.exit(main())
