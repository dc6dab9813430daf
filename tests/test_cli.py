"""The `trt-bgswap` command line against issue 4's acceptance: bad inputs, batches, options, sources.

Every command runs for real on the tiny exported models (``exported_dir``),
in-process through ``trt_bgswap.cli.main`` (stderr captured) and, to prove the
entry point and its exit codes, through the installed console script. Inputs
are scikit-image's public-domain photos, downscaled to ~200 px.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from trt_bgswap.api import BackgroundReplacer, alpha_to_u8
from trt_bgswap.cli import main
from trt_bgswap.runtime.image_read import read_image
from trt_bgswap.runtime.masker import Masker

SIDE = 200
SUMMARY = re.compile(r"^(\d+) done, (\d+) skipped \(outputs exist; --overwrite to redo\), (\d+) failed in \d+\.\d s \(\d+\.\d\d img/s\)$")


def photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as uint8 RGB, longest side ~SIDE px."""
    im = Image.fromarray(getattr(data, name)())
    im.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    return np.asarray(im.convert("RGB"))


def save(path: Path, rgb: np.ndarray, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, **options)
    return path


def box_mask(h: int, w: int) -> np.ndarray:
    """A hard-edged subject mask: 255 in a centred box, 0 elsewhere (so alpha is known exactly)."""
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    return m


def console_script() -> str:
    found = shutil.which("trt-bgswap", path=str(Path(sys.executable).parent)) or shutil.which("trt-bgswap")
    assert found, "the trt-bgswap console script is not installed next to this Python"
    return found


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, list[str]]:
    """Run the CLI in-process; (exit code, non-empty stderr lines)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def files_in(folder: Path) -> list[str]:
    """Everything under a folder, hidden temp files included (a partial write would show here)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def summary(lines: list[str]) -> tuple[int, int, int]:
    m = SUMMARY.match(lines[-1])
    assert m, f"last stderr line is not the summary: {lines[-1]!r}"
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def run_args(models: Path, *extra: object) -> list[object]:
    return ["-q", "run", "--models", models, "--provider", "cpu", *extra]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """astronaut.jpg, chelsea.png, coffee.jpg at the top, rocket.png and camera.jpg (greyscale) in sub/."""
    root = tmp_path_factory.mktemp("photos")
    save(root / "astronaut.jpg", photo("astronaut"), quality=92)
    save(root / "chelsea.png", photo("chelsea"))
    save(root / "coffee.jpg", photo("coffee"), quality=92)
    save(root / "sub" / "rocket.png", photo("rocket"))
    save(root / "sub" / "camera.jpg", photo("camera"), quality=92)
    return root


# --- 1. bad inputs: one line naming the file and the problem, non-zero exit, nothing left behind ---


def _corrupt_png(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(photo("coffee")).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    raw[300:700] = b"\x00" * 400  # inside the IDAT stream: the header parses, decoding fails
    path.write_bytes(bytes(raw))


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(photo("astronaut")).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])


def _bomb(path: Path) -> None:
    Image.new("L", (6000, 6000)).save(path, format="PNG")  # ~36 MP declared in a file of a few kB


BAD_INPUTS = {
    "corrupt": ("corrupt.png", _corrupt_png, [], ["corrupt or truncated PNG image"]),
    "truncated": ("truncated.jpg", _truncated_jpeg, [], ["corrupt or truncated JPEG image"]),
    "empty": ("empty.png", lambda p: p.write_bytes(b""), [], ["the file is empty"]),
    "not-an-image": ("notes.jpg", lambda p: p.write_text("shopping list\n"), [], ["not an image Pillow can read"]),
    "bomb": ("bomb.png", _bomb, ["--max-pixels", "1000000"], ["36.0 MP is above the 1.0 MP limit", "decompression-bomb guard", "--max-pixels"]),
    "too-small": ("tiny.png", lambda p: save(p, photo("astronaut")[:8, :8]), [], ["8x8 is too small", "16 px"]),
    "missing": ("missing.png", lambda p: None, [], ["no such file or folder"]),
    "a-folder-of-nothing": ("empty-folder", lambda p: p.mkdir(), [], ["the folder has no image files"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_with_one_line(case: str, exported_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name, make, extra, phrases = BAD_INPUTS[case]
    src = tmp_path / "in" / name
    src.parent.mkdir()
    make(src)
    out = tmp_path / "out"
    code, lines = cli(capsys, *run_args(exported_dir, src, "--prompt", "a beach", "--seed", 1, "-o", out / "result.png", *extra))
    assert code == 1, lines
    assert len(lines) == 2 and lines[0].startswith(f"failed: {src}: "), lines  # with -q: the one line, then the summary
    assert all(p in lines[0] for p in phrases), lines[0]
    assert summary(lines) == (0, 0, 1)
    assert files_in(out) == [], "a failed image must leave no output or temp file"


def test_bomb_is_refused_before_decoding(exported_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default cap (2**26 px) lets a normal photo through; a bomb above it is refused from its header."""
    src = tmp_path / "huge.png"
    Image.new("L", (12000, 6000)).save(src, format="PNG")  # 72 MP: above the default 67.1 MP cap
    assert src.stat().st_size < 500_000
    code, lines = cli(capsys, *run_args(exported_dir, src, "--prompt", "x", "-o", tmp_path / "out.png"))
    assert code == 1
    assert any("72.0 MP is above the 67.1 MP limit" in line and str(src) in line for line in lines), lines
    assert not (tmp_path / "out.png").exists()


def test_animated_gif_uses_the_first_frame(exported_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rgb = photo("chelsea")
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb), Image.fromarray(rgb[:, ::-1].copy())]
    gif = tmp_path / "cat.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=80, loop=0)
    mask = save(tmp_path / "mask.png", np.full(rgb.shape[:2], 255, np.uint8))  # all subject: the output is the frame
    out = tmp_path / "cat_out.png"
    code, lines = cli(capsys, "run", "--models", exported_dir, gif, "--bg-color", "black", "--mask", mask, "-o", out)
    assert code == 0, lines
    assert any(str(gif) in line and "3 frames" in line and "using the first" in line for line in lines), lines
    first = np.asarray(Image.open(gif).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(out)), first, err_msg="output is not the GIF's first frame")


def test_output_onto_its_input_is_refused(exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = shutil.copy(photos / "chelsea.png", tmp_path / "chelsea.png")
    before = Path(src).read_bytes()
    for target in (src, tmp_path / "." / "chelsea.png"):
        code, lines = cli(capsys, *run_args(exported_dir, src, "--prompt", "x", "-o", target, "--overwrite"))
        assert code == 1
        assert any("is an input file" in line and "never overwrites inputs" in line for line in lines), lines
    assert Path(src).read_bytes() == before
    assert files_in(tmp_path) == ["chelsea.png"]


def test_output_folder_under_a_file(exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    code, lines = cli(capsys, *run_args(exported_dir, photos / "chelsea.png", "--prompt", "x", "-o", blocker / "out.png"))
    assert code == 1
    assert any(str(blocker) in line and "is not a folder" in line for line in lines), lines
    assert files_in(tmp_path) == ["not-a-folder"]


def _unprivileged_cli(argv: list[str]) -> dict:
    """The CLI where file permissions apply even to root (image_read/image_write tests drop the override the same way)."""
    from image_files import run_unprivileged

    return run_unprivileged(
        f"""
        import contextlib, io
        from trt_bgswap.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main({argv!r})
        result = {{"code": code, "err": err.getvalue()}}
        """
    )


def test_unreadable_input(exported_dir: Path, photos: Path, tmp_path: Path) -> None:
    src = shutil.copy(photos / "chelsea.png", tmp_path / "secret.png")
    Path(src).chmod(0)
    out = tmp_path / "out"
    got = _unprivileged_cli([str(a) for a in run_args(exported_dir, src, "--prompt", "x", "-o", out)])
    assert got["code"] == 1, got["err"]
    assert f"failed: {src}: permission denied" in got["err"], got["err"]
    assert files_in(out) == []


def test_unwritable_output_folder(exported_dir: Path, photos: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    got = _unprivileged_cli([str(a) for a in run_args(exported_dir, photos / "chelsea.png", "--prompt", "x", "-o", locked)])
    assert got["code"] == 1, got["err"]
    assert f"{locked} is not writable" in got["err"], got["err"]
    assert files_in(locked) == [], "no temp file may be left in the output folder"


def test_existing_outputs_skipped_then_redone_with_overwrite(exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.png"
    args = run_args(exported_dir, photos / "chelsea.png", "--prompt", "a forest", "--seed", 3, "-o", out)
    assert cli(capsys, *args)[0] == 0
    out.write_bytes(b"kept")  # a marker: skipping must not touch it
    code, lines = cli(capsys, *args)
    assert code == 0 and summary(lines) == (0, 1, 0)
    assert out.read_bytes() == b"kept"
    code, lines = cli(capsys, *args, "--overwrite")
    assert code == 0 and summary(lines) == (1, 0, 0)
    assert Image.open(out).size == Image.open(photos / "chelsea.png").size


def test_long_prompt_is_truncated_with_a_warning(exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = " ".join(f"a lovely mountain lake number {i}" for i in range(40))
    out = tmp_path / "out.png"
    code, lines = cli(capsys, "run", "--models", exported_dir, photos / "coffee.jpg", "--prompt", prompt, "--seed", 0, "-o", out)
    assert code == 0, lines
    assert any("prompt truncated to the text encoder's 77 tokens" in line for line in lines), lines
    assert out.is_file()


INVALID_OPTIONS = {
    "steps 0": (["--steps", "0"], "--steps=0: must be between 1 and 50"),
    "steps 100": (["--steps", "100"], "--steps=100: must be between 1 and 50"),
    "guidance -1": (["--guidance", "-1"], "--guidance=-1.0: must be between 0.0 and 30.0"),
    "guidance nan": (["--guidance", "nan"], "--guidance=nan: must be between"),
    "size not a multiple": (["--size", "100x100"], "--size 100x100: both sides must be multiples of 64"),
    "size abc": (["--size", "abc"], "--size 'abc': write WIDTHxHEIGHT"),
    "bg-color nope": (["--bg-color", "nope"], "argument --bg-color: colour 'nope' is not a colour"),
    "bg-color bare hex": (["--bg-color", "00ff00"], "did you mean '#00ff00'?"),
    "num-results 0": (["--num-results", "0"], "--num-results=0: must be between 1 and 64"),
    "threshold 2": (["--threshold", "2"], "--threshold=2.0: must be between 0.0 and 1.0"),
    "threshold 1": (["--threshold", "1"], "mask threshold=1.0: give a value between 0 and 1"),
    "quality 0": (["--quality", "0"], "--quality=0: must be between 1 and 100"),
    "unknown option": (["--colour", "red"], "unrecognized arguments: --colour red"),
}


@pytest.mark.parametrize("case", list(INVALID_OPTIONS))
def test_invalid_option_values(case: str, exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra, phrase = INVALID_OPTIONS[case]
    color = [] if "--bg-color" in extra else ["--prompt", "x"]
    code, lines = cli(capsys, "-q", "run", "--models", exported_dir, photos / "chelsea.png", *color, *extra, "-o", tmp_path / "out.png")
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], lines
    assert files_in(tmp_path) == []


def test_console_script_exit_codes(exported_dir: Path, photos: Path, tmp_path: Path) -> None:
    """The installed entry point: a batch with one corrupt file exits 1, a bad option exits 2, --version 0."""
    exe = console_script()
    folder = tmp_path / "in"
    shutil.copytree(photos, folder, ignore=shutil.ignore_patterns("sub"))
    (folder / "broken.jpg").write_bytes((photos / "astronaut.jpg").read_bytes()[:500])
    env = {**os.environ, "TRT_BGSWAP_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [exe, "run", folder, "--models", exported_dir, "--prompt", "a park", "--seed", "2", "-o", tmp_path / "out"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert summary(lines) == (3, 0, 1)
    assert any(line.startswith(f"failed: {folder / 'broken.jpg'}: corrupt or truncated") for line in lines), lines
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["astronaut_bgswap.png", "chelsea_bgswap.png", "coffee_bgswap.png"]
    bad = subprocess.run([exe, "run", folder, "--models", exported_dir, "--prompt", "x", "--steps", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--steps=0" in bad.stderr, bad.stderr
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=300)
    assert version.returncode == 0 and version.stdout.startswith("trt-bgswap ")


# --- 2. batches and the options users expect ---


def test_batch_with_a_corrupt_file(exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    shutil.copytree(photos, folder)
    _corrupt_png(folder / "broken.png")
    (folder / "._astronaut.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden: not an input
    save(folder / ".thumbnails" / "coffee.png", photo("coffee")[:32, :32])
    out = tmp_path / "out"
    code, lines = cli(capsys, "run", "--models", exported_dir, folder, "--recursive", "--prompt", "a city", "--seed", 4, "-o", out)
    assert code == 1, lines
    assert summary(lines) == (5, 0, 1)
    failed = [line for line in lines if line.startswith("failed: ")]
    assert failed == [line for line in failed if str(folder / "broken.png") in line] and len(failed) == 1, failed
    # --recursive mirrors the input tree under -o
    expected = {str(p.relative_to(photos).with_name(f"{p.stem}_bgswap.png")) for p in photos.rglob("*.*")}
    assert set(files_in(out)) - {"sub"} == expected
    for src in photos.rglob("*.*"):
        assert Image.open(out / src.relative_to(photos).with_name(f"{src.stem}_bgswap.png")).size == Image.open(src).size, src
    # not recursive: only the top folder; a second run over the same folder skips what is done
    code, lines = cli(capsys, "run", "--models", exported_dir, folder, "--prompt", "a city", "--seed", 4, "-o", out)
    assert code == 1 and summary(lines) == (0, 3, 1)


def test_rerun_on_a_folder_leaves_its_own_outputs_alone(exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Outputs beside the inputs (no -o): the second run must not take them for new inputs."""
    folder = tmp_path / "in"
    shutil.copytree(photos, folder, ignore=shutil.ignore_patterns("sub"))
    args = ("run", "--models", exported_dir, folder, "--bg-color", "white", "--save-mask", folder)
    code, lines = cli(capsys, *args)
    assert code == 0 and summary(lines) == (3, 0, 0)
    code, lines = cli(capsys, *args)
    assert code == 0 and summary(lines) == (0, 3, 0), lines
    assert len(files_in(folder)) == 9


def test_globs(exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, lines = cli(capsys, "run", "--models", exported_dir, str(photos / "**" / "*.jpg"), "--bg-color", "#123456", "-o", out)
    assert code == 0, lines
    assert files_in(out) == ["astronaut_bgswap.png", "camera_bgswap.png", "coffee_bgswap.png"]
    code, lines = cli(capsys, "run", "--models", exported_dir, str(photos / "*.gif"), "--bg-color", "red", "-o", out)
    assert code == 1 and any("the pattern matches no image files" in line for line in lines), lines


def test_num_results_writes_different_images(exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, lines = cli(capsys, "run", "--models", exported_dir, photos / "coffee.jpg", "--prompt", "a garden", "--seed", 10, "--num-results", 2, "-o", out)
    assert code == 0, lines
    assert files_in(out) == ["coffee_bgswap_0.png", "coffee_bgswap_1.png"]
    a, b = (np.asarray(Image.open(out / f"coffee_bgswap_{i}.png")) for i in range(2))
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0, "two results with seeds 10 and 11 are identical"
    # result i is seed + i: the second equals a single run with seed 11
    code, _ = cli(capsys, "run", "--models", exported_dir, photos / "coffee.jpg", "--prompt", "a garden", "--seed", 11, "-o", tmp_path / "s11.png")
    assert code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "s11.png")), b)


@pytest.mark.parametrize(
    "name,extra,fmt",
    [
        ("out.jpg", ["--quality", "40"], "JPEG"),
        ("out.jpeg", [], "JPEG"),
        ("out.webp", ["--quality", "60"], "WEBP"),
        ("out.png", [], "PNG"),
        ("folder", ["--format", "webp"], "WEBP"),
    ],
)
def test_output_format_from_the_extension(name: str, extra: list[str], fmt: str, exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / name
    code, lines = cli(capsys, "run", "--models", exported_dir, photos / "chelsea.png", "--prompt", "a desk", "--seed", 0, "-o", target, *extra)
    assert code == 0, lines
    written = target / "chelsea_bgswap.webp" if name == "folder" else target
    with Image.open(written) as im:
        assert im.format == fmt and im.size == Image.open(photos / "chelsea.png").size


def test_jpeg_quality_is_applied(exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sizes = {}
    for q in (30, 95):
        target = tmp_path / f"q{q}.jpg"
        assert cli(capsys, "run", "--models", exported_dir, photos / "coffee.jpg", "--bg-color", "navy", "--quality", q, "-o", target)[0] == 0
        sizes[q] = target.stat().st_size
    assert sizes[30] < sizes[95], sizes


@pytest.mark.parametrize("src_name", ["chelsea.png", "astronaut.jpg"])
def test_bg_color_with_a_user_mask(src_name: str, exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No diffusion: background pixels are exactly the colour, subject pixels exactly the input; mask and cut-out saved."""
    src = photos / src_name
    rgb = read_image(src).rgb
    mask = box_mask(*rgb.shape[:2])
    mask_file = save(tmp_path / "mask.png", mask)
    out, saved_mask, cutout = tmp_path / "out.png", tmp_path / "m.png", tmp_path / "c.png"
    code, lines = cli(capsys, "run", "--models", exported_dir, src, "--bg-color", "#00ff00", "--mask", mask_file, "-o", out, "--save-mask", saved_mask, "--save-cutout", cutout)
    assert code == 0, lines
    got = np.asarray(Image.open(out))
    bg, fg = mask == 0, mask == 255
    assert (got[bg] == [0, 255, 0]).all(), f"{int((got[bg] != [0, 255, 0]).any(axis=1).sum())} background pixels are not #00ff00"
    np.testing.assert_array_equal(got[fg], rgb[fg], err_msg="subject pixels (alpha 1) differ from the input")
    m = np.asarray(Image.open(saved_mask))
    np.testing.assert_array_equal(m, mask, err_msg="saved mask is not the user's mask")
    c = Image.open(cutout)
    assert c.mode == "RGBA"
    c = np.asarray(c)
    np.testing.assert_array_equal(c[..., 3], m, err_msg="cut-out alpha differs from the saved mask")
    np.testing.assert_array_equal(c[..., :3], rgb, err_msg="cut-out colours differ from the input")


def test_mask_folder_for_a_batch(exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    masks = tmp_path / "masks"
    expected = {}
    for src in sorted(photos.glob("*.*")):
        rgb = read_image(src).rgb
        m = box_mask(*rgb.shape[:2])
        if src.stem == "coffee":
            m = 255 - m  # a different mask per image: each must be matched by name
        save(masks / f"{src.stem}.png", m)
        expected[src.stem] = (rgb, m)
    out = tmp_path / "out"
    code, lines = cli(capsys, "run", "--models", exported_dir, photos, "--bg-color", "black", "--mask", masks, "-o", out, "--save-mask", tmp_path / "saved")
    assert code == 0, lines
    for stem, (rgb, m) in expected.items():
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "saved" / f"{stem}_mask.png")), m, err_msg=stem)
        got = np.asarray(Image.open(out / f"{stem}_bgswap.png"))
        np.testing.assert_array_equal(got[m == 255], rgb[m == 255], err_msg=stem)
        assert (got[m == 0] == 0).all(), stem
    # one file for several inputs is ambiguous; a folder missing a mask fails that image only
    code, lines = cli(capsys, "run", "--models", exported_dir, photos, "--bg-color", "black", "--mask", masks / "coffee.png", "-o", out, "--overwrite")
    assert code == 1 and any("with several inputs give a folder of masks" in line for line in lines), lines
    (masks / "coffee.png").unlink()
    code, lines = cli(capsys, "run", "--models", exported_dir, photos, "--bg-color", "black", "--mask", masks, "-o", tmp_path / "out2")
    assert code == 1 and summary(lines) == (2, 0, 1)
    assert any(f"no mask named coffee.* in {masks}" in line for line in lines), lines


def test_size_sets_the_generation_resolution(exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.png"
    code, lines = cli(capsys, "run", "--models", exported_dir, photos / "coffee.jpg", "--prompt", "a wall", "--seed", 1, "--size", "192x128", "-o", out)
    assert code == 0, lines
    assert any("generated at 192x128" in line for line in lines), lines
    assert Image.open(out).size == Image.open(photos / "coffee.jpg").size
    code, lines = cli(capsys, "run", "--models", exported_dir, photos / "coffee.jpg", "--prompt", "a wall", "--seed", 1, "-o", tmp_path / "default.png")
    generated = [line for line in lines if "generated at" in line]
    assert code == 0 and len(generated) == 1 and "192x128" not in generated[0], lines
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "default.png")))


def test_same_seed_same_bytes(exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outs = []
    for i, seed in enumerate((21, 21, 22)):
        target = tmp_path / f"o{i}.png"
        assert cli(capsys, "run", "--models", exported_dir, photos / "astronaut.jpg", "--prompt", "a beach", "--seed", seed, "-o", target)[0] == 0
        outs.append(target.read_bytes())
    assert outs[0] == outs[1], "the same seed gave different files"
    assert outs[0] != outs[2], "different seeds gave the same file"


def test_cli_is_a_thin_layer_over_the_api(exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.png"
    args = ["--prompt", "a red barn", "--negative-prompt", "blurry", "--guidance", "2", "--steps", "3", "--seed", "8", "--grow", "3", "--band", "4"]
    assert cli(capsys, "run", "--models", exported_dir, photos / "chelsea.png", *args, "-o", out)[0] == 0
    from trt_bgswap.runtime.mask_ops import MaskOptions

    api = BackgroundReplacer(exported_dir, provider="cpu").replace(
        read_image(photos / "chelsea.png").rgb, "a red barn", negative_prompt="blurry", guidance=2.0, steps=3, seed=8,
        mask_options=MaskOptions(grow=3, band=4),
    )
    np.testing.assert_array_equal(np.asarray(Image.open(out)), api.image, err_msg="CLI output differs from the API's")


# --- 3. alpha 1 keeps the input exactly, also with a generated background ---


@pytest.mark.parametrize("src_name", ["chelsea.png", "coffee.jpg", "sub/camera.jpg"])
def test_subject_pixels_are_the_input_pixels(src_name: str, exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = photos / src_name
    rgb = read_image(src).rgb
    mask = box_mask(*rgb.shape[:2])
    mask_file = save(tmp_path / "mask.png", mask)
    out = tmp_path / "out.png"
    code, lines = cli(capsys, "run", "--models", exported_dir, src, "--prompt", "a snowy street", "--seed", 5, "--mask", mask_file, "-o", out)
    assert code == 0, lines
    got = np.asarray(Image.open(out))
    fg = mask == 255
    diff = np.abs(got[fg].astype(int) - rgb[fg].astype(int)).max()
    assert diff == 0, f"subject pixels differ from the input by up to {diff}"
    assert np.abs(got[mask == 0].astype(int) - rgb[mask == 0].astype(int)).max() > 0, "the background was not replaced"


# --- the mask command ---


@pytest.mark.parametrize("source", ["published-onnx", "exported-folder"])
def test_mask_command(source: str, tiny_models_dir: Path, exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rmbg = tiny_models_dir / "rmbg" / "onnx" / "model.onnx" if source == "published-onnx" else exported_dir
    out = tmp_path / "masks"
    code, lines = cli(capsys, "mask", photos, "--recursive", "--rmbg", rmbg, "-o", out, "--cutout", "--provider", "cpu")
    assert code == 0, lines
    assert summary(lines) == (5, 0, 0)
    masker = Masker.from_onnx(rmbg, provider="cpu") if source == "published-onnx" else BackgroundReplacer(exported_dir, provider="cpu")
    for src in sorted(photos.rglob("*.*")):
        rgb = read_image(src).rgb
        mirrored = out / src.relative_to(photos).parent  # --recursive mirrors the input tree
        m = Image.open(mirrored / f"{src.stem}.png")
        assert m.mode == "L" and m.size == (rgb.shape[1], rgb.shape[0]), src
        ref = alpha_to_u8(masker.predict(rgb) if isinstance(masker, Masker) else masker.mask(rgb))
        err = int(np.abs(np.asarray(m).astype(int) - ref.astype(int)).max())
        # exact: the CLI runs the same masker code on the same graph in this process
        assert err == 0, f"{src.name}: mask differs from the masker's by {err}/255"
        c = Image.open(mirrored / f"{src.stem}_cutout.png")
        assert c.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(c)[..., 3], np.asarray(m), err_msg=f"{src.name}: cut-out alpha != mask")
        np.testing.assert_array_equal(np.asarray(c)[..., :3], rgb, err_msg=f"{src.name}: cut-out colours != input")
    code, lines = cli(capsys, "mask", photos, "--recursive", "--rmbg", rmbg, "-o", out, "--cutout")
    assert code == 0 and summary(lines) == (0, 5, 0)


def test_mask_command_bad_sources(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = cli(capsys, "mask", photos, "--rmbg", tmp_path, "-o", tmp_path / "m")
    assert code == 2 and "no RMBG model here" in lines[-1], lines
    code, lines = cli(capsys, "mask", photos, "--rmbg", tmp_path / "x.onnx", "-o", tmp_path / "m.png")
    assert code == 2 and "give a folder" in lines[-1], lines


# --- progress and summary ---


def test_progress_line_and_summary(exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = cli(capsys, "-q", "run", "--models", exported_dir, photos / "chelsea.png", photos / "coffee.jpg", "--prompt", "x", "--seed", 0, "-o", tmp_path, "--progress")
    assert code == 0, lines
    # tqdm's bar, one update per image when stderr is not a terminal: count, rate, status and name
    first = [line for line in lines if " 1/2 [" in line]
    last = [line for line in lines if " 2/2 [" in line]
    assert len(first) == 1 and last, lines
    assert re.search(r"^\s*50%\|#+\s*\| 1/2 \[.*,\s+\d+\.\d+img/s, ok chelsea\.png\]\s*$", first[0]), first[0]
    assert re.search(r"^\s*100%\|#+\| 2/2 \[.*,\s+\d+\.\d+img/s, ok coffee\.jpg\]\s*$", last[0]), last[0]
    assert summary(lines) == (2, 0, 0)


# --- 4. model folders: a clear error without one, an automatic export when sources are given ---


def test_run_without_an_export_says_how_to_make_one(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRT_BGSWAP_HOME", str(tmp_path / "home"))
    for models in ([], ["--models", str(tmp_path / "nothing")]):
        code, lines = cli(capsys, "run", photos / "chelsea.png", "--prompt", "x", *models)
        assert code == 2 and len(lines) == 1, lines
        for part in ("holds no exported models", "trt-bgswap export --out", "--inpaint/--lcm-lora/--rmbg", "tiny-models"):
            assert part in lines[0], lines[0]
    assert str(tmp_path / "home" / "cache" / "models" / "default") in lines[0] or str(tmp_path / "nothing") in lines[0], lines[0]


def test_run_exports_once_from_sources_then_reuses(tiny_models_dir: Path, exported_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --inpaint --lcm-lora --rmbg` with no export yet exports into the per-user cache; later runs reuse it."""
    from trt_bgswap.manifest import Manifest
    from trt_bgswap.paths import default_export_dir

    monkeypatch.setenv("TRT_BGSWAP_HOME", str(tmp_path / "home"))
    folder = default_export_dir()
    src = photos / "chelsea.png"
    sources = ["--inpaint", tiny_models_dir / "sd-inpainting", "--lcm-lora", tiny_models_dir / "lcm-lora", "--rmbg", tiny_models_dir / "rmbg"]
    job = ["--prompt", "a lighthouse", "--seed", 6]
    code, lines = cli(capsys, "run", src, *sources, *job, "-o", tmp_path / "a.png")
    assert code == 0, lines
    assert any("exporting them once" in line for line in lines), lines
    assert set(Manifest.load(folder).models) == {"text_encoder", "unet", "vae_encoder", "vae_decoder", "rmbg"}
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    # the same models as the session's export of the same sources: the same image
    assert cli(capsys, "run", src, "--models", exported_dir, *job, "-o", tmp_path / "ref.png")[0] == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "ref.png").read_bytes()
    # again with the sources, and without: reused, not exported again
    for again in (sources, []):
        code, lines = cli(capsys, "run", src, *again, *job, "-o", tmp_path / "b.png", "--overwrite")
        assert code == 0 and any(f"using the exported models in {folder}" in line for line in lines), lines
        assert not any("exporting" in line for line in lines), lines
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp, "the export was redone"
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()
    # `info` lists it in the cache, with its size
    capsys.readouterr()
    assert main(["info"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if str(folder) in line]
    assert len(listed) == 1 and re.search(r"\d+(\.\d+)? [KMG]iB$", listed[0]), listed
    # other sources than the export's: refused, not silently ignored
    other = tmp_path / "other-rmbg"
    shutil.copytree(tiny_models_dir / "rmbg", other)
    code, lines = cli(capsys, "run", src, "--rmbg", other, *job, "-o", tmp_path / "d.png")
    assert code == 2 and "already holds models exported from" in lines[-1] and "--models NEWDIR" in lines[-1], lines
    assert str(tiny_models_dir / "rmbg") in lines[-1] and str(other) in lines[-1], lines[-1]
    assert not (tmp_path / "d.png").exists()


def test_run_exports_from_a_hub_id_offline(tiny_models_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --rmbg briaai/RMBG-1.4` offline, from a hub cache laid out as huggingface_hub does; reused by registry name."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--briaai--RMBG-1.4" / "snapshots" / ("c" * 40)
    shutil.copytree(tiny_models_dir / "rmbg", snapshot, ignore=shutil.ignore_patterns("model_fp16.onnx", "model_quantized.onnx"))
    (cache / "models--briaai--RMBG-1.4" / "refs").mkdir()
    (cache / "models--briaai--RMBG-1.4" / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("TRT_BGSWAP_HOME", str(tmp_path / "home"))
    src = photos / "chelsea.png"
    code, lines = cli(capsys, "run", src, "--rmbg", "briaai/RMBG-1.4", "--bg-color", "white", "-o", tmp_path / "a.png")
    assert code == 0, lines
    assert any("exporting them once" in line for line in lines), lines
    assert any("licence: rmbg-1.4" in line and "not licensed for commercial use" in line for line in lines), lines
    code, lines = cli(capsys, "run", src, "--rmbg", "rmbg-1.4", "--bg-color", "white", "-o", tmp_path / "b.png")
    assert code == 0 and any("using the exported models in" in line for line in lines), lines
    assert not any("licence:" in line for line in lines), "the licence notice is shown once"
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    code, lines = cli(capsys, "run", src, "--rmbg", "someone/other-rmbg", "--bg-color", "white", "-o", tmp_path / "c.png")
    assert code == 2 and "already holds models exported from" in lines[-1] and "someone/other-rmbg" in lines[-1], lines


@pytest.mark.parametrize(
    "given,bg_color,mask,expected",
    [
        ({"rmbg": "r"}, True, False, {"inpaint": "none", "lcm_lora": "none", "rmbg": "r"}),
        ({"inpaint": "i"}, False, True, {"inpaint": "i", "lcm_lora": "family", "rmbg": "none"}),
        ({"inpaint": "none"}, False, False, {"inpaint": "none", "lcm_lora": "none", "rmbg": "rmbg-1.4"}),
        ({}, False, False, {"inpaint": "sd15-inpainting", "lcm_lora": "family", "rmbg": "rmbg-1.4"}),
        ({"lcm_lora": "none"}, False, False, {"inpaint": "sd15-inpainting", "lcm_lora": "none", "rmbg": "rmbg-1.4"}),
    ],
)
def test_sources_a_run_exports(given: dict[str, str], bg_color: bool, mask: bool, expected: dict[str, str]) -> None:
    """A model not named is the registry default unless the job has no use for it (colour: no inpainting; own mask: no RMBG)."""
    from trt_bgswap.model_folders import with_defaults

    assert with_defaults(given, need_inpaint=not bg_color, need_rmbg=not mask) == expected


def test_rmbg_only_export_serves_colours_and_names_what_prompts_need(tiny_models_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "rmbg-only"
    src = photos / "chelsea.png"
    code, lines = cli(capsys, "run", src, "--models", models, "--rmbg", tiny_models_dir / "rmbg" / "onnx" / "model.onnx", "--bg-color", "white", "-o", tmp_path / "a.png")
    assert code == 0, lines
    code, lines = cli(capsys, "run", src, "--models", models, "--prompt", "x", "-o", tmp_path / "e.png")
    assert code == 1 and "no inpainting models" in lines[-1] and "--inpaint" in lines[-1], lines
    assert not (tmp_path / "e.png").exists()


# --- 5. hub ids offline with an empty cache ---


@pytest.mark.parametrize(
    "sources",
    [[], ["--inpaint", "some-org/some-inpainting-model", "--lcm-lora", "none", "--rmbg", "none"]],
    ids=["registry-defaults", "hub-id"],
)
def test_export_offline_with_an_empty_hub_cache(sources: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: any network use would fail differently
    monkeypatch.setenv("TRT_BGSWAP_HOME", str(tmp_path / "home"))
    code, lines = cli(capsys, "export", "--out", tmp_path / "exp", *sources)
    assert code == 1, lines
    err = lines[-1]
    assert err.startswith("error: cannot find ") and len([line for line in lines if line.startswith("error")]) == 1, lines
    for part in ("offline mode is on", "HF_HUB_OFFLINE=1", "a local folder", "trt-bgswap tiny-models DIR", str(tmp_path / "hf")):
        assert part in err, err
    assert not (tmp_path / "exp").exists()


def test_export_needs_something(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = cli(capsys, "export", "--out", tmp_path / "e", "--inpaint", "none", "--lcm-lora", "none", "--rmbg", "none")
    assert code == 2 and "nothing to export" in lines[-1], lines
    code, lines = cli(capsys, "export", "--out", tmp_path / "e", "--inpaint", "none", "--rmbg", "none")
    assert code == 2 and "nothing to export" in lines[-1], "without --inpaint the LCM-LoRA default is left out too"
    code, lines = cli(capsys, "export", "--out", tmp_path / "e", "--inpaint", "none", "--rmbg", "none", "--lcm-lora", "x/y")
    assert code == 2 and "--lcm-lora is fused into the inpainting model" in lines[-1], lines
    code, lines = cli(capsys, "export", "--out", tmp_path / "e", "--inpaint", tmp_path / "missing", "--rmbg", "none", "--lcm-lora", "none")
    assert code == 1 and f"{tmp_path / 'missing'}: no such file or folder" in lines[-1], lines
