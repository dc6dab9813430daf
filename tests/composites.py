"""Photos with a known subject alpha, made from public-domain pictures that scikit-image ships.

The subject is the horse silhouette of ``skimage.data.horse()`` (openclipart, public domain) filled
with the fur of ``skimage.data.chelsea()`` (CC0); it is pasted with a soft edge (the silhouette
downscaled with a box filter: 1-2 px of partial alpha, as a real matte has) on other photos:
``astronaut`` (NASA, public domain), ``coffee`` (CC0), ``rocket`` (NASA, public domain). The
alpha is the truth the dataset's masks are measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

BACKGROUNDS = ("astronaut", "coffee", "rocket")


@dataclass(frozen=True)
class Composite:
    name: str
    rgb: np.ndarray  # uint8 HxWx3
    alpha: np.ndarray  # float32 HxW in [0, 1]: the subject's true coverage


def _subject(height: int) -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    horse = ~data.horse()  # True on the horse
    h, w = horse.shape
    width = round(w * height / h)
    # box-filtered downscale: the edge pixels get partial coverage, like a matte
    alpha = np.asarray(Image.fromarray((horse * 255).astype(np.uint8), "L").resize((width, height), Image.Resampling.BOX), dtype=np.float32) / 255.0
    fur = np.asarray(Image.fromarray(data.chelsea()).resize((width, height), Image.Resampling.BILINEAR))
    return fur, alpha


def make_composite(background: str, size: tuple[int, int] = (360, 264), offset: tuple[float, float] = (0.2, 0.15)) -> Composite:
    """The horse on ``skimage.data.<background>()``, cropped/resized to ``size`` (w, h), at ``offset`` (fractions)."""
    from skimage import data

    w, h = size
    bg = Image.fromarray(getattr(data, background)()).convert("RGB")
    s = max(w / bg.width, h / bg.height)
    bg = bg.resize((round(bg.width * s), round(bg.height * s)), Image.Resampling.LANCZOS)
    left, top = (bg.width - w) // 2, (bg.height - h) // 2
    canvas = np.asarray(bg.crop((left, top, left + w, top + h)), dtype=np.float32)
    fur, a = _subject(round(h * 0.7))
    y0, x0 = round(offset[1] * h), round(offset[0] * w)
    alpha = np.zeros((h, w), np.float32)
    alpha[y0 : y0 + a.shape[0], x0 : x0 + a.shape[1]] = a[: h - y0, : w - x0]
    subject = np.zeros_like(canvas)
    subject[y0 : y0 + a.shape[0], x0 : x0 + a.shape[1]] = fur[: h - y0, : w - x0]
    rgb = np.rint(alpha[..., None] * subject + (1 - alpha[..., None]) * canvas).clip(0, 255).astype(np.uint8)
    return Composite(background, rgb, alpha)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float((a & b).sum() / max(1, (a | b).sum()))
