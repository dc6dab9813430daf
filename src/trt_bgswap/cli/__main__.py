"""`python -m trt_bgswap.cli ...`: the console script without its launcher (containers, frozen environments)."""

import sys

from trt_bgswap.cli.main import main

sys.exit(main())
