"""Before/after pictures of the composite for the README, made by `trt-bgswap run` itself.

    python scripts/composite_pictures.py            # writes docs/images/composite_*.png

Each picture is the product's output twice (the option off, then on), run in-process through
the CLI on a composite with a known truth (:mod:`trt_bgswap.benchmarking.mattes`: a subject photo,
an old background photo and an alpha), with the TRUE alpha given as ``--mask`` and a solid
``--bg-color`` (no model is needed, so the pictures are the same on every machine). Edges are
shown enlarged (nearest neighbour) so single pixels are visible.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trt_bgswap.api import alpha_to_u8
from trt_bgswap.benchmarking.mattes import make_case, render_alpha, scene_photo
from trt_bgswap.cli import main
from trt_bgswap.runtime.harmonize import linear_to_srgb, srgb_to_linear

OUT = Path(__file__).resolve().parent.parent / "docs" / "images"
H, W = 480, 640
LABEL_H = 18


def product(photo: np.ndarray, alpha: np.ndarray, colour: str, *flags: str) -> np.ndarray:
    """`trt-bgswap run photo --mask alpha --bg-color colour flags` -> the output pixels."""
    with tempfile.TemporaryDirectory() as tmp:
        src, mask, out = Path(tmp) / "photo.png", Path(tmp) / "mask.png", Path(tmp) / "out.png"
        Image.fromarray(photo).save(src)
        Image.fromarray(alpha_to_u8(alpha)).save(mask)
        code = main(["-q", "run", str(src), "--mask", str(mask), "--bg-color", colour, "-o", str(out), *flags])
        if code != 0:
            raise SystemExit(f"trt-bgswap run failed with exit code {code}")
        return np.asarray(Image.open(out).convert("RGB"))


def labelled(image: np.ndarray, text: str) -> Image.Image:
    im = Image.new("RGB", (image.shape[1], image.shape[0] + LABEL_H), "white")
    im.paste(Image.fromarray(image), (0, LABEL_H))
    ImageDraw.Draw(im).text((4, 3), text, fill="black")
    return im


def panel(path: Path, tiles: list[tuple[np.ndarray, str]]) -> None:
    ims = [labelled(t, s) for t, s in tiles]
    out = Image.new("RGB", (sum(i.width for i in ims) + 4 * (len(ims) - 1), max(i.height for i in ims)), "white")
    x = 0
    for im in ims:
        out.paste(im, (x, 0))
        x += im.width + 4
    out.save(path, optimize=True)
    print(f"{path} ({path.stat().st_size // 1024} KiB)")


def zoom(image: np.ndarray, top: int, left: int, size: tuple[int, int], factor: int) -> np.ndarray:
    crop = image[top : top + size[0], left : left + size[1]]
    return np.asarray(Image.fromarray(crop).resize((size[1] * factor, size[0] * factor), Image.Resampling.NEAREST))


def edges() -> None:
    """Fur photographed on a lawn, put on blue: the lawn's green shows through the fur unless F is estimated."""
    alpha = render_alpha("hair", H, W, np.random.default_rng(11))
    case = make_case("fur", scene_photo("chelsea", H, W), scene_photo("grass", H, W), alpha)
    before = product(case.image, case.alpha, "#2a6fdb", "--no-decontaminate")
    after = product(case.image, case.alpha, "#2a6fdb")
    a = case.alpha[..., None]
    truth = np.clip(np.rint(a * case.foreground + (1 - a) * np.array([0x2A, 0x6F, 0xDB])), 0, 255).astype(np.uint8)
    rows, cols = np.nonzero((case.alpha > 0.05) & (case.alpha < 0.6))
    top, left = int(np.median(rows)) - 40, int(np.median(cols)) - 60
    crop = (80, 120)
    panel(OUT / "composite_edges.png", [
        (zoom(case.image, top, left, crop, 3), "input (fur on a lawn)"),
        (zoom(before, top, left, crop, 3), "before: --no-decontaminate"),
        (zoom(after, top, left, crop, 3), "after: default"),
        (zoom(truth, top, left, crop, 3), "truth"),
    ])


def relit(rgb: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    return np.clip(np.rint(linear_to_srgb(srgb_to_linear(rgb / 255.0) * np.asarray(gains)) * 255), 0, 255).astype(np.uint8)


def light_and_shadow() -> None:
    """A product shot under warm light, put on a cool studio blue: harmonize and a contact shadow."""
    alpha = render_alpha("antialiased", H, W, np.random.default_rng(5))
    photo = relit(scene_photo("coffee", H, W), (1.25, 1.0, 0.7))
    before = product(photo, alpha, "#9cc3e6")
    after = product(photo, alpha, "#9cc3e6", "--harmonize", "0.7", "--shadow", "--shadow-offset", "0.03,0.05", "--shadow-blur", "0.04")
    small = lambda im: np.asarray(Image.fromarray(im).resize((W // 2, H // 2), Image.Resampling.LANCZOS))  # noqa: E731
    panel(OUT / "composite_light_shadow.png", [
        (small(before), "before"),
        (small(after), "after: --harmonize 0.7 --shadow"),
    ])


def grain() -> None:
    """A noisy photo (sigma 8) on a flat colour: the background gets the same grain with --grain."""
    alpha = render_alpha("defocus", H, W, np.random.default_rng(2))
    clean = scene_photo("astronaut", H, W).astype(np.float32)
    noisy = np.clip(np.rint(clean + np.random.default_rng(0).normal(0, 8.0, clean.shape)), 0, 255).astype(np.uint8)
    before = product(noisy, alpha, "#7a8a99")
    after = product(noisy, alpha, "#7a8a99", "--grain")
    rows, cols = np.nonzero((alpha > 0.2) & (alpha < 0.8))
    top, left = int(np.median(rows)) - 40, int(np.median(cols)) - 60
    panel(OUT / "composite_grain.png", [
        (zoom(before, top, left, (80, 120), 3), "before"),
        (zoom(after, top, left, (80, 120), 3), "after: --grain"),
    ])


def main_() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    edges()
    light_and_shadow()
    grain()
    return 0


if __name__ == "__main__":
    sys.exit(main_())
