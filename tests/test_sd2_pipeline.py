"""SD2 inpainting (issue 12) through the SD path: the whole loop vs diffusers' StableDiffusionInpaintPipeline + LCMScheduler.

SD2 differs from SD1.5 only in its configs: an OpenCLIP ViT-H text encoder converted to
``CLIPTextModel`` (``hidden_act`` gelu) whose tokenizer pads with ``!``, per-block head sizes and
linear projections in the UNet. The tiny twin (:func:`trt_bgswap.export.tiny_sd.sd2_variant`)
also has a VAE of factor 4. No LCM-LoRA is published for SD2; a LoRA in the LCM-LoRA format over
its UNet stands for a user's own. Same photo, mask, prompt and noise on both sides
(:mod:`family_parity`); tolerance from :mod:`tolerance` and the issue's 1e-3.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import family_parity as fp
from family_parity import ACCEPTANCE, CASES
from tolerance import assert_within
from trt_bgswap.families import SD2
from trt_bgswap.manifest import Manifest
from trt_bgswap.runtime.pipeline import Noise, Pipeline

WIDTH, HEIGHT = 160, 96  # non-square, multiples of the tiny SD2's size multiple (VAE 4 x UNet 8 = 32)
STEPS = 4


@pytest.fixture(scope="module")
def sd2_exported(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trt_bgswap.export.exporter import export_models

    out = tmp_path_factory.mktemp("sd2") / "export"
    export_models(tiny_models_dir / "sd2-inpainting", tiny_models_dir / "lcm-lora-sd2", None, out, precision="fp32", opset=17)
    return out


@pytest.fixture(scope="module")
def runtime(sd2_exported: Path) -> Pipeline:
    return Pipeline.load(sd2_exported, provider="cpu")


@pytest.fixture(scope="module")
def photo_and_mask() -> tuple[np.ndarray, np.ndarray]:
    return fp.photo_and_mask()


@pytest.fixture(scope="module")
def reference(tiny_models_dir: Path, photo_and_mask) -> Callable[[fp.Case], tuple[np.ndarray, Noise]]:  # noqa: ANN001
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_models_dir / "sd2-inpainting", safety_checker=None, requires_safety_checker=False)
    return fp.lcm_reference(pipe, tiny_models_dir / "lcm-lora-sd2", *photo_and_mask, (WIDTH, HEIGHT), STEPS)


@pytest.fixture(scope="module")
def loop_tolerance(sd2_exported: Path, runtime: Pipeline, photo_and_mask, tmp_path_factory: pytest.TempPathFactory) -> Callable[[fp.Case, Noise], float]:  # noqa: ANN001
    return fp.loop_tolerance(sd2_exported, runtime, *photo_and_mask, tmp_path_factory.mktemp("noisy-sd2"), (WIDTH, HEIGHT), STEPS)


def test_sd2_family_from_the_config(sd2_exported: Path, runtime: Pipeline) -> None:
    manifest = Manifest.load(sd2_exported)
    assert manifest.inpaint is not None and manifest.inpaint.family == SD2
    assert "text_encoder_2" not in manifest.models
    assert runtime.stages.text_encoder is not None and runtime.stages.text_encoder.tokenizer.pad_id != runtime.stages.text_encoder.tokenizer.eos_id  # pads with "!"


# The guided case with a negative prompt runs by default (it covers the encoder, the padding and guidance);
# guidance 1 and guidance 2 without a negative prompt are slow-marked to keep the default suite short.
SD2_CASES = [pytest.param(c, marks=() if c == (2.0, fp.NEGATIVE) else pytest.mark.slow) for c in CASES]


@pytest.mark.numerics
@pytest.mark.parametrize("case", SD2_CASES)
def test_sd2_loop_matches_diffusers(reference, runtime: Pipeline, loop_tolerance, photo_and_mask, case: fp.Case) -> None:  # noqa: ANN001
    rgb, mask = photo_and_mask
    expected, noise = reference(case)
    ours = runtime.inpaint(rgb, mask, fp.options(case, (WIDTH, HEIGHT), STEPS), noise)
    assert ours.shape == expected.shape == (HEIGHT, WIDTH, 3)
    err = float(np.abs(ours - expected).max())
    what = f"SD2 guidance={case[0]} negative={case[1]!r}: generated image vs diffusers"
    assert_within(err, lambda: loop_tolerance(case, noise), what)
    assert err <= ACCEPTANCE, f"{what}: max abs err {err:.3g} > {ACCEPTANCE}"
    assert float(expected.std()) > 1e-2  # the image is not flat: the comparison means something
