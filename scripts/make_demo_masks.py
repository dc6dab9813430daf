#!/usr/bin/env python3
"""Ground-truth subject masks of the demo photos, rendered from hand-drawn polygons.

The polygons (``examples/demo-masks/polygons.json``) outline the subject of four public-domain /
CC0 photos: the demo's ``examples/astronaut.jpg`` and ``examples/chelsea.jpg``, and scikit-image's
``coffee`` and ``camera``. They were placed by eye on zoomed crops with a pixel grid and checked on
overlays; the JSON says how exact they are. They are the training targets of the demo masker
(``scripts/fit_demo_masker.py``) and the reference its tests measure IoU against.

    python scripts/make_demo_masks.py                      # (re)write examples/demo-masks/<name>.png
    python scripts/make_demo_masks.py --check              # exit 1 if a committed PNG differs from its polygons
    python scripts/make_demo_masks.py --overlays out/gt    # photo + outline PNGs for a person to look at

Needs numpy, Pillow and scikit-image (``pip install -e '.[test]'``): ``skimage.draw.polygon2mask``
rasterises (a pixel is inside when its centre is), ``skimage.data`` holds the two extra photos.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MASK_DIR = ROOT / "examples" / "demo-masks"
POLYGONS = MASK_DIR / "polygons.json"
SKIMAGE_PREFIX = "skimage:"


def photo_table(path: Path = POLYGONS) -> dict[str, dict[str, Any]]:
    """``{name: {source, licence, subject, size, polygons}}`` from the polygon file."""
    return json.loads(path.read_text(encoding="utf-8"))["photos"]


def load_photo(source: str) -> np.ndarray:
    """An HxWx3 uint8 RGB photo: a repository path, or ``skimage:<name>`` for ``skimage.data.<name>()``."""
    if source.startswith(SKIMAGE_PREFIX):
        import skimage.data

        rgb = np.asarray(getattr(skimage.data, source[len(SKIMAGE_PREFIX):])())
        if rgb.ndim == 2:  # camera is grey: three equal channels, as a photo reader would give
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        return rgb
    with Image.open(ROOT / source) as im:
        return np.asarray(im.convert("RGB"))


def render_mask(entry: dict[str, Any]) -> np.ndarray:
    """The HxW bool subject mask of one photo's polygons ('add' then 'sub', in order)."""
    from skimage.draw import polygon2mask

    width, height = entry["size"]
    mask = np.zeros((height, width), dtype=bool)
    for poly in entry["polygons"]:
        xy = np.asarray(poly["points"], dtype=np.float64)
        # vertices are in pixel-edge units; polygon2mask tests pixel centres at integer (row, col)
        inside = polygon2mask((height, width), xy[:, ::-1] - 0.5)
        if poly["op"] == "add":
            mask |= inside
        elif poly["op"] == "sub":
            mask &= ~inside
        else:
            raise ValueError(f"polygon op {poly['op']!r}: use 'add' or 'sub'")
    return mask


def read_mask(name: str) -> np.ndarray:
    """A committed ground-truth mask as HxW bool."""
    with Image.open(MASK_DIR / f"{name}.png") as im:
        return np.asarray(im.convert("L")) >= 128


def overlay(rgb: np.ndarray, mask: np.ndarray) -> Image.Image:
    """Background dimmed and tinted blue, the outline in green: the check a person looks at."""
    out = rgb.astype(np.float32)
    out[~mask] = out[~mask] * 0.45 + np.array([0.0, 0.0, 255.0]) * 0.55
    edge = (mask != np.roll(mask, 1, 0)) | (mask != np.roll(mask, 1, 1))
    out[edge] = (0.0, 255.0, 0.0)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare the committed PNGs with the polygons; write nothing")
    ap.add_argument("--overlays", type=Path, help="also write <name>_overlay.png (photo with the outline) into this folder")
    args = ap.parse_args(argv)
    stale = []
    for name, entry in photo_table().items():
        mask = render_mask(entry)
        target = MASK_DIR / f"{name}.png"
        if args.check:
            if not target.is_file() or not np.array_equal(read_mask(name), mask):
                stale.append(name)
        else:
            Image.fromarray(mask.astype(np.uint8) * 255).save(target, optimize=True)
        if args.overlays:
            rgb = load_photo(entry["source"])
            if rgb.shape[:2] != mask.shape:
                raise SystemExit(f"{entry['source']}: photo is {rgb.shape[1]}x{rgb.shape[0]}, polygons.json says {entry['size']}")
            args.overlays.mkdir(parents=True, exist_ok=True)
            overlay(rgb, mask).save(args.overlays / f"{name}_overlay.png")
        print(f"{name}: {mask.mean():.1%} subject" + ("" if args.check else f" -> {target.relative_to(ROOT)}"))
    if stale:
        print(f"stale: {', '.join(stale)} differ from polygons.json; run python scripts/make_demo_masks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
