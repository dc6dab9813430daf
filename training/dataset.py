"""A background-completion training set in the layout Hugging Face ``datasets``' imagefolder loader reads.

Layout (``datasets.load_dataset("imagefolder", data_dir=DIR)`` gives splits ``train`` and
``validation`` with columns ``image``, ``mask``, ``text``, ...: imagefolder turns every metadata
column named ``file_name`` or ``<name>_file_name`` into an image column ``image`` / ``<name>``)::

    DIR/dataset.json                    how it was built (a rerun must build the same way)
    DIR/report.json                     what is in it and what was left out, and why
    DIR/train/metadata.jsonl            {"file_name": "images/x.jpg", "mask_file_name": "masks/x_mask.png", "text": ...}
    DIR/train/images/x.jpg              the photo in sRGB, at most --max-side pixels a side
    DIR/train/masks/x_mask.png          8-bit, 255 = background to generate
    DIR/validation/...                  the same for the validation split
    DIR/.records/<split>/images/x.jpg.json  one record per photo: the resumable state

Every file is written atomically; a photo's record is written after its image and mask, so a
photo with a record is finished and a rerun skips it. ``metadata.jsonl`` and ``report.json`` are
rebuilt from the records at the end of every run. The split is a hash of the seed and the
photo's name (the "hash split" that keeps a photo in its split as the set grows); so is the
choice of a free-form mask and its strokes, so a rerun makes the same dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from trt_bgswap import __version__
from trt_bgswap.atomic import write_text_atomic
from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.mask_ops import MaskOptions
from trt_bgswap.training.masks import MaskQuality, QualityLimits, background_mask, free_form_mask, mask_quality

log = logging.getLogger(__name__)

TRAIN, VALIDATION = "train", "validation"  # split folder names imagefolder recognises
SPLITS = (TRAIN, VALIDATION)
IMAGES, MASKS = "images", "masks"
METADATA = "metadata.jsonl"
BUILD_FILE = "dataset.json"
REPORT_FILE = "report.json"
RECORDS = ".records"  # hidden: imagefolder and batch input collection skip dot-folders
FORMAT = "trt-bgswap-dataset"
SUBJECT, RANDOM = "subject", "random"  # mask kinds
CAPTION_FIELDS = ("caption", "stem", "parent")
CAPTION_SUFFIX = ".txt"


@dataclass(frozen=True)
class DatasetOptions:
    """Everything that decides what a dataset holds; recorded in dataset.json and checked on a rerun."""

    mask: MaskOptions = field(default_factory=MaskOptions)
    limits: QualityLimits = field(default_factory=QualityLimits)
    random_mask_ratio: float = 0.0  # share of photos trained with free-form strokes instead of their background
    caption_template: str = "{caption}"  # fields: caption (the sidecar .txt), stem, parent (the photo's folder name)
    validation_ratio: float = 0.1
    seed: int = 0
    max_side: int = 1024  # photos are stored at most this large (0: as they are); 2x SD1.5's 512 leaves room for crops
    image_format: str = "jpg"
    quality: int = 95

    def validate(self) -> None:
        self.mask.validate()
        self.limits.validate()
        if not 0.0 <= self.random_mask_ratio <= 1.0:
            raise UsageError(f"--random-mask-ratio {self.random_mask_ratio}: give a share between 0 and 1")
        if not 0.0 <= self.validation_ratio < 1.0:
            raise UsageError(f"--validation-ratio {self.validation_ratio}: give a share in [0, 1)")
        if self.max_side != 0 and self.max_side < 64:
            raise UsageError(f"--max-side {self.max_side}: give 0 (keep the size) or at least 64 pixels")
        if self.image_format not in ("jpg", "png", "webp"):
            raise UsageError(f"--format {self.image_format}: choose jpg, png or webp")
        check_template(self.caption_template)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_template(template: str) -> None:
    """Refuse a caption template with fields we do not fill (before any photo is read)."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise UsageError(f"--caption-template {template!r}: {e}; write fields as {{caption}}, {{stem}} or {{parent}}, braces doubled") from None
    unknown = sorted(n for n in names if n not in CAPTION_FIELDS)
    if unknown:
        raise UsageError(f"--caption-template {template!r}: unknown field(s) {', '.join(unknown)}; use {{caption}}, {{stem}} or {{parent}}")


def caption_for(photo: Path, template: str) -> str:
    """The template filled from the photo's sidecar text (``photo.txt`` beside it), its stem and its folder."""
    sidecar = photo.with_suffix(CAPTION_SUFFIX)
    caption = ""
    if sidecar.is_file():
        caption = " ".join(sidecar.read_text(encoding="utf-8", errors="replace").split())
    return " ".join(template.format(caption=caption, stem=photo.stem, parent=photo.parent.name).split())


def unit_hash(seed: int, purpose: str, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, purpose, key): the same photo always draws the same."""
    digest = hashlib.sha256(f"{seed}\0{purpose}\0{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str, options: DatasetOptions) -> str:
    return VALIDATION if unit_hash(options.seed, "split", key) < options.validation_ratio else TRAIN


def uses_random_mask(key: str, options: DatasetOptions) -> bool:
    return unit_hash(options.seed, "mask-kind", key) < options.random_mask_ratio


def stored_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) a photo is stored at: scaled down to ``max_side`` keeping the aspect ratio, never up."""
    if max_side == 0 or max(width, height) <= max_side:
        return width, height
    s = max_side / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


@dataclass
class Example:
    """One photo made into a training example (or left out: ``quality.problem`` says why)."""

    rgb: np.ndarray  # uint8 HxWx3, sRGB, at the stored size
    mask: np.ndarray  # uint8 HxW, 255 = generate
    kind: str  # SUBJECT or RANDOM
    quality: MaskQuality


def make_example(rgb: np.ndarray, alpha: np.ndarray | None, key: str, options: DatasetOptions) -> Example:
    """The stored image and its mask: the background of ``alpha`` (subject masks) or free-form strokes (``alpha`` None)."""
    h, w = rgb.shape[:2]
    sw, sh = stored_size(w, h, options.max_side)
    if (sw, sh) != (w, h):
        rgb = np.asarray(Image.fromarray(rgb, "RGB").resize((sw, sh), Image.Resampling.LANCZOS))
    if alpha is None:
        seed = int.from_bytes(hashlib.sha256(f"{options.seed}\0strokes\0{key}".encode()).digest()[:8], "big")
        mask = free_form_mask(sh, sw, np.random.default_rng(seed))
        share = float((mask >= 128).mean())
        return Example(rgb, mask, RANDOM, MaskQuality(share, 0, None, None))
    if (sw, sh) != (w, h):  # the alpha is scaled like the photo, before the mask is cut, so the band is in stored pixels
        alpha = np.asarray(Image.fromarray(alpha.astype(np.float32), "F").resize((sw, sh), Image.Resampling.BILINEAR))
    mask = background_mask(alpha, options.mask)
    return Example(rgb, mask, SUBJECT, mask_quality(mask, options.limits))


# ---- the folder: build options, records, metadata, report ----


def check_build(folder: Path, options: DatasetOptions) -> None:
    """A new dataset records its options; an existing one must have been built with the same ones."""
    path = folder / BUILD_FILE
    want = {"format": FORMAT, "options": options.to_json()}
    if not path.exists():
        if folder.exists() and any(p for p in folder.iterdir() if not p.name.startswith(".")):
            raise UsageError(f"-o {folder}: the folder is not empty and holds no dataset ({BUILD_FILE}); give an empty or new folder")
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({**want, "trt_bgswap": __version__}, indent=2, sort_keys=True) + "\n")
        return
    try:
        have = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable ({e}); delete the folder to rebuild the dataset, or give another -o") from None
    if have.get("format") != FORMAT or have.get("options") != want["options"]:
        diff = describe_differences(have.get("options") or {}, want["options"])
        raise UsageError(
            f"{folder} was built with other options ({diff}); a dataset holds one recipe: "
            "rerun with the same options, or give a new -o folder"
        )


def describe_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """What changed between two nested option records, one `key: old then, new now` per change."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = describe_differences(a, b, f"{prefix}{k}.")
            if inner:
                out.append(inner)
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} then, {b!r} now")
    return "; ".join(out)


def record_path(folder: Path, image: Path) -> Path:
    """Where the record of the photo stored as ``image`` lives."""
    return folder / RECORDS / (str(image.relative_to(folder)) + ".json")


def write_record(folder: Path, image: Path, record: dict[str, Any]) -> None:
    write_text_atomic(record_path(folder, image), json.dumps(record, sort_keys=True) + "\n")


def finished(folder: Path, image: Path, mask: Path) -> bool:
    """Whether a photo was finished by an earlier run: its record exists and, if it was kept, its files do."""
    path = record_path(folder, image)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record.get("status") == "skipped" or (image.is_file() and mask.is_file())


def example_record(
    folder: Path, split: str, image: Path, mask: Path, source: Path, text: str, example: Example, mask_source: str
) -> dict[str, Any]:
    """The record of a photo: its metadata row (``row``) or why it was left out."""
    base: dict[str, Any] = {"source": str(source), "split": split, "mask_source": mask_source, "background": round(example.quality.background, 6)}
    if example.quality.problem is not None:
        return {**base, "status": "skipped", "problem": example.quality.problem, "why": example.quality.why}
    split_dir = folder / split
    h, w = example.mask.shape
    row = {
        "file_name": image.relative_to(split_dir).as_posix(),
        "mask_file_name": mask.relative_to(split_dir).as_posix(),
        "text": text,
        "mask_kind": example.kind,
        "background": round(example.quality.background, 6),
        "width": int(w),
        "height": int(h),
    }
    return {**base, "status": "ok", "row": row}


def load_records(folder: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted((folder / RECORDS).rglob("*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            log.warning("%s: unreadable record, ignored (its photo is redone on the next run)", path)
    return records


@dataclass
class DatasetSummary:
    examples: dict[str, int]  # split -> rows
    kinds: dict[str, int]  # mask kind -> rows
    skipped: dict[str, int]  # problem -> photos left out
    uncaptioned: int

    def line(self, folder: Path) -> str:
        made = ", ".join(f"{n} {s}" for s, n in self.examples.items()) or "no examples"
        kinds = f" ({self.kinds.get(RANDOM, 0)} with free-form masks)" if self.kinds.get(RANDOM) else ""
        left = sum(self.skipped.values())
        out = f"dataset {folder}: {made}{kinds}"
        if left:
            out += f"; {left} photo(s) left out by the quality filter (" + ", ".join(f"{n} {p}" for p, n in sorted(self.skipped.items())) + f"): see {folder / REPORT_FILE}"
        return out


def write_metadata(folder: Path, failed: list[tuple[str, str]] | None = None) -> DatasetSummary:
    """Rebuild each split's metadata.jsonl and the report from the records (atomically); return the counts."""
    records = load_records(folder)
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for r in records:
        if r.get("status") == "ok":
            rows[r["split"]].append(r["row"])
    examples: dict[str, int] = {}
    for split, split_rows in rows.items():
        target = folder / split / METADATA
        if not split_rows:
            if target.exists():
                target.unlink()
            continue
        split_rows.sort(key=lambda row: row["file_name"])
        write_text_atomic(target, "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in split_rows))
        examples[split] = len(split_rows)
    skipped = [r for r in records if r.get("status") == "skipped"]
    kinds = Counter(r["row"]["mask_kind"] for r in records if r.get("status") == "ok")
    summary = DatasetSummary(
        examples=examples,
        kinds=dict(kinds),
        skipped=dict(Counter(r["problem"] for r in skipped)),
        uncaptioned=sum(1 for r in records if r.get("status") == "ok" and not r["row"]["text"]),
    )
    report = {
        "examples": examples,
        "mask_kinds": dict(kinds),
        "uncaptioned": summary.uncaptioned,
        "left_out": [{"source": r["source"], "problem": r["problem"], "why": r["why"]} for r in sorted(skipped, key=lambda r: r["source"])],
        "failed_last_run": [{"source": s, "why": w} for s, w in (failed or [])],
    }
    write_text_atomic(folder / REPORT_FILE, json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return summary
