"""runtime/trt_shapes: profiles at run time, buffer plans, reallocation decisions and CUDA-graph eligibility."""

from __future__ import annotations

import numpy as np
import pytest

from trt_bgswap.runtime.trt_shapes import (
    DEVICE_ALIGNMENT,
    aligned,
    buffer_plan,
    complete_dims,
    cuda_graph_eligibility,
    reallocations,
)
from trt_bgswap.engines.profiles import GenerationShapes, model_profiles
from trt_bgswap.specs import pipeline_dims, text_encoder_spec, unet_spec, vae_decoder_spec, vae_encoder_spec

SPECS = {
    "text_encoder": text_encoder_spec(77, 768),
    "unet": unet_spec(9, 4, 77, 768),
    "unet_fp16": unet_spec(9, 4, 77, 768, dtype="float16"),
    "vae_encoder": vae_encoder_spec(3, 4),
    "vae_decoder": vae_decoder_spec(3, 4),
}


@pytest.mark.parametrize("model", list(SPECS))
@pytest.mark.parametrize("batch, width, height", [(1, 512, 512), (2, 768, 512)])
def test_bytes_match_numpy_arrays_of_the_spec(model: str, batch: int, width: int, height: int) -> None:
    spec = SPECS[model]
    dims = pipeline_dims(batch, height, width, 8)
    plan = buffer_plan(spec, dims)
    for t in plan.tensors:
        ref = np.empty(spec.tensor(t.name).resolve(dims), dtype=spec.tensor(t.name).np_dtype)
        assert (t.shape, t.nbytes) == (ref.shape, ref.nbytes), t.name
        assert t.is_input == (t.name in spec.input_names)
    assert plan.io_bytes == sum(aligned(t.nbytes) for t in plan.tensors)


def test_sd15_unet_at_512_sizes() -> None:
    """A known case: fp16 UNet, batch 2 at 512x512 -> sample 2x9x64x64 halves = 147456 bytes."""
    plan = buffer_plan(SPECS["unet_fp16"], pipeline_dims(2, 512, 512, 8))
    assert plan.sizes()["sample"] == 2 * 9 * 64 * 64 * 2
    assert plan.sizes()["encoder_hidden_states"] == 2 * 77 * 768 * 2


@pytest.mark.parametrize(
    "capacity, needed, want",
    [
        ({}, {"a": 10, "b": 20}, ["a", "b"]),  # first allocation
        ({"a": 10, "b": 20}, {"a": 10, "b": 20}, []),  # same dims: nothing
        ({"a": 10, "b": 20}, {"a": 5, "b": 20}, []),  # shrinking reuses
        ({"a": 10, "b": 20}, {"a": 11, "b": 20}, ["a"]),  # only the outgrown one
        ({"a": 10}, {"a": 10, "c": 1}, ["c"]),  # a new tensor
    ],
)
def test_reallocate_only_what_outgrew_its_buffer(capacity: dict, needed: dict, want: list) -> None:
    assert reallocations(capacity, needed) == want


@pytest.mark.parametrize("n, want", [(0, 0), (1, DEVICE_ALIGNMENT), (DEVICE_ALIGNMENT, DEVICE_ALIGNMENT), (DEVICE_ALIGNMENT + 1, 2 * DEVICE_ALIGNMENT)])
def test_alignment(n: int, want: int) -> None:
    assert aligned(n) == want


def test_cuda_graphs_only_for_static_profiles() -> None:
    static = model_profiles(SPECS["unet"], GenerationShapes(((512, 512), (768, 512))), 8)
    assert all(cuda_graph_eligibility(p).eligible for p in static)
    (dynamic,) = model_profiles(SPECS["unet"], GenerationShapes(((512, 512),), dynamic=((256, 256), (768, 768))), 8)
    verdict = cuda_graph_eligibility(dynamic)
    assert not verdict.eligible
    assert "sample" in verdict.reason and "encoder_hidden_states" not in verdict.reason  # its dims stay fixed
    (batch_range,) = model_profiles(SPECS["unet"], GenerationShapes(((512, 512),), batches=(1, 2), dynamic=((512, 512), (512, 512))), 8)
    assert not cuda_graph_eligibility(batch_range).eligible  # a batch range is dynamic too


def test_output_only_symbols_come_from_the_engine_shapes() -> None:
    """The VAE encoder's inputs fix B/H/W only; h/w come from what the engine reports for its outputs."""
    spec = SPECS["vae_encoder"]
    full = complete_dims(spec, {"B": 1, "H": 512, "W": 768}, {"latent_mean": (1, 4, 64, 96), "latent_std": (1, 4, 64, 96)})
    assert full == {"B": 1, "H": 512, "W": 768, "h": 64, "w": 96}
    assert buffer_plan(spec, full).sizes()["latent_std"] == np.empty((1, 4, 64, 96), np.float32).nbytes


@pytest.mark.parametrize(
    "shapes, match",
    [
        ({"latent_mean": (1, 4, 64, 96), "latent_std": (1, 4, 64, 95)}, r"\(w\) is 95"),  # outputs disagree
        ({"latent_mean": (2, 4, 64, 96), "latent_std": (2, 4, 64, 96)}, r"\(B\) is 2 .* B=1"),  # contradicts the input
        ({"latent_mean": (1, 3, 64, 96), "latent_std": (1, 4, 64, 96)}, "dim 1 is 3 in the engine, 4 in the spec"),
        ({"latent_mean": (1, 4, 64), "latent_std": (1, 4, 64, 96)}, "rank 3"),
    ],
)
def test_engine_shapes_contradicting_the_spec_are_rejected(shapes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        complete_dims(SPECS["vae_encoder"], {"B": 1, "H": 512, "W": 768}, shapes)
