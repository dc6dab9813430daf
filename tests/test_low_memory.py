"""``--low-memory`` (issue 15): each model's session is open only while its stage runs, and the results are
the default mode's bit for bit (the same graphs with the same session options; only when they open differs).
Sessions of the default mode open at load, in parallel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from test_run_command import trt_bgswap
from trt_bgswap.api import BackgroundReplacer
from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.pipeline import GenerationOptions, Pipeline
from trt_bgswap.runtime.residency import ResidentEngine, residency_for

OPTIONS = GenerationOptions(prompt="a beach at dusk", steps=3, guidance=1.6, seed=11, size=(128, 64))  # guided: both UNet rows


def photo() -> np.ndarray:
    return np.asarray(Image.fromarray(data.chelsea()).convert("RGB").resize((150, 110), Image.Resampling.LANCZOS))


def open_sessions(pipe: Pipeline) -> list[str]:
    return [n for n, e in pipe.engines.items() if (e.inner if isinstance(e, ResidentEngine) else e).session is not None]


@pytest.fixture(scope="module")
def default_result(exported_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with Pipeline.load(exported_dir, provider="cpu", threads=2) as pipe:
        assert sorted(open_sessions(pipe)) == sorted(pipe.engines), "the default mode opens every session at load"
        r = pipe.replace(photo(), OPTIONS)
        return r.image, r.alpha, r.generated


def test_low_memory_is_bit_identical_and_keeps_one_session_open(exported_dir: Path, default_result: tuple[np.ndarray, ...]) -> None:
    with Pipeline.load(exported_dir, provider="cpu", threads=2, low_memory=True) as pipe:
        residency = pipe.stages.residency
        assert residency is not None and open_sessions(pipe) == [], "low memory opens nothing at load"
        for request in range(2):  # the second request opens every session again
            r = pipe.replace(photo(), OPTIONS)
            assert len(open_sessions(pipe)) == 1, f"request {request}: open sessions {open_sessions(pipe)}"
            for got, want, what in zip((r.image, r.alpha, r.generated), default_result, ("composite", "alpha", "generated")):
                np.testing.assert_array_equal(got, want, err_msg=f"request {request}: low-memory {what} differs from the default mode")
        # the second request's prompt is cached: its text encoder does not run, so it does not open
        assert residency.loads == 2 * len(pipe.engines) - 1, f"{residency.loads} session opens for 2 requests of {len(pipe.engines)} models"


def test_a_budget_keeps_what_fits(exported_dir: Path, default_result: tuple[np.ndarray, ...]) -> None:
    with Pipeline.load(exported_dir, provider="cpu", threads=2, low_memory=2**40) as pipe:
        for _ in range(2):
            r = pipe.replace(photo(), OPTIONS)
        np.testing.assert_array_equal(r.image, default_result[0])
        assert pipe.stages.residency.loads == len(pipe.engines), "everything fits the budget: each session opens once"


def test_low_memory_through_the_api_and_bad_values(exported_dir: Path, default_result: tuple[np.ndarray, ...]) -> None:
    with BackgroundReplacer(exported_dir, provider="cpu", threads=2, low_memory=True) as swapper:
        got = swapper.pipeline.replace(photo(), OPTIONS)
    np.testing.assert_array_equal(got.image, default_result[0])
    for bad in (-1, 1.5, "1G"):
        with pytest.raises(UsageError, match="low_memory"):
            residency_for(bad)  # type: ignore[arg-type]


def test_run_low_memory_writes_the_same_file(exported_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "cat.png"
    Image.fromarray(photo()).save(src)
    outs = []
    for flag in ([], ["--low-memory"]):
        out = tmp_path / f"out{len(outs)}.png"
        proc = trt_bgswap(
            "run", src, "--models", exported_dir, "--prompt", "a beach", "--steps", "2", "--seed", "3", "--size", "64x128",
            "--provider", "cpu", "--threads", "2", "-o", out, *flag, home=tmp_path / "home",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        outs.append(np.asarray(Image.open(out)))
    np.testing.assert_array_equal(outs[1], outs[0], err_msg="run --low-memory wrote a different image")


def test_parallel_open_reports_a_broken_model(exported_dir: Path, tmp_path: Path) -> None:
    import shutil

    from trt_bgswap.errors import ModelError

    copy = tmp_path / "export"
    shutil.copytree(exported_dir, copy)
    (copy / "vae_decoder" / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match="vae_decoder"):
        Pipeline.load(copy, provider="cpu", threads=2)


def test_serve_low_memory_answers_the_default_modes_image(exported_dir: Path) -> None:
    """A real server process started with --low-memory, over loopback: the same PNG pixels as the default-mode library."""
    import io

    from server_process import ServerProcess, png_bytes

    image = png_bytes(photo())
    s = ServerProcess(["--models", str(exported_dir), "--provider", "cpu", "--threads", "2", "--low-memory", "--max-batch", "1", "--batch-wait-ms", "0"]).start()
    try:
        r = s.post_form("/v1/replace", {"image": image, "prompt": "a sunny beach", "seed": "11", "steps": "3"})
        assert r.status == 200, r.body[:300]
        got = np.asarray(r.image())
    finally:
        assert s.stop() == 0, s.log
    assert "Traceback" not in s.log, s.log
    with BackgroundReplacer(exported_dir, provider="cpu", threads=2) as library:
        want = library.replace(Image.open(io.BytesIO(image)), "a sunny beach", seed=11, steps=3).image
    np.testing.assert_array_equal(got, np.asarray(want), err_msg="serve --low-memory != the default mode")


def test_the_memory_guard_counts_one_model_resident_under_low_memory(exported_dir: Path) -> None:
    """The size check (issue 8's guard) must not refuse what --low-memory fits: only the largest graph's weights are resident."""
    from trt_bgswap.runtime.memory_guard import MemoryGuard, guard_for_run
    from trt_bgswap.runtime.residency import files_bytes

    with Pipeline.load(exported_dir, provider="cpu", threads=2) as default, Pipeline.load(exported_dir, provider="cpu", threads=2, low_memory=True) as low:
        if not isinstance(default.memory, MemoryGuard):
            pytest.skip("this export records no memory facts")
        sizes = [files_bytes(e.path) for e in default.engines.values()]
        assert default.memory.weights == sum(sizes) and low.memory.weights == max(sizes) < sum(sizes)
    assert guard_for_run(exported_dir, "cpu", resident_budget=0).weights == max(sizes)  # what `run --low-memory` checks before loading
