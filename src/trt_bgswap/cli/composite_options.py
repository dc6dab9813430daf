"""`run`'s composite options (clean edges, alpha refinement, grain, harmonize, shadow) -> CompositeOptions."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from trt_bgswap.cli.options import float_range
from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.compose import CompositeOptions
from trt_bgswap.runtime.shadow import ShadowOptions

SHADOW_DEFAULTS = ShadowOptions()


def parse_offset(text: str) -> tuple[float, float]:
    """'DX,DY' -> (dx, dy), fractions of the subject's height."""
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shadow-offset {text!r}: write DX,DY as fractions of the subject's height, e.g. 0,0.02") from None
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"--shadow-offset {text!r}: write two numbers DX,DY, e.g. 0,0.02")
    return values  # type: ignore[return-value]


def add_composite_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("composite", "how the subject goes onto the new background (benchmarks/README.md has the measurements)")
    g.add_argument("--no-decontaminate", dest="decontaminate", action="store_false", help="keep the photo's colours at soft edges (default: remove the old background's share)")
    g.add_argument(
        "--refine-alpha", dest="refine_alpha", action=argparse.BooleanOptionalAction, default=True,
        help="sharpen RMBG's alpha along the photo's edges when the photo is larger than RMBG's input (a given --mask is used as it is)",
    )
    g.add_argument("--grain", action="store_true", help="give the background the subject's sensor noise (seeded by --seed; 0 with --bg-color)")
    g.add_argument("--harmonize", type=float_range("--harmonize", 0.0, 1.0), default=0.0, metavar="STRENGTH", help="relight the subject toward the background's light, 0 (off) to 1, bounded; 0.5 is a good start")
    g.add_argument("--shadow", action="store_true", help="a soft contact shadow under the subject (for product photos)")
    g.add_argument("--shadow-offset", type=parse_offset, metavar="DX,DY", help=f"shadow offset, fractions of the subject's height (default {SHADOW_DEFAULTS.offset[0]:g},{SHADOW_DEFAULTS.offset[1]:g})")
    g.add_argument("--shadow-blur", type=float_range("--shadow-blur", 0.0, 1.0), metavar="FRACTION", help=f"shadow blur sigma, fraction of the subject's height (default {SHADOW_DEFAULTS.blur:g})")
    g.add_argument("--shadow-opacity", type=float_range("--shadow-opacity", 0.0, 1.0), metavar="OPACITY", help=f"shadow darkness in (0, 1] (default {SHADOW_DEFAULTS.opacity:g})")


def composite_options_from(args: argparse.Namespace) -> CompositeOptions:
    """The validated options from `run`'s arguments (one-line errors naming the fix)."""
    return build_composite_options(
        decontaminate=args.decontaminate, refine_alpha=args.refine_alpha, grain=args.grain, harmonize=args.harmonize,
        shadow=args.shadow, shadow_offset=args.shadow_offset, shadow_blur=args.shadow_blur, shadow_opacity=args.shadow_opacity,
    )  # fmt: skip


def build_composite_options(
    *,
    decontaminate: bool = True,
    refine_alpha: bool = True,
    grain: bool = False,
    harmonize: float = 0.0,
    shadow: bool = False,
    shadow_offset: tuple[float, float] | None = None,
    shadow_blur: float | None = None,
    shadow_opacity: float | None = None,
    spell: Callable[[str], str] = lambda name: "--" + name.replace("_", "-"),
) -> CompositeOptions:
    """Validated CompositeOptions (the CLI and the server's form fields both come here); shadow settings without shadow are refused.

    ``spell`` names an option in messages (the CLI's flags by default; the server names its form fields).
    """
    shape = {"offset": shadow_offset, "blur": shadow_blur, "opacity": shadow_opacity}
    given = {k: v for k, v in shape.items() if v is not None}
    if given and not shadow:
        named = ", ".join(spell(f"shadow_{k}") for k in given)
        raise UsageError(f"{named} shape the shadow: add {spell('shadow')}, or drop them")
    options = CompositeOptions(
        decontaminate=decontaminate,
        refine_alpha=refine_alpha,
        grain=grain,
        harmonize=harmonize,
        shadow=ShadowOptions(**given) if shadow else None,
    )
    options.validate()
    return options
