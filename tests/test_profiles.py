"""TensorRT optimization profiles derived from the I/O specs: static by default, dynamic on request.

Expected shapes are recomputed here from first principles (the spec's declared
dims with latent = pixels / VAE factor), not read back from the code under test.
"""

from __future__ import annotations

import pytest

from trt_bgswap.engines.profiles import (
    DimRange,
    GenerationShapes,
    envelope,
    model_profiles,
    parse_size_range,
    profile_from_ranges,
)
from trt_bgswap.runtime.trt_shapes import ShapeProfile, select_profile
from trt_bgswap.errors import UsageError
from trt_bgswap.specs import ModelSpec, rmbg_spec, text_encoder_spec, unet_spec, vae_decoder_spec, vae_encoder_spec

F = 8  # the VAE factor of these test specs (SD1.5's value; a parameter of the code, a fact of the test)
SPECS = {
    "text_encoder": text_encoder_spec(77, 768),
    "unet": unet_spec(9, 4, 77, 768),
    "vae_encoder": vae_encoder_spec(3, 4),
    "vae_decoder": vae_decoder_spec(3, 4),
    "rmbg": rmbg_spec(None),
}
EXTRA = {"rmbg": {"S": 1024}}


def expected_shape(spec: ModelSpec, name: str, b: int, width: int, height: int) -> tuple[int, ...]:
    values = {"B": b, "H": height, "W": width, "h": height // F, "w": width // F, "S": 1024}
    return tuple(values[d] if isinstance(d, str) else d for d in spec.tensor(name).shape)


@pytest.mark.parametrize("model", list(SPECS))
@pytest.mark.parametrize("size", [(512, 512), (768, 512), (448, 640)])
def test_static_profile_is_the_spec_at_that_size(model: str, size: tuple[int, int]) -> None:
    spec = SPECS[model]
    profiles = model_profiles(spec, GenerationShapes((size,)), F, EXTRA.get(model))
    assert len(profiles) == 1
    p = profiles[0]
    assert p.is_static
    assert [t.name for t in p.tensors] == spec.input_names
    for t in p.tensors:
        want = expected_shape(spec, t.name, 1, *size)
        assert t.min == t.opt == t.max == want, f"{model}.{t.name}: {t} != {want}"


@pytest.mark.parametrize("model", list(SPECS))
def test_dynamic_profile_varies_only_symbolic_dims(model: str) -> None:
    spec = SPECS[model]
    shapes = GenerationShapes(((512, 512),), batches=(1, 2), dynamic=((256, 384), (1024, 768)))
    (p,) = model_profiles(spec, shapes, F, EXTRA.get(model))
    b_max = 2 if model == "unet" else 1
    for t in p.tensors:
        declared = spec.tensor(t.name).shape
        assert t.min == expected_shape(spec, t.name, 1, 256, 384)
        assert t.opt == expected_shape(spec, t.name, 1, 512, 512)
        assert t.max == expected_shape(spec, t.name, b_max, 1024, 768)
        for axis, d in enumerate(declared):
            if isinstance(d, int):
                assert t.min[axis] == t.opt[axis] == t.max[axis] == d, f"{model}.{t.name} fixed dim {axis} varies"


def test_dynamic_unet_latent_range() -> None:
    (p,) = model_profiles(SPECS["unet"], GenerationShapes(((512, 512),), dynamic=((256, 256), (1024, 768))), F)
    sample = p.tensor("sample")
    assert (sample.min[2], sample.max[2]) == (256 // F, 768 // F)  # height axis
    assert (sample.min[3], sample.max[3]) == (256 // F, 1024 // F)  # width axis
    assert not p.is_static


def test_one_static_profile_per_size_and_batch_for_the_unet() -> None:
    sizes = ((512, 512), (768, 512))
    shapes = GenerationShapes(sizes, batches=(1, 2))
    unet = model_profiles(SPECS["unet"], shapes, F)
    got = sorted(p.tensor("sample").opt for p in unet)
    want = sorted(expected_shape(SPECS["unet"], "sample", b, w, h) for (w, h) in sizes for b in (1, 2))
    assert got == want
    assert all(p.is_static for p in unet)
    # the VAE runs at batch 1 whatever the guidance: one profile per size
    assert len(model_profiles(SPECS["vae_decoder"], shapes, F)) == len(sizes)


def test_profiles_that_do_not_depend_on_the_size_are_kept_once() -> None:
    shapes = GenerationShapes(((512, 512), (768, 512), (512, 768)))
    assert len(model_profiles(SPECS["text_encoder"], shapes, F)) == 1
    assert len(model_profiles(SPECS["rmbg"], shapes, F, EXTRA["rmbg"])) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sizes": ()}, "no generation size"),
        ({"sizes": ((512, 512),), "batches": ()}, "batch"),
        ({"sizes": ((512, 512),), "batches": (0,)}, "batch"),
        ({"sizes": ((1024, 512),), "dynamic": ((256, 256), (768, 768))}, "outside --dynamic"),
        ({"sizes": ((512, 512),), "dynamic": ((768, 768), (256, 256))}, "exceeds"),
    ],
)
def test_bad_generation_shapes_are_usage_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        GenerationShapes(**kwargs)


@pytest.mark.parametrize("size", [(500, 512), (512, 520)])
def test_sizes_must_be_multiples_of_the_model_multiple(size: tuple[int, int]) -> None:
    with pytest.raises(UsageError, match="multiple of 64"):
        GenerationShapes((size,)).check_multiple(64)


def test_dynamic_corners_are_checked_against_the_multiple() -> None:
    with pytest.raises(UsageError, match="not a multiple"):
        GenerationShapes(((512, 512),), dynamic=((200, 256), (1024, 1024))).check_multiple(64)


def test_missing_symbol_range_is_an_error() -> None:
    with pytest.raises(UsageError, match=r"dims \['S'\]"):
        model_profiles(SPECS["rmbg"], GenerationShapes(((512, 512),)), F)


@pytest.mark.parametrize("lo, opt, hi", [(2, 1, 3), (0, 1, 1), (1, 3, 2)])
def test_dim_range_order(lo: int, opt: int, hi: int) -> None:
    with pytest.raises(UsageError):
        DimRange(lo, opt, hi)


def test_select_profile_picks_the_containing_one() -> None:
    shapes = GenerationShapes(((512, 512), (768, 512)), batches=(1, 2))
    unet = model_profiles(SPECS["unet"], shapes, F)
    for i, p in enumerate(unet):
        feed = {t.name: t.opt for t in p.tensors}
        assert select_profile(unet, feed) == i


def test_select_profile_error_names_shapes_and_fix() -> None:
    unet = model_profiles(SPECS["unet"], GenerationShapes(((512, 512),)), F)
    feed = {"sample": (1, 9, 96, 64), "timestep": (1,), "encoder_hidden_states": (1, 77, 768)}
    with pytest.raises(UsageError, match=r"sample \[1, 9, 96, 64\].*--size"):
        select_profile(unet, feed)


def test_dynamic_profile_accepts_every_size_in_range_and_nothing_outside() -> None:
    (p,) = model_profiles(SPECS["vae_decoder"], GenerationShapes(((512, 512),), dynamic=((256, 256), (768, 768))), F)
    assert p.contains({"latent_sample": (1, 4, 40, 72)})
    assert not p.contains({"latent_sample": (1, 4, 104, 64)})
    assert not p.contains({"latent_sample": (1, 4, 64)})  # wrong rank


def test_envelope_spans_all_profiles_and_keeps_the_first_opt() -> None:
    unet = model_profiles(SPECS["unet"], GenerationShapes(((512, 512), (768, 384)), batches=(1, 2)), F)
    env = envelope(unet)
    s = env.tensor("sample")
    assert s.min == (1, 9, 384 // F, 512 // F)
    assert s.max == (2, 9, 512 // F, 768 // F)
    assert s.opt == unet[0].tensor("sample").opt
    assert all(env.contains({t.name: t.opt for t in p.tensors}) for p in unet)


def test_profile_json_round_trip() -> None:
    (p,) = model_profiles(SPECS["unet"], GenerationShapes(((512, 512),), batches=(1, 2), dynamic=((256, 256), (768, 768))), F)
    assert ShapeProfile.from_json(p.to_json()) == p


def test_profile_from_ranges_fixed_dims_come_from_the_spec() -> None:
    p = profile_from_ranges(SPECS["text_encoder"], {"B": DimRange(1, 1, 4)})
    t = p.tensor("input_ids")
    assert (t.min, t.opt, t.max) == ((1, 77), (1, 77), (4, 77))


@pytest.mark.parametrize(
    "text, want",
    [("256..768", ((256, 256), (768, 768))), ("512x384..1024x768", ((512, 384), (1024, 768))), (" 256X256 .. 512 ", ((256, 256), (512, 512)))],
)
def test_parse_size_range(text: str, want: tuple) -> None:
    assert parse_size_range(text) == want


@pytest.mark.parametrize("text", ["256", "256..", "a..b", "256..512..768", "0..512", "256x..512"])
def test_parse_size_range_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="--dynamic"):
        parse_size_range(text)
