"""``Pipeline.mask_batch`` / ``replace_batch``: a batch of requests gives each one exactly what it gets alone.

Real photos of different sizes and aspect ratios, different prompts and seeds, on the tiny
exported models (ONNX Runtime CPU): the RMBG batch against one call per photo, and the stacked
UNet loop (plain and guided, where the UNet batch is 2B rows) against ``Pipeline.replace`` per
job. Equality is exact (``array_equal``), not a tolerance: the module docstring says why ONNX
Runtime's CPU kernels compute each row of a batch as they compute it alone, and
``batching_is_exact`` (trt_bgswap.server.batching) is the check the server runs at warm-up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.mask_ops import MaskOptions
from trt_bgswap.runtime.denoise import HostDenoiser
from trt_bgswap.runtime.pipeline import GenerationJob, GenerationOptions, Pipeline
from trt_bgswap.server.batching import batching_is_exact


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB").resize(size, Image.Resampling.LANCZOS))


@pytest.fixture(scope="module")
def pipe(exported_dir: Path) -> Pipeline:
    return Pipeline.load(exported_dir, provider="cpu", threads=2)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [photo("astronaut", (150, 110)), photo("chelsea", (96, 140)), photo("coffee", (120, 120))]


def test_mask_batch_equals_each_alone(pipe: Pipeline, photos: list[np.ndarray]) -> None:
    batch = pipe.mask_batch(photos)
    for i, (im, got) in enumerate(zip(photos, batch)):
        np.testing.assert_array_equal(got, pipe.mask(im), err_msg=f"photo {i}: batched RMBG alpha != alone")
    assert not np.array_equal(batch[0][:96, :96], batch[1][:96, :96]), "different photos gave the same mask: the check is vacuous"


@pytest.mark.parametrize("guidance", [1.0, 1.7])
def test_replace_batch_equals_each_alone(pipe: Pipeline, photos: list[np.ndarray], guidance: float) -> None:
    assert isinstance(pipe.stages.generator.denoiser, HostDenoiser) and pipe.stages.generator.max_batch is None, "the host loop stacks"
    alphas = pipe.mask_batch(photos)
    size = (128, 64)  # non-square latents; every photo generates at this size, so the jobs share a key
    jobs = [
        GenerationJob(im, a, GenerationOptions(prompt=p, negative_prompt=n, steps=3, guidance=guidance, seed=s, size=size), MaskOptions(grow=g))
        for im, a, p, n, s, g in zip(photos, alphas, ["a beach", "a forest at night", "a beach"], ["", "blurry", "people"], [5, 6, 7], [0, 2, -1])
    ]
    assert len({pipe.generation_key(j.rgb.shape[1], j.rgb.shape[0], j.options) for j in jobs}) == 1
    batch = pipe.replace_batch(jobs)
    for i, (job, got) in enumerate(zip(jobs, batch)):
        alone = pipe.replace(job.rgb, job.options, job.mask_options, alpha=job.alpha)
        assert got.generated is not None and alone.generated is not None
        np.testing.assert_array_equal(got.generated, alone.generated, err_msg=f"job {i}: generated background differs from the job alone")
        np.testing.assert_array_equal(got.image, alone.image, err_msg=f"job {i}: result image differs from the job alone")
        np.testing.assert_array_equal(got.alpha, alone.alpha, err_msg=f"job {i}: alpha differs")
        assert (got.seed, got.generation_size) == (alone.seed, alone.generation_size) == (job.options.seed, size)
    # the jobs really differ, so a batch that returned one job's result for all would fail above
    assert not np.array_equal(batch[0].generated, batch[2].generated)


def test_replace_batch_refuses_mixed_keys(pipe: Pipeline, photos: list[np.ndarray]) -> None:
    a = np.ones(photos[0].shape[:2], np.float32)
    jobs = [
        GenerationJob(photos[0], a, GenerationOptions(prompt="x", steps=2, seed=1, size=(64, 64))),
        GenerationJob(photos[0], a, GenerationOptions(prompt="x", steps=3, seed=1, size=(64, 64))),
    ]
    with pytest.raises(UsageError, match="generation_key"):
        pipe.replace_batch(jobs)


def test_batching_is_exact_on_onnxruntime_cpu(pipe: Pipeline, photos: list[np.ndarray]) -> None:
    assert batching_is_exact(pipe, photos[:2], "warm-up") == {"mask": True, "generate": True}
