"""Reading a `dataset` folder for training: examples, their content hash, and batches as tensors.

Pre-processing follows diffusers' inpainting training scripts
(``examples/research_projects/dreambooth_inpaint/train_dreambooth_inpaint_lora.py``,
``examples/research_projects/realfill/train_realfill.py``): the photo is resized so its shorter
side is the training resolution and cropped square (randomly for training, centred for
validation), scaled to [-1, 1]; the mask is resized with nearest-neighbour and binarised at 0.5;
the masked image is ``image * (mask < 0.5)`` (masked pixels 0, as
``StableDiffusionInpaintPipeline`` prepares them).

Randomness is counter-based: the crops of micro-batch ``k`` come from a generator seeded with
(seed, k), and the order of epoch ``e`` from one seeded with (seed, e). A batch is a function of
the step number alone, so a run resumed from a checkpoint sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from trt_bgswap.errors import UsageError
from trt_bgswap.manifest import sha256_file
from trt_bgswap.runtime.image_read import read_image
from trt_bgswap.training.dataset import METADATA, SPLITS, TRAIN, VALIDATION


@dataclass(frozen=True)
class Example:
    image: Path
    mask: Path
    text: str


def read_split(folder: Path, split: str) -> list[Example]:
    """The rows of ``folder/split/metadata.jsonl`` (empty when the split has none); bad rows are errors naming the line."""
    path = folder / split / METADATA
    if not path.is_file():
        return []
    examples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, mask, text = row["file_name"], row["mask_file_name"], row.get("text", "")
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{path}:{n}: not a dataset row ({type(e).__name__}: {e}); rebuild it with `trt-bgswap dataset`") from None
        ex = Example(path.parent / image, path.parent / mask, str(text or ""))
        for f in (ex.image, ex.mask):
            if not f.is_file():
                raise UsageError(f"{path}:{n}: {f} is missing; rerun `trt-bgswap dataset` on the photos to restore it")
        examples.append(ex)
    return examples


def read_dataset(folder: Path) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples; a folder without training rows is an error with the fix."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such dataset folder; make one with `trt-bgswap dataset PHOTOS... -o {folder}`")
    train = read_split(folder, TRAIN)
    if not train:
        raise UsageError(f"{folder}: no training examples ({TRAIN}/{METADATA}); make the dataset with `trt-bgswap dataset PHOTOS... -o {folder}`")
    return train, read_split(folder, VALIDATION)


def dataset_hash(folder: Path) -> str:
    """sha256 over every split's rows and the bytes of their images and masks: what a LoRA was trained on."""
    h = hashlib.sha256()
    for split in SPLITS:
        for ex in read_split(folder, split):
            for part in (split, ex.image.relative_to(folder).as_posix(), sha256_file(ex.image), ex.mask.relative_to(folder).as_posix(), sha256_file(ex.mask), ex.text):
                h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()


def counter_seed(seed: int, purpose: str, counter: int) -> int:
    """A 63-bit seed fixed by (seed, purpose, counter): the generators behind batches, crops and noise."""
    digest = hashlib.sha256(f"{seed}\0{purpose}\0{counter}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> list[int]:
    """Example indices of micro-batch ``micro_step``: epochs are seeded permutations, batches run across them."""
    out = []
    for position in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        epoch, i = divmod(position, n)
        order = np.random.default_rng(counter_seed(seed, "epoch", epoch)).permutation(n)
        out.append(int(order[i]))
    return out


def load_pair(example: Example, resolution: int, crop: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 3xRxR in [-1, 1], mask float32 1xRxR in {0, 1}); ``crop`` (fy, fx) in [0, 1) or None = centre."""
    rgb = read_image(example.image).rgb
    loaded = read_image(example.mask)
    mask = loaded.rgb[..., 0] if loaded.alpha is None else (loaded.alpha * 255).astype(np.uint8)
    if mask.shape != rgb.shape[:2]:
        raise UsageError(f"{example.mask} is {mask.shape[1]}x{mask.shape[0]} but {example.image} is {rgb.shape[1]}x{rgb.shape[0]}; rebuild the dataset")
    h, w = rgb.shape[:2]
    s = resolution / min(h, w)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    image = Image.fromarray(rgb, "RGB").resize((nw, nh), Image.Resampling.BILINEAR)
    mimage = Image.fromarray(mask, "L").resize((nw, nh), Image.Resampling.NEAREST)
    fy, fx = crop if crop is not None else (0.5, 0.5)
    top = min(int(fy * (nh - resolution + 1)), nh - resolution) if crop is not None else (nh - resolution) // 2
    left = min(int(fx * (nw - resolution + 1)), nw - resolution) if crop is not None else (nw - resolution) // 2
    box = (left, top, left + resolution, top + resolution)
    pixels = np.asarray(image.crop(box), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    m = (np.asarray(mimage.crop(box), dtype=np.float32)[None] / 255.0 >= 0.5).astype(np.float32)
    return pixels, m


def collate(examples: list[Example], resolution: int, crops: list[tuple[float, float] | None]) -> dict[str, Any]:
    """A batch as numpy: pixels Bx3xRxR, masks Bx1xRxR, masked pixels (masked area 0), texts."""
    pairs = [load_pair(ex, resolution, c) for ex, c in zip(examples, crops)]
    pixels = np.stack([p for p, _ in pairs])
    masks = np.stack([m for _, m in pairs])
    return {"pixels": pixels, "masks": masks, "masked": pixels * (masks < 0.5), "texts": [ex.text for ex in examples]}
