"""`trt_bgswap.api.BackgroundReplacer`: the appliance API, on the tiny exported models and real photos.

Checks that the image kind round-trips (PIL in -> PIL out, array in -> array
out, path in -> PIL out) with identical pixels, that every CLI option is a
keyword with the same validation, that bad arrays and values raise UsageError,
and the docstring's thread-safety claim: two threads sharing one instance get
exactly what sequential calls with the same seeds give.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from trt_bgswap.api import BackgroundReplacer, Output, alpha_to_u8
from trt_bgswap.errors import BgSwapError, UsageError
from trt_bgswap.runtime.mask_ops import MaskOptions
from trt_bgswap.runtime.pipeline import Noise

SIDE = 160


def photo(name: str) -> np.ndarray:
    im = Image.fromarray(getattr(data, name)())
    im.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    return np.asarray(im.convert("RGB"))


def box_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    return m


@pytest.fixture(scope="module")
def swapper(exported_dir: Path) -> BackgroundReplacer:
    return BackgroundReplacer(exported_dir, provider="cpu", threads=1)


def test_pil_in_pil_out(swapper: BackgroundReplacer) -> None:
    rgb = photo("chelsea")
    out = swapper.replace(Image.fromarray(rgb), "a garden", seed=3)
    assert isinstance(out, Output)
    assert isinstance(out.image, Image.Image) and out.image.mode == "RGB" and out.image.size == (rgb.shape[1], rgb.shape[0])
    assert isinstance(out.alpha, Image.Image) and out.alpha.mode == "L" and out.alpha.size == out.image.size
    assert isinstance(out.cutout, Image.Image) and out.cutout.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(out.cutout)[..., 3], np.asarray(out.alpha), err_msg="cut-out alpha != alpha")
    np.testing.assert_array_equal(np.asarray(out.cutout)[..., :3], rgb, err_msg="cut-out colours != input")
    assert out.seed == 3 and out.generation_size is not None


def test_array_in_array_out_and_same_pixels_for_every_kind(swapper: BackgroundReplacer, tmp_path: Path) -> None:
    rgb = photo("coffee")
    arr = swapper.replace(rgb, "a beach", seed=9)
    assert isinstance(arr.image, np.ndarray) and arr.image.dtype == np.uint8 and arr.image.shape == rgb.shape
    assert isinstance(arr.alpha, np.ndarray) and arr.alpha.dtype == np.float32 and arr.alpha.shape == rgb.shape[:2]
    assert isinstance(arr.cutout, np.ndarray) and arr.cutout.shape == (*rgb.shape[:2], 4)
    path = tmp_path / "coffee.png"
    Image.fromarray(rgb).save(path)
    for kind, image in (("PIL", Image.fromarray(rgb)), ("path", path), ("str path", str(path)), ("opaque RGBA array", np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))):
        got = swapper.replace(image, "a beach", seed=9).image
        diff = int(np.abs(np.asarray(got).astype(int) - arr.image.astype(int)).max())
        assert diff == 0, f"{kind} input: differs from the array result by {diff}"


def test_grey_array(swapper: BackgroundReplacer) -> None:
    grey = np.asarray(Image.fromarray(photo("camera")).convert("L"))
    out = swapper.replace(grey, None, bg_color="white", mask=box_mask(*grey.shape))
    assert out.image.shape == (*grey.shape, 3)
    fg = box_mask(*grey.shape) == 255
    np.testing.assert_array_equal(out.image[fg], np.repeat(grey[..., None], 3, axis=2)[fg])


def test_mask_kinds(swapper: BackgroundReplacer, tmp_path: Path) -> None:
    rgb = photo("astronaut")
    soft = swapper.mask(rgb)
    assert soft.dtype == np.float32 and soft.shape == rgb.shape[:2] and 0.0 <= soft.min() and soft.max() <= 1.0
    pil = swapper.mask(Image.fromarray(rgb))
    assert isinstance(pil, Image.Image) and pil.mode == "L"
    np.testing.assert_array_equal(np.asarray(pil), alpha_to_u8(soft))
    # replace() without a mask uses exactly this alpha (no refinement by default)
    out = swapper.replace(rgb, None, bg_color="#000000")
    np.testing.assert_array_equal(out.alpha, soft, err_msg="replace() alpha != mask()")


@pytest.mark.parametrize("mask_kind", ["uint8", "bool", "float", "PIL L", "path", "RGBA array"])
def test_user_mask_kinds_and_exact_subject(mask_kind: str, swapper: BackgroundReplacer, tmp_path: Path) -> None:
    rgb = photo("rocket")
    m = box_mask(*rgb.shape[:2])
    path = tmp_path / "m.png"
    Image.fromarray(m).save(path)
    mask = {
        "uint8": m,
        "bool": m > 0,
        "float": m.astype(np.float32) / 255.0,
        "PIL L": Image.fromarray(m),
        "path": path,
        "RGBA array": np.dstack([np.zeros((*m.shape, 3), np.uint8), m]),
    }[mask_kind]
    out = swapper.replace(rgb, "a desert", seed=1, mask=mask)
    fg = m == 255
    diff = int(np.abs(out.image[fg].astype(int) - rgb[fg].astype(int)).max())
    assert diff == 0, f"{mask_kind}: subject pixels (alpha 1) differ from the input by {diff}"
    np.testing.assert_array_equal(out.alpha, (m / 255.0).astype(np.float32))


def test_same_options_as_the_cli(swapper: BackgroundReplacer) -> None:
    """negative_prompt, steps, guidance, size, bg_color, mask_options and explicit noise are keywords that act."""
    rgb = photo("chelsea")
    base = swapper.replace(rgb, "a field", seed=4, steps=2)
    guided = swapper.replace(rgb, "a field", seed=4, steps=2, guidance=2.5, negative_prompt="fog")
    assert not np.array_equal(base.image, guided.image), "guidance changed nothing"
    assert swapper.replace(rgb, "a field", seed=4, steps=2, size=(192, 128)).generation_size == (192, 128)
    grown = swapper.replace(rgb, None, bg_color=(0, 0, 255), mask=box_mask(*rgb.shape[:2]), mask_options=MaskOptions(grow=4))
    assert (grown.alpha > 0).sum() > (box_mask(*rgb.shape[:2]) > 0).sum(), "grow did not grow the subject"
    cfg = swapper.pipeline.config
    assert cfg is not None
    shape = (1, cfg.latent_channels, base.generation_size[1] // cfg.vae_scale_factor, base.generation_size[0] // cfg.vae_scale_factor)
    noise = Noise.from_seed(4, shape, 2)
    explicit = swapper.replace(rgb, "a field", steps=2, noise=noise)
    np.testing.assert_array_equal(explicit.image, base.image, err_msg="seed 4 and its explicit noise differ")


BAD_CALLS = {
    "float array": (lambda: np.zeros((64, 64, 3), np.float32), {}, "dtype float32"),
    "two channels": (lambda: np.zeros((64, 64, 2), np.uint8), {}, "shape (64, 64, 2)"),
    "4-D": (lambda: np.zeros((1, 64, 64, 3), np.uint8), {}, "shape (1, 64, 64, 3)"),
    "too small": (lambda: np.zeros((8, 64, 3), np.uint8), {}, "64x8; the minimum is 16 px"),
    "a list": (lambda: [[0, 0, 0]], {}, "unsupported image type list"),
    "mask size": (lambda: photo("chelsea"), {"mask": np.zeros((10, 10), np.uint8)}, "mask is 10x10 but the image is"),
    "mask nan": (lambda: photo("chelsea"), {"mask": np.full(photo("chelsea").shape[:2], np.nan, np.float32)}, "NaN"),
    "mask int64": (lambda: photo("chelsea"), {"mask": np.zeros(photo("chelsea").shape[:2], np.int64)}, "dtype int64"),
    "steps 0": (lambda: photo("chelsea"), {"steps": 0}, "steps=0"),
    "steps 2.5": (lambda: photo("chelsea"), {"steps": 2.5}, "steps=2.5"),
    "guidance -1": (lambda: photo("chelsea"), {"guidance": -1.0}, "guidance=-1.0"),
    "guidance nan": (lambda: photo("chelsea"), {"guidance": float("nan")}, "guidance=nan"),
    "size not a multiple": (lambda: photo("chelsea"), {"size": (100, 100)}, "multiples of 64"),
    "size string": (lambda: photo("chelsea"), {"size": "512x512"}, "size='512x512'"),
    "seed negative": (lambda: photo("chelsea"), {"seed": -1}, "seed=-1"),
    "colour": (lambda: photo("chelsea"), {"bg_color": "nope", "prompt": None}, "'nope' is not a colour"),
    "colour tuple": (lambda: photo("chelsea"), {"bg_color": (0, 300, 0), "prompt": None}, "three integers 0..255"),
    "neither": (lambda: photo("chelsea"), {"prompt": None}, "give a prompt"),
    "both": (lambda: photo("chelsea"), {"bg_color": "red"}, "alternatives"),
    "mask options": (lambda: photo("chelsea"), {"mask_options": MaskOptions(threshold=1.5)}, "threshold=1.5"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_values_raise_usage_error(case: str, swapper: BackgroundReplacer) -> None:
    make, kwargs, phrase = BAD_CALLS[case]
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "a lake")
    with pytest.raises(UsageError) as info:
        swapper.replace(make(), prompt, **kwargs)
    assert phrase in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_bad_path_is_the_projects_error(swapper: BackgroundReplacer, tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(BgSwapError, match="x.png: corrupt or truncated PNG"):
        swapper.replace(tmp_path / "x.png", "a lake")
    with pytest.raises(BgSwapError, match="no such file"):
        swapper.replace(tmp_path / "missing.jpg", "a lake")


def test_max_pixels(exported_dir: Path) -> None:
    capped = BackgroundReplacer(exported_dir, provider="cpu", max_pixels=5000)
    with pytest.raises(BgSwapError, match="5000 px"):
        capped.replace(Image.fromarray(photo("chelsea")), None, bg_color="red")
    with pytest.raises(UsageError, match="above the limit of 5000 px"):
        capped.replace(photo("chelsea"), None, bg_color="red")


def test_threads_share_one_instance_safely(swapper: BackgroundReplacer) -> None:
    """The docstring says calls on one instance are serialised: two threads == sequential, seed for seed."""
    # different step counts per thread: the shared scheduler's timesteps differ between concurrent calls
    jobs = [(photo(name), seed, steps) for name, steps in (("chelsea", 2), ("coffee", 5)) for seed in (0, 1)]
    sequential = [swapper.replace(rgb, "a harbour", seed=seed, steps=steps).image for rgb, seed, steps in jobs]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(indices: list[int]) -> None:
        try:
            barrier.wait()
            for i in indices:
                rgb, seed, steps = jobs[i]
                results[i] = swapper.replace(rgb, "a harbour", seed=seed, steps=steps).image
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=([0, 1],)), threading.Thread(target=worker, args=([2, 3],))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i, expected in enumerate(sequential):
        diff = int(np.abs(results[i].astype(int) - expected.astype(int)).max())
        assert diff == 0, f"job {i}: threaded result differs from the sequential one by {diff}"


def test_threads_mixing_mask_and_replace(swapper: BackgroundReplacer) -> None:
    """mask() and replace() from two threads at once: each equals its sequential result (both hold the one lock)."""
    rgb_a, rgb_b = photo("astronaut"), photo("rocket")
    want_masks = [swapper.mask(rgb_a) for _ in range(3)]
    want_images = [swapper.replace(rgb_b, "a desert", seed=s, steps=3).image for s in range(3)]
    got: dict[str, list[np.ndarray]] = {"mask": [], "replace": []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(kind: str) -> None:
        try:
            barrier.wait()
            for s in range(3):
                got[kind].append(swapper.mask(rgb_a) if kind == "mask" else swapper.replace(rgb_b, "a desert", seed=s, steps=3).image)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("mask", "replace")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(3):
        np.testing.assert_array_equal(got["mask"][i], want_masks[i], err_msg=f"mask {i} differs when replace runs beside it")
        np.testing.assert_array_equal(got["replace"][i], want_images[i], err_msg=f"replace {i} differs when mask runs beside it")


def test_close_frees_every_session(exported_dir: Path) -> None:
    """close() (or leaving a with-block) drops every engine's session; a closed instance refuses work."""
    with BackgroundReplacer(exported_dir, provider="cpu") as swapper:
        engines = list(swapper.pipeline.engines.values())
        assert engines and all(e.session is not None for e in engines)  # loaded at load time
        swapper.replace(photo("coffee"), "a park", seed=1, steps=2)
    assert all(e.session is None for e in engines), [e.spec.name for e in engines if e.session is not None]
    with pytest.raises(UsageError, match="closed"):
        swapper.replace(photo("coffee"), "a park", seed=1, steps=2)


def test_models_folder_with_a_tilde(exported_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README writes BackgroundReplacer("~/bgswap-models"): ~ is the user's home."""
    monkeypatch.setenv("HOME", str(exported_dir.parent))
    swapper = BackgroundReplacer(f"~/{exported_dir.name}", provider="cpu")
    assert swapper.pipeline.config is not None
