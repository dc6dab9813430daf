"""`trt-bgswap dataset` (issue 14): background masks measured against a known alpha, the band, the quality
filter, captions, the split, resuming, bad input, and the imagefolder layout loaded by Hugging Face `datasets`.

The photos are composites with a known subject alpha (tests/composites.py: public-domain pictures
that scikit-image ships), so the masks have a ground truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from composites import BACKGROUNDS, iou, make_composite
from trt_bgswap.cli import main
from trt_bgswap.runtime.mask_ops import MaskOptions
from trt_bgswap.training.dataset import RANDOM, SUBJECT, unit_hash
from trt_bgswap.training.masks import QualityLimits, background_mask, count_pieces, free_form_mask, mask_quality

# Composites at 720x528: the horse's outline is ~2,400 px long, so an 8 px band is ~5% of the background.
SIZE = (720, 528)


def composites() -> list:
    return [make_composite(name, SIZE, offset) for name, offset in zip(BACKGROUNDS, ((0.2, 0.15), (0.35, 0.2), (0.05, 0.1)))]


def write_photos(folder: Path, how: str) -> dict[str, np.ndarray]:
    """The composites as RGBA PNGs (``alpha``: the alpha is the masker), or JPEGs with true masks in folder/../masks."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for c in composites():
        a8 = np.rint(c.alpha * 255).astype(np.uint8)
        if how == "alpha":
            Image.fromarray(np.dstack([c.rgb, a8]), "RGBA").save(folder / f"{c.name}.png")
        else:
            Image.fromarray(c.rgb).save(folder / f"{c.name}.jpg", quality=95)
            (folder.parent / "masks").mkdir(exist_ok=True)
            Image.fromarray(a8, "L").save(folder.parent / "masks" / f"{c.name}.png")
        truth[c.name] = a8.astype(np.float32) / 255.0
    return truth


def dataset(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code = main(["dataset", *map(str, args)])
    return code, capsys.readouterr().err


def rows(folder: Path) -> list[dict]:
    out = []
    for split in ("train", "validation"):
        meta = folder / split / "metadata.jsonl"
        if meta.exists():
            out += [{**json.loads(line), "split": split} for line in meta.read_text().splitlines()]
    return out


def mask_of(folder: Path, row: dict) -> np.ndarray:
    return np.asarray(Image.open(folder / row["split"] / row["mask_file_name"])) >= 128


# --- masks against the true alpha ---


@pytest.mark.parametrize("how", ["alpha", "masks"])
def test_background_masks_match_the_true_background(tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    truth = write_photos(tmp_path / "photos", how)
    extra = ["--masks", tmp_path / "masks"] if how == "masks" else []
    results = {}
    for band in (0, 8):
        out = tmp_path / f"ds{band}"
        code, err = dataset(capsys, tmp_path / "photos", "-o", out, "--band", band, "--max-side", 0, "--format", "png", *extra)
        assert code == 0, err
        for row in rows(out):
            alpha = truth[Path(row["file_name"]).stem]
            mask = mask_of(out, row)
            results[(band, Path(row["file_name"]).stem)] = iou(mask, alpha == 0)
            # the band keeps the mask off every pixel the subject covers at all (its soft edge is <= 2 px wide)
            if band:
                assert not mask[alpha > 0].any(), f"{row['file_name']}: the mask covers {int(mask[alpha > 0].sum())} subject pixels"
            else:  # without a band the mask is exactly the background as run's inpaint mask cuts it (alpha <= subject_level)
                assert np.array_equal(mask, alpha <= MaskOptions().subject_level)
    # IoU with the true background (alpha == 0): band 0 loses only the half-covered edge pixels, band 8 the band itself
    for (band, name), value in results.items():
        assert value >= (0.99 if band == 0 else 0.9), f"band {band}, {name}: IoU {value:.4f}"


def test_the_band_never_reaches_the_subject_for_any_refinement() -> None:
    """Every generated pixel is more than `band` px (Euclidean) from the subject as threshold/grow leave it."""
    from scipy.ndimage import distance_transform_edt

    from trt_bgswap.runtime.mask_ops import refine_alpha

    alpha = make_composite("coffee", (240, 176)).alpha
    for options in (MaskOptions(band=3), MaskOptions(band=3, threshold=0.9), MaskOptions(band=5, grow=-2), MaskOptions(band=1, grow=2)):
        mask = background_mask(alpha, options) == 255
        subject = refine_alpha(alpha, options) > options.subject_level
        distance = distance_transform_edt(~subject)  # to the nearest subject pixel
        assert distance[mask].min() > options.band, options
        if options.grow >= 0 and options.band >= 2:  # the soft edge is at most 2 px wide (a shrunk subject may lose thin parts)
            assert not mask[alpha > 0].any(), options


def test_masks_from_the_tiny_rmbg_run_end_to_end(tmp_path: Path, exported_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The RMBG path (an exported folder) runs and makes a mask per photo; with random weights its IoU is meaningless."""
    truth = write_photos(tmp_path / "photos", "masks")
    out = tmp_path / "ds"
    code, err = dataset(capsys, tmp_path / "photos", "-o", out, "--rmbg", exported_dir, "--max-side", 256, "--min-background", 0, "--max-background", 1, "--max-pieces", 100000)
    assert code == 0, err
    made = rows(out)
    assert len(made) == len(truth) and all(r["mask_kind"] == SUBJECT for r in made)
    assert all(max(r["width"], r["height"]) == 256 for r in made), made
    records = [json.loads(p.read_text()) for p in (out / ".records").rglob("*.json")]
    assert {r["mask_source"] for r in records} == {"rmbg"}


# --- quality filter, captions, random masks, split ---


def test_quality_filter_leaves_out_bad_masks_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    rgb = make_composite("rocket", (160, 120)).rgb
    yy, xx = np.mgrid[:120, :160]
    cases = {
        "good": make_composite("rocket", (160, 120)).alpha,
        "full": np.ones((120, 160), np.float32) * (xx > 3),  # the subject fills the frame: almost no background
        "none": np.zeros((120, 160), np.float32),  # no subject at all
        "spots": ((yy // 12 + xx // 12) % 2 == 0).astype(np.float32) * ((yy % 12 > 3) & (xx % 12 > 3)),  # a checkerboard of blobs
    }
    for name, alpha in cases.items():
        Image.fromarray(np.dstack([rgb, np.rint(alpha * 255).astype(np.uint8)]), "RGBA").save(photos / f"{name}.png")
    out = tmp_path / "ds"
    code, err = dataset(capsys, photos, "-o", out, "--band", 1)
    assert code == 0, err
    assert [Path(r["file_name"]).stem for r in rows(out)] == ["good"]
    report = json.loads((out / "report.json").read_text())
    problems = {Path(r["source"]).stem: r["problem"] for r in report["left_out"]}
    assert problems == {"full": "empty", "none": "nearly-full", "spots": "fragmented"}, report
    assert all("--" in r["why"] for r in report["left_out"]), "each reason names the option that decides it"
    assert "3 photo(s) left out by the quality filter (1 empty, 1 fragmented, 1 nearly-full)" in err, err


def test_mask_quality_and_pieces_on_known_shapes() -> None:
    m = np.zeros((100, 100), np.uint8)
    m[:, :50] = 255
    q = mask_quality(m, QualityLimits())
    assert (q.problem, q.pieces, q.background) == (None, 2, 0.5)
    dots = np.zeros((100, 100), bool)
    dots[5::10, 5::10] = True
    assert count_pieces(dots) == 100 and count_pieces(dots, min_area=2) == 0
    diagonal = np.eye(20, dtype=bool)
    assert count_pieces(diagonal) == 1, "8-connected: a diagonal line is one piece"


def test_captions_come_from_sidecars_and_the_template(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_photos(tmp_path / "shop", "alpha")
    (tmp_path / "shop" / "coffee.txt").write_text("a cup on a  wooden\ntable\n")
    out = tmp_path / "ds"
    code, err = dataset(capsys, tmp_path / "shop", "-o", out, "--caption-template", "{caption} | {stem} in {parent}", "--max-side", 128)
    assert code == 0, err
    texts = {Path(r["file_name"]).stem: r["text"] for r in rows(out)}
    assert texts["coffee"] == "a cup on a wooden table | coffee in shop"
    assert texts["rocket"] == "| rocket in shop"
    code, err = dataset(capsys, tmp_path / "shop", "-o", tmp_path / "ds2", "--caption-template", "{label}")
    assert code == 2 and "unknown field(s) label" in err, err


def test_random_masks_need_no_masker_and_are_reproducible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in BACKGROUNDS:  # plain photos without alpha and no --rmbg: only free-form masks can be made
        Image.fromarray(make_composite(name, (200, 150)).rgb).save(photos / f"{name}.jpg")
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        code, err = dataset(capsys, photos, "-o", out, "--random-mask-ratio", 1, "--validation-ratio", 0)
        assert code == 0, err
    a, b = rows(first), rows(second)
    assert [r["mask_kind"] for r in a] == [RANDOM] * 3
    for ra, rb in zip(a, b):
        assert np.array_equal(mask_of(first, ra), mask_of(second, rb)), "same seed, same strokes"
        assert 0.02 < ra["background"] < 0.9, ra


def test_free_form_strokes_cover_a_plausible_share() -> None:
    shares = [float((free_form_mask(256, 256, np.random.default_rng(s)) >= 128).mean()) for s in range(40)]
    assert 0.05 < float(np.median(shares)) < 0.6, shares  # DeepFill v2's strokes cover roughly 10-50% of a 256 px image
    assert len({round(s, 4) for s in shares}) > 30, "the strokes vary"


def test_split_is_a_stable_hash_of_the_name() -> None:
    names = [f"photo_{i}.jpg" for i in range(2000)]
    share = np.mean([unit_hash(0, "split", n) < 0.1 for n in names])
    assert abs(share - 0.1) < 4 * np.sqrt(0.1 * 0.9 / len(names)), share  # binomial: 4 standard deviations
    assert [unit_hash(0, "split", n) for n in names[:5]] == [unit_hash(0, "split", n) for n in names[:5]]
    assert [unit_hash(1, "split", n) for n in names[:5]] != [unit_hash(0, "split", n) for n in names[:5]]


# --- resuming, bad input, the layout ---


def test_rerun_skips_finished_photos_and_redoes_missing_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_photos(tmp_path / "photos", "alpha")
    out = tmp_path / "ds"
    args = (tmp_path / "photos", "-o", out, "--max-side", 200, "--validation-ratio", 0.34)
    code, err = dataset(capsys, *args)
    assert code == 0, err
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file() and p.parent.name in ("images", "masks")}
    metadata = {p: p.read_text() for p in out.glob("*/metadata.jsonl")}
    code, err = dataset(capsys, *args)
    assert code == 0 and "0 done, 3 skipped" in err, err
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == files, "a rerun rewrites nothing"
    victim = next(p for p in files if p.parent.name == "images")
    victim.unlink()
    code, err = dataset(capsys, *args)
    assert code == 0 and "1 done, 2 skipped" in err, err
    assert victim.read_bytes() == files[victim][1], "the redone photo is the same"
    assert {p: p.read_text() for p in out.glob("*/metadata.jsonl")} == metadata
    code, err = dataset(capsys, tmp_path / "photos", "-o", out, "--max-side", 200, "--validation-ratio", 0.34, "--band", 3)
    assert code == 2 and "band: 8 then, 3 now" in err, err


def test_bad_inputs_are_reported_and_the_batch_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_photos(tmp_path / "photos", "alpha")
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "photos" / "plain.jpg").write_bytes(b"")  # an empty file
    out = tmp_path / "ds"
    code, err = dataset(capsys, tmp_path / "photos", tmp_path / "missing.jpg", "-o", out, "--max-side", 128, "--validation-ratio", 0)
    assert code == 1, err
    assert len(rows(out)) == 3
    failed = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 3 and any("missing.jpg" in f for f in failed) and any("broken.png" in f for f in failed), err
    assert json.loads((out / "report.json").read_text())["failed_last_run"], "the report lists them too"


def test_photos_without_alpha_need_a_masker(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRT_BGSWAP_HOME", str(tmp_path / "home"))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(make_composite("coffee", (120, 90)).rgb).save(photos / "coffee.jpg")
    code, err = dataset(capsys, photos, "-o", tmp_path / "ds")
    assert code == 2 and "--rmbg" in err and len(err.strip().splitlines()) == 1, err


def test_imagefolder_loads_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_photos(tmp_path / "photos", "alpha")
    for name in BACKGROUNDS:
        (tmp_path / "photos" / f"{name}.txt").write_text(f"the {name} background")
    out = tmp_path / "ds"
    code, err = dataset(capsys, tmp_path / "photos", "-o", out, "--max-side", 160, "--validation-ratio", 0.34)
    assert code == 0, err
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf-cache"))
    assert set(loaded) == {"train", "validation"}
    assert sum(len(loaded[s]) for s in loaded) == 3
    for split in loaded:
        for ex, row in zip(loaded[split], [r for r in rows(out) if r["split"] == split]):
            assert ex["text"] == row["text"] and ex["mask_kind"] == row["mask_kind"]
            assert ex["image"].size == ex["mask"].size == (row["width"], row["height"])
            assert np.array_equal(np.asarray(ex["mask"]) >= 128, mask_of(out, row)), "the mask column is the mask file"
