"""Training masks for background completion: the subject's background, classic free-form strokes, a quality filter.

**Background masks.** The inpainting model is fine-tuned to paint *background*, so a training
mask covers exactly the photo's background (white = generate), made from the subject's alpha
with the options of ``run`` (:class:`~trt_bgswap.runtime.mask_ops.MaskOptions`: threshold, grow,
``subject_level``, disc-shaped morphology in pixels). The band points the other way than
``run --band``: at inference the repainted area reaches ``band`` pixels *into* the subject so no
old background survives under the composite's soft edge; in training the target inside the mask
is the photo itself, so a mask reaching into the subject would teach the model to paint subject
(the object-extension failure of inpainting models). Here the band keeps the mask ``band``
pixels *clear of* the subject: every pixel of the soft edge stays context, never target.

**Free-form masks** (``--random-mask-ratio``) are the irregular brush strokes of Yu et al. 2019,
"Free-Form Image Inpainting with Gated Convolution" (DeepFill v2, ICCV), Algorithm 1 and the
``brush_stroke_mask`` of its reference code: 1-4 strokes, each a polyline of 4-12 vertices with
alternating turn angles around 2*pi/5, segment lengths around a quarter of the image diagonal,
brush widths from 12 to 40 px at 256 px (scaled with the image), round joints. LaMa (Suvorov et
al. 2022) trains on the same family of strokes. A share of them regularises the fine-tune so
the model keeps general inpainting.

**Quality filter.** A mask with almost no background teaches nothing, one that is nearly all
background means the masker found no subject, and one in many pieces means the masker was
unsure; such photos are left out with the reason. Pieces are 8-connected components of the
mask and of its complement, counted with a run-length union-find (Rosenfeld & Pfaltz 1966, the
classic two-pass labelling) on a copy at most 256 px a side; specks under ``min_piece`` of the
image do not count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.mask_ops import MaskOptions, dilate, refine_alpha

GENERATE = 255  # mask value: background to generate
KEEP = 0  # mask value: context the model sees (the subject and its band)
PIECES_SIDE = 256  # pieces are counted on a copy at most this many pixels a side (bounded cost per photo)


def background_mask(alpha: np.ndarray, options: MaskOptions) -> np.ndarray:
    """uint8 HxW, 255 where the background is to be generated: every pixel at least ``band`` px from the subject."""
    options.validate()
    a = refine_alpha(alpha, options)
    subject = (a > options.subject_level).astype(np.uint8)  # the subject as run's inpaint_mask sees it
    if options.band > 0:
        subject = dilate(subject, options.band)
    return np.where(subject > 0, np.uint8(KEEP), np.uint8(GENERATE))


def free_form_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """DeepFill v2's brush strokes (module docstring), uint8 HxW with 255 = generate."""
    scale = math.sqrt(height * width) / 256.0  # the reference's widths are for 256x256 images
    min_width, max_width = 12 * scale, 40 * scale
    mean_angle, angle_range = 2 * math.pi / 5, 2 * math.pi / 15
    radius = math.sqrt(height * height + width * width) / 8
    mask = Image.new("L", (width, height), KEEP)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 5))):
        vertices = int(rng.integers(4, 13))
        lo, hi = mean_angle - rng.uniform(0, angle_range), mean_angle + rng.uniform(0, angle_range)
        points = [(float(rng.integers(0, width)), float(rng.integers(0, height)))]
        for i in range(vertices):
            angle = rng.uniform(lo, hi)
            if i % 2 == 0:
                angle = 2 * math.pi - angle
            length = float(np.clip(rng.normal(radius, radius / 2), 0, 2 * radius))
            x, y = points[-1]
            points.append((float(np.clip(x + length * math.cos(angle), 0, width - 1)), float(np.clip(y + length * math.sin(angle), 0, height - 1))))
        brush = max(1, round(rng.uniform(min_width, max_width)))
        draw.line(points, fill=GENERATE, width=brush)
        r = brush / 2
        for x, y in points:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=GENERATE)
    out = np.asarray(mask, dtype=np.uint8)
    if rng.random() > 0.5:
        out = out[:, ::-1]
    if rng.random() > 0.5:
        out = out[::-1, :]
    return np.ascontiguousarray(out)


def count_pieces(region: np.ndarray, min_area: int = 1) -> int:
    """8-connected components of a boolean image with at least ``min_area`` pixels (run-length union-find)."""
    parent: list[int] = []
    area: list[int] = []

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    previous: list[tuple[int, int, int]] = []  # runs of the row above: (start, end exclusive, label)
    for row in np.asarray(region, dtype=bool):
        edges = np.diff(np.concatenate(([0], row.view(np.uint8), [0])).astype(np.int8))
        starts, ends = np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()
        current: list[tuple[int, int, int]] = []
        k = 0
        for s, e in zip(starts, ends):
            while k < len(previous) and previous[k][1] < s:  # ends before the diagonal neighbour of s
                k += 1
            label = len(parent)
            parent.append(label)
            area.append(e - s)
            j = k
            while j < len(previous) and previous[j][0] <= e:  # starts at or before the diagonal neighbour of e-1
                a, b = find(previous[j][2]), find(label)
                if a != b:
                    parent[b] = a
                j += 1
            current.append((s, e, label))
        previous = current
    totals: dict[int, int] = {}
    for i, n in enumerate(area):
        root = find(i)
        totals[root] = totals.get(root, 0) + n
    return sum(1 for n in totals.values() if n >= min_area)


@dataclass(frozen=True)
class QualityLimits:
    """What a background mask must be to make a training example."""

    min_background: float = 0.05  # below: the subject fills the frame, no background to learn from
    max_background: float = 0.95  # above: the masker found (almost) no subject
    max_pieces: int = 12  # pieces of the mask plus pieces of the kept region; above: the masker was unsure
    min_piece: float = 0.001  # share of the image under which a piece is a speck and does not count

    def validate(self) -> None:
        if not 0.0 <= self.min_background < self.max_background <= 1.0:
            raise UsageError(
                f"--min-background {self.min_background} / --max-background {self.max_background}: give 0 <= min < max <= 1 (shares of the image)"
            )
        if self.max_pieces < 2:
            raise UsageError(f"--max-pieces {self.max_pieces}: a mask and its kept region make at least 2 pieces; give 2 or more")
        if not 0.0 <= self.min_piece < 1.0:
            raise UsageError(f"min_piece={self.min_piece}: give a share of the image in [0, 1)")


@dataclass(frozen=True)
class MaskQuality:
    background: float  # share of the image to generate
    pieces: int  # pieces of the mask plus pieces of the kept region (specks excluded)
    problem: str | None  # None, "empty", "nearly-full" or "fragmented"
    why: str | None  # the one-line reason, naming the option that decides it


def mask_quality(mask: np.ndarray, limits: QualityLimits) -> MaskQuality:
    """Measure a background mask and say whether it makes a training example (and why not)."""
    generate = np.asarray(mask) >= 128
    share = float(generate.mean())
    if share < limits.min_background:
        why = f"empty: only {share:.1%} of the image is background to generate (--min-background {limits.min_background:.0%})"
        return MaskQuality(share, 0, "empty", why)
    if share > limits.max_background:
        why = f"nearly full: {share:.1%} of the image is background, no subject found (--max-background {limits.max_background:.0%})"
        return MaskQuality(share, 0, "nearly-full", why)
    h, w = generate.shape
    step = max(1, math.ceil(max(h, w) / PIECES_SIDE))
    small = generate[::step, ::step]
    min_area = max(1, math.ceil(limits.min_piece * small.size))
    pieces = count_pieces(small, min_area) + count_pieces(~small, min_area)
    if pieces > limits.max_pieces:
        why = f"fragmented: the mask and the subject are in {pieces} pieces (--max-pieces {limits.max_pieces})"
        return MaskQuality(share, pieces, "fragmented", why)
    return MaskQuality(share, pieces, None, None)
