"""The `trt-bgswap` command line: one module per command, each a thin layer over the library.

Every failure the user can act on is one line on stderr and a non-zero exit code (2 for bad
options, 1 for failed inputs or models); batch runs report a failing image and go on, then
print a summary. Heavy modules (torch, the exporters, TensorRT) are imported only by the
commands that need them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from trt_bgswap import __version__
from trt_bgswap.cli import (
    bench_command,
    build_command,
    dataset_command,
    export_command,
    finetune_command,
    info_command,
    mask_command,
    run_command,
    serve_command,
    tiny_models_command,
)
from trt_bgswap.cli.options import Parser, verbosity_parent
from trt_bgswap.errors import BgSwapError

log = logging.getLogger("trt_bgswap")

# Each module has NAME, HELP, add_arguments(its sub-command's parser) and run(args) -> exit code.
COMMANDS = (
    run_command,
    mask_command,
    export_command,
    tiny_models_command,
    build_command,
    info_command,
    bench_command,
    serve_command,
    dataset_command,
    finetune_command,
)


def build_parser() -> Parser:
    p = Parser(prog="trt-bgswap", description="AI background replacement: RMBG mask, LCM inpainting, composite.")
    p.add_argument("--version", action="version", version=f"trt-bgswap {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    parents = [verbosity_parent()]
    for command in COMMANDS:
        parser = sub.add_parser(command.NAME, help=command.HELP, parents=parents)
        command.add_arguments(parser)
        parser.set_defaults(func=command.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # bad options (exit 2, one line already written), --help, --version
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # Our own handler on our logger, bound to this call's stderr, and no propagation to the root logger:
    # a library or tool that configured the root logger (logging.basicConfig) would print every line twice.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s"))
    saved = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    try:
        return int(args.func(args) or 0)
    except BgSwapError as e:
        if args.verbose:
            log.debug("traceback", exc_info=True)
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
