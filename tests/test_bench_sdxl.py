"""`trt-bgswap bench --family sdxl` (issue 12): the SDXL family next to diffusers, planned to fit the machine's memory.

The full-size run is the lead's (about 2.6e9 UNet parameters: minutes per step on 2 cores); here the
memory plan is checked from the published configurations' parameter counts (meta device, no
memory), and the tiny SDXL run exercises the same code end to end (slow-marked).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trt_bgswap.benchmarking.memory_plan import check_memory_plan, fits_second_copy, parameter_counts, plan
from trt_bgswap.errors import UsageError

GIB = 1 << 30


def test_sdxl_parameter_counts_are_the_published_sizes() -> None:
    counts = parameter_counts("sdxl")
    assert 2.5e9 < counts["unet"] < 2.6e9  # SDXL's UNet: 2.57e9 (10.3 GB in fp32)
    assert 6.9e8 < counts["text_encoder_2"] < 7.0e8  # OpenCLIP ViT-bigG text tower with projection
    assert 1.2e8 < counts["text_encoder"] < 1.3e8 and 8.3e7 < counts["vae"] < 8.4e7


def test_memory_plan_refuses_what_does_not_fit_and_names_the_step() -> None:
    steps = {s.name: s.bytes for s in plan("sdxl")}
    assert max(steps, key=steps.get).startswith(("our pipeline", "the diffusers")), steps  # export streams its weights: no longer the peak
    with pytest.raises(UsageError, match="our pipeline"):
        check_memory_plan("sdxl", available=16 * GIB)
    assert check_memory_plan("sdxl", available=24 * GIB - 1 * GIB)  # this machine, idle, runs the SDXL bench without fusions
    assert check_memory_plan("sdxl", available=22 * GIB, exported=True)
    assert check_memory_plan("sd15", available=10 * GIB)
    # the fused-vs-unfused comparison opens a second UNet beside the pipeline: SDXL's does not fit in 24 GiB
    assert not fits_second_copy("sdxl", available=24 * GIB) and fits_second_copy("sdxl", available=40 * GIB)
    assert fits_second_copy("sd15", available=24 * GIB)


@pytest.mark.slow
def test_tiny_sdxl_bench_runs_both_sides(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "trt_bgswap.cli.main", "-q", "bench", "--mode", "tiny", "--family", "sdxl", "--work", str(tmp_path),
           "--runs", "1", "--warmup", "0", "--batch-sizes", "1", "--no-cold-start"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "tiny-sdxl.json").read_text(encoding="utf-8"))
    assert report["settings"]["family"] == "sdxl" and "--family sdxl" in report["settings"]["command"]
    assert "StableDiffusionXLInpaintPipeline" in (tmp_path / "tiny-sdxl.md").read_text(encoding="utf-8")
