#!/usr/bin/env python3
"""Side-by-side panel for the demo: input | mask | result, each with a caption underneath.

    python scripts/demo_panel.py INPUT MASK RESULT -o PANEL.png

The three images are shown at the same height (the input's, at most 384 px); Pillow only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CAPTIONS = ("input", "mask (white = subject kept)", "result (subject kept, background replaced)")
MAX_HEIGHT = 384
CAPTION_HEIGHT = 22
GAP = 8


def panel(paths: list[Path], captions: tuple[str, ...] = CAPTIONS) -> Image.Image:
    images = [Image.open(p).convert("RGB") for p in paths]
    height = min(MAX_HEIGHT, images[0].height)
    images = [im.resize((max(1, round(im.width * height / im.height)), height), Image.Resampling.LANCZOS) for im in images]
    width = sum(im.width for im in images) + GAP * (len(images) - 1)
    out = Image.new("RGB", (width, height + CAPTION_HEIGHT), "white")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    x = 0
    for im, caption in zip(images, captions):
        out.paste(im, (x, 0))
        draw.text((x + 4, height + 5), caption, fill="black", font=font)
        x += im.width + GAP
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", type=Path)
    ap.add_argument("mask", type=Path)
    ap.add_argument("result", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    panel([args.input, args.mask, args.result]).save(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
