"""`trt-bgswap run --size` that cannot fit in memory is refused in one line, before the UNet is loaded.

Real CLI processes on the tiny export. The memory available is made small the way an appliance
makes it small, with a budget (``--memory-budget`` or ``TRT_BGSWAP_MEMORY_BUDGET``), so the
tests do not depend on this machine's free memory. 1024x1024 with the tiny models holds two
8 GiB attention tensors as exported: far above a 1 GiB budget on any machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trt_bgswap.errors import UsageError

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "astronaut.jpg"
REFUSAL = re.compile(
    r"error: --size 1024x1024 needs about \d+\.\d GiB \(attention over 16384 tokens\) but the budget \((?P<source>[^)]+)\) "
    r"is 1\.0 GiB: use --size (?P<w>\d+)x(?P<h>\d+) or smaller, or run `trt-bgswap build \S+` first \(tiled attention: about \d+\.\d GiB\)"
)
# An export made before memory facts were recorded: the tiny models' native size is 128x128.
UNMEASURED = re.compile(
    r"error: --size 1024x1024: \S+ records no memory facts \(exported by an older trt-bgswap\), so the memory this size needs is unknown "
    r"\(attention memory grows with the square of the pixels\): re-export it with `trt-bgswap export` to get the memory check, "
    r"or use --size 128x128 or smaller"
)


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed `trt-bgswap` command in its own process."""
    command = shutil.which("trt-bgswap", path=str(Path(sys.executable).parent))
    assert command, "the trt-bgswap console script is not installed next to this Python"
    environ = {k: v for k, v in os.environ.items() if k != "TRT_BGSWAP_MEMORY_BUDGET"} | (env or {})
    return subprocess.run([command, *args], capture_output=True, text=True, timeout=300, env=environ)


def gen_args(models: Path, out: Path, size: str) -> list[str]:
    return ["run", str(PHOTO), "--models", str(models), "--provider", "cpu", "--prompt", "a beach", "--seed", "1", "--steps", "1", "--size", size, "-o", str(out)]


@pytest.mark.parametrize("how", ["option", "environment"])
def test_too_large_a_size_is_refused_in_one_line_before_loading(exported_dir: Path, tmp_path: Path, how: str) -> None:
    out = tmp_path / "out.png"
    args = gen_args(exported_dir, out, "1024x1024")
    proc = run(args + ["--memory-budget", "1G"]) if how == "option" else run(args, {"TRT_BGSWAP_MEMORY_BUDGET": "1G"})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and REFUSAL.fullmatch(errors[0]), proc.stderr
    assert REFUSAL.fullmatch(errors[0])["source"] == ("--memory-budget" if how == "option" else "TRT_BGSWAP_MEMORY_BUDGET")
    assert "loaded " not in proc.stderr, "the models were loaded before the refusal"  # Pipeline.load logs "loaded <folder> (...)"
    assert not out.exists()


def test_the_unet_file_is_never_opened(exported_dir: Path, tmp_path: Path) -> None:
    """A corrupt UNet: the refusal still comes (nothing opened it); a size that fits reaches it and fails on it."""
    folder = tmp_path / "export"
    shutil.copytree(exported_dir, folder)
    (folder / "unet" / "model.onnx").write_bytes(b"not an onnx graph")
    refused = run(gen_args(folder, tmp_path / "a.png", "1024x1024") + ["--memory-budget", "1G"])
    assert refused.returncode == 2 and REFUSAL.fullmatch(refused.stderr.strip().splitlines()[-1]), refused.stderr
    reached = run(gen_args(folder, tmp_path / "b.png", "128x128") + ["--memory-budget", "1G"])
    assert reached.returncode != 0 and "unet/model.onnx: ONNX Runtime cannot load it" in reached.stderr, reached.stderr


def test_the_suggested_size_runs_under_the_budget(exported_dir: Path, tmp_path: Path) -> None:
    refused = run(gen_args(exported_dir, tmp_path / "a.png", "1024x1024") + ["--memory-budget", "1G"])
    m = REFUSAL.fullmatch(refused.stderr.strip().splitlines()[-1])
    assert m, refused.stderr
    out = tmp_path / "b.png"
    proc = run(gen_args(exported_dir, out, f"{m['w']}x{m['h']}") + ["--memory-budget", "1G"])
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and f"generated at {m['w']}x{m['h']}" in proc.stderr
    assert proc.stderr.count("backend: cpu") == 1, f"the backend is announced once, by the load:\n{proc.stderr}"


def test_a_bad_budget_is_a_usage_error(exported_dir: Path, tmp_path: Path) -> None:
    proc = run(gen_args(exported_dir, tmp_path / "a.png", "128x128") + ["--memory-budget", "lots"])
    assert proc.returncode == 2 and "--memory-budget 'lots': give a size such as 6G" in proc.stderr


def test_api_refuses_in_check_options(exported_dir: Path) -> None:
    from trt_bgswap.api import BackgroundReplacer
    from trt_bgswap.memory import process_rss

    # the budget counts this process as it is (in the whole suite it already holds torch and diffusers'
    # pipelines): 1 GiB on top of it fits 128x128 and not 1024x1024 (about 16 GiB as exported)
    budget = process_rss() + (1 << 30)
    swapper = BackgroundReplacer(exported_dir, provider="cpu", memory_budget=str(budget))
    with pytest.raises(UsageError, match=r"^--size 1024x1024 needs about .* but the budget"):
        swapper.check_options("a beach", size=(1024, 1024))
    swapper.check_options("a beach", size=(128, 128))


@pytest.fixture
def older_export(exported_dir: Path, tmp_path: Path) -> Path:
    """The tiny export as an older trt-bgswap wrote it: a manifest without ``memory``."""
    folder = tmp_path / "older"
    shutil.copytree(exported_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["memory"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_an_older_export_refuses_a_size_above_its_native_one_before_loading(older_export: Path, tmp_path: Path) -> None:
    """No facts, no estimate: 1024x1024 is refused in one line (the corrupt UNet proves nothing was opened)."""
    (older_export / "unet" / "model.onnx").write_bytes(b"not an onnx graph")
    proc = run(gen_args(older_export, tmp_path / "a.png", "1024x1024"))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and UNMEASURED.fullmatch(errors[0]), proc.stderr
    assert "loaded " not in proc.stderr and not (tmp_path / "a.png").exists()


def test_an_older_export_still_loads_and_generates_at_its_native_size(older_export: Path) -> None:
    from PIL import Image

    from trt_bgswap.api import BackgroundReplacer

    swapper = BackgroundReplacer(older_export, provider="cpu", memory_budget="1G")
    with pytest.raises(UsageError, match=r"^--size 1024x1024: .* records no memory facts .* or use --size 128x128 or smaller$"):
        swapper.check_options("a beach", size=(1024, 1024))
    with pytest.raises(UsageError, match=r"or use --size 128x64 or smaller$"):  # the aspect is kept
        swapper.check_options("a beach", size=(512, 256))
    out = swapper.replace(PHOTO, "a beach", steps=1, seed=1)  # the default size policy: 128x128 for a square photo
    assert out.generation_size == (128, 128) and out.image.size == Image.open(PHOTO).size


def test_an_export_missing_the_unets_facts_is_not_estimated_without_it(exported_dir: Path, tmp_path: Path) -> None:
    """A graph whose cost grows with the size but has no facts (the exporter could not measure it) is never left out of
    the estimate: the export is treated as unmeasured (sizes up to the native one), not as costing nothing."""
    from trt_bgswap.runtime.memory_guard import UnmeasuredGuard, guard_for_run

    folder = tmp_path / "partial"
    shutil.copytree(exported_dir, folder, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data"))
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["memory"]["graphs"]["unet"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    guard = guard_for_run(folder, "cpu", budget=1 << 40)
    assert isinstance(guard, UnmeasuredGuard) and guard.graphs == ("unet",)
    guard.check((128, 128), 1.0)
    with pytest.raises(UsageError, match=r"records no memory facts for unet \(its exporter could not measure them\).* or use --size 128x128 or smaller$"):
        guard.check((1024, 1024), 1.0)
