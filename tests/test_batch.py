"""Batch planning (issue 8, items 4-6): everything checked before a model loads, each output decided on its own,
and `--recursive` mirroring the input tree. Real processes on real files with the tiny exported models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_run_command import photo, trt_bgswap
from trt_bgswap.cli.batch import BYTES_PER_PIXEL, RESULT, Input, Job, Target, check_free_space
from trt_bgswap.errors import OutputError
from trt_bgswap.runtime.image_read import ImageInfo


def save(path: Path, name: str = "chelsea") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo(name)).save(path)
    return path


# --- item 4: side outputs asked for on a rerun are made; impossible ones are refused before any work ---


def test_side_outputs_added_on_a_rerun_are_written(exported_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    for name in ("chelsea", "coffee"):
        save(folder / f"{name}.png", name)
    out = tmp_path / "out"
    first = trt_bgswap("run", folder, "--models", exported_dir, "--bg-color", "white", "-o", out, home=tmp_path / "h")
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = trt_bgswap("run", folder, "--models", exported_dir, "--bg-color", "white", "-o", out, "--save-mask", tmp_path / "masks",
                       "--save-cutout", tmp_path / "cutouts", home=tmp_path / "h")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["chelsea_mask.png", "coffee_mask.png"]
    assert sorted(p.name for p in (tmp_path / "cutouts").iterdir()) == ["chelsea_cutout.png", "coffee_cutout.png"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "existing results must be kept"
    assert again.stderr.strip().splitlines()[-1].startswith("2 done, 0 skipped"), again.stderr


def test_cut_out_as_jpeg_is_refused_before_any_work(exported_dir: Path, tmp_path: Path) -> None:
    src = save(tmp_path / "cat.png")
    proc = trt_bgswap("run", src, "--models", exported_dir, "--bg-color", "white", "-o", tmp_path / "o.png", "--save-cutout", tmp_path / "c.jpg", home=tmp_path / "h")
    assert proc.returncode == 2 and "a cut-out needs an alpha channel" in proc.stderr, proc.stderr
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "c.jpg").exists(), "nothing may be written"


# --- item 5: inputs and output locations are checked before any model loads ---


def test_a_run_whose_every_input_is_bad_loads_nothing(exported_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("shopping list\n")
    proc = trt_bgswap("-v", "run", bad, "--models", exported_dir, "--prompt", "x", "-o", tmp_path / "o.png", home=tmp_path / "h")
    assert proc.returncode == 1, proc.stderr
    assert "not an image Pillow can read" in proc.stderr
    assert "loaded " not in proc.stderr and "backend:" not in proc.stderr, f"models were loaded for no work:\n{proc.stderr}"


def test_output_under_a_file_is_refused_before_loading(exported_dir: Path, tmp_path: Path) -> None:
    src = save(tmp_path / "cat.png")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = trt_bgswap("-v", "run", src, "--models", exported_dir, "--prompt", "x", "-o", blocker / "o.png", home=tmp_path / "h")
    assert proc.returncode == 1 and "is not a folder" in proc.stderr, proc.stderr
    assert "loaded " not in proc.stderr, proc.stderr


def test_free_space_is_checked_per_file_system(tmp_path: Path) -> None:
    """A batch whose worst-case outputs exceed the free space of their disk is refused (real statvfs, a planned batch)."""
    import shutil

    free = shutil.disk_usage(tmp_path).free
    side = int((free / BYTES_PER_PIXEL[RESULT]) ** 0.5) + 1000  # one result bigger than the free space
    job = Job(Input(tmp_path / "x.png", Path("x.png")), [Target(tmp_path / "out" / "x.png", RESULT)])
    job.info = ImageInfo(size=(side, side), format="PNG", mode="RGB", has_alpha=False)
    job.todo = list(job.targets)
    with pytest.raises(OutputError, match="the batch's outputs need up to .* MiB but only .* MiB are free"):
        check_free_space([job])
    job.info = ImageInfo(size=(64, 64), format="PNG", mode="RGB", has_alpha=False)
    check_free_space([job])  # a small one fits


# --- item 6: --recursive mirrors the input tree; name clashes never abort the batch ---


def test_recursive_mirrors_the_tree_and_same_names_coexist(exported_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "in"
    save(root / "day1" / "IMG_0001.jpg", "chelsea")
    save(root / "day2" / "IMG_0001.jpg", "coffee")
    save(root / "x.jpg", "astronaut")
    save(root / "x.png", "rocket")
    out = tmp_path / "out"
    proc = trt_bgswap("run", root, "--recursive", "--models", exported_dir, "--bg-color", "black", "-o", out, home=tmp_path / "h")
    assert proc.returncode == 0, proc.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == ["day1/IMG_0001_bgswap.png", "day2/IMG_0001_bgswap.png", "x-jpg_bgswap.png", "x-png_bgswap.png"], written
    a = np.asarray(Image.open(out / "day1" / "IMG_0001_bgswap.png"))
    b = np.asarray(Image.open(out / "day2" / "IMG_0001_bgswap.png"))
    assert a.shape != b.shape or not np.array_equal(a, b), "the two IMG_0001 results are the same image"
