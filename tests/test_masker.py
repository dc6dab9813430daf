"""runtime/masker.py against RMBG-1.4's reference pre/post-processing (torch) + ONNX Runtime run directly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from tolerance import EIGHT_BIT_STEP, NOISE_SAMPLES, assert_within, network_tolerance, noisy_engine

from trt_bgswap.errors import InputImageError, ModelError
from trt_bgswap.export.rmbg import export_rmbg
from trt_bgswap.export.tiny_rmbg import TINY_INPUT_SIZE
from trt_bgswap.manifest import Manifest
from trt_bgswap.registry import get_variant
from trt_bgswap.runtime.masker import Masker, find_main_output

PHOTOS = ("astronaut", "chelsea", "coffee")  # 512x512, 300x451, 400x600
# The alpha becomes an 8-bit mask: parity with BRIA's reference processing is asked to one 8-bit
# step. The two sides resample with different bilinear implementations (numpy vs PyTorch), so
# the bound is the product's quantum, not a rounding bound. A slip is far beyond it
# (test_tolerance_sees_imagenet_normalisation); rounding is far below it (~1e-7 here).
TOL = EIGHT_BIT_STEP


@pytest.fixture(scope="module")
def tiny(tiny_rmbg_dir: Path) -> Path:
    """write_tiny_rmbg(seed=0): the session's folder (tests/conftest.py; read-only)."""
    return tiny_rmbg_dir


@pytest.fixture(scope="module")
def exported(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export folder holding only the RMBG model (from the tiny safetensors) and its manifest."""
    folder = tmp_path_factory.mktemp("rmbg-export") / "export"
    entry, cfg = export_rmbg(tiny, folder, precision="fp32")
    Manifest(precision="fp32", opset=17, models={"rmbg": entry}, inpaint=None, rmbg=cfg).save(folder)
    return folder


def reference_alpha(onnx_path: Path, rgb: np.ndarray, size: tuple[int, int], mean: list[float], std: list[float]) -> np.ndarray:
    """BRIA's preprocess_image / postprocess_image (RMBG-1.4 model card), with ONNX Runtime as the net."""
    im_tensor = torch.tensor(rgb, dtype=torch.float32).permute(2, 0, 1)
    im_tensor = F.interpolate(torch.unsqueeze(im_tensor, 0), size=size, mode="bilinear")
    image = torch.divide(im_tensor, 255.0)
    image = (image - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)  # torchvision normalize
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    result = torch.from_numpy(sess.run(["output"], {"input": image.numpy()})[0])
    result = torch.squeeze(F.interpolate(result, size=rgb.shape[:2], mode="bilinear"), 0)
    ma, mi = torch.max(result), torch.min(result)
    result = (result - mi) / (ma - mi)
    return result[0].numpy()


def _masker(kind: str, tiny: Path, exported: Path) -> tuple[Masker, Path]:
    if kind == "export":
        return Masker.from_export(exported, Manifest.load(exported), provider="cpu"), exported / "rmbg" / "model.onnx"
    path = tiny / "onnx" / "model.onnx"  # published-style: dynamic size, side outputs, config one folder up
    return Masker.from_onnx(path, provider="cpu"), path


@pytest.mark.parametrize("kind", ["export", "published_onnx"])
@pytest.mark.parametrize("name", PHOTOS)
def test_predict_matches_reference(tiny: Path, exported: Path, kind: str, name: str) -> None:
    masker, path = _masker(kind, tiny, exported)
    rgb = getattr(data, name)()
    alpha = masker.predict(rgb)
    want = reference_alpha(path, rgb, (TINY_INPUT_SIZE, TINY_INPUT_SIZE), [0.5] * 3, [1.0] * 3)
    assert alpha.shape == rgb.shape[:2] and alpha.dtype == np.float32
    assert float(alpha.min()) == 0.0 and float(alpha.max()) == 1.0
    err = float(np.abs(alpha - want).max())
    assert_within(err, TOL, f"{name} via {kind}: masker vs reference pre/post-processing")


def test_tolerance_sees_imagenet_normalisation(tiny: Path) -> None:
    """The classic slip (ImageNet's mean/std instead of RMBG's 0.5/1.0) moves the alpha by far more than TOL."""
    masker, path = _masker("published_onnx", tiny, tiny)
    rgb = data.coffee()
    slipped = reference_alpha(path, rgb, (TINY_INPUT_SIZE, TINY_INPUT_SIZE), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    err = float(np.abs(masker.predict(rgb) - slipped).max())
    assert err > 10 * TOL, f"ImageNet normalisation moved the alpha by only {err:.3g}"


def test_from_onnx_reads_graph_and_preprocessor(tiny: Path) -> None:
    masker = Masker.from_onnx(tiny / "onnx" / "model.onnx", provider="cpu")
    assert (masker.cfg.input_name, masker.cfg.output_name) == ("input", "output")
    assert masker.cfg.input_size == (TINY_INPUT_SIZE, TINY_INPUT_SIZE)  # from ../preprocessor_config.json
    assert masker.engine.spec.output_names == ["output"]  # the side outputs are never fetched


def test_from_onnx_without_config_uses_registry_default(tiny: Path, tmp_path: Path) -> None:
    lonely = tmp_path / "alone" / "rmbg.onnx"
    lonely.parent.mkdir()
    shutil.copy(tiny / "onnx" / "model.onnx", lonely)
    masker = Masker.from_onnx(lonely, provider="cpu")
    assert masker.cfg.input_size == get_variant("rmbg-1.4").input_size


def test_static_graph_size_wins_over_config(exported: Path, tmp_path: Path) -> None:
    """The exported graph fixes 256; a config beside it asking for 1024 is overruled (with a warning)."""
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(exported / "rmbg" / "model.onnx", folder / "model.onnx")
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": 1024, "width": 1024}, "image_mean": [0.5] * 3, "image_std": [1] * 3, "rescale_factor": 1 / 255})
    )
    masker = Masker.from_onnx(folder / "model.onnx", provider="cpu")
    assert masker.cfg.input_size == (TINY_INPUT_SIZE, TINY_INPUT_SIZE)


def test_batch_equals_single_images(exported: Path, tmp_path: Path) -> None:
    masker = Masker.from_export(exported, Manifest.load(exported), provider="cpu")
    images = [getattr(data, n)() for n in PHOTOS]
    batch = masker.predict_batch(images)
    # a batch may be blocked differently by the kernels: the alpha's rounding noise (net, resize back,
    # min-max rescaling), measured with the net's graph carrying noise at every node
    entry = Manifest.load(exported).models["rmbg"]
    noisy = Masker(noisy_engine(entry.spec, exported / entry.file, tmp_path / "noisy.onnx"), masker.cfg)
    for name, im, a in zip(PHOTOS, images, batch):
        single = masker.predict(im)
        tol = lambda: network_tolerance(single, [noisy.predict(im) for _ in range(NOISE_SAMPLES)])  # noqa: B023, E731 - called at once
        assert_within(float(np.abs(a - single).max()), tol, f"{name}: batched vs single alpha")
    assert masker.predict_batch([]) == []


def test_constant_prediction_is_guarded(exported: Path) -> None:
    masker = Masker.from_export(exported, Manifest.load(exported), provider="cpu")
    out = masker.postprocess(np.full((TINY_INPUT_SIZE, TINY_INPUT_SIZE), 0.25, np.float32), 30, 40)
    assert out.shape == (30, 40) and np.all(out == np.float32(0.25)), "a constant mask must stay its value, not NaN"


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((20, 20), np.uint8),
        np.zeros((20, 20, 4), np.uint8),
        np.zeros((20, 20, 3), np.float32),
        np.zeros((0, 20, 3), np.uint8),
    ],
    ids=["gray", "rgba", "float", "empty"],
)
def test_bad_images_raise(exported: Path, bad: np.ndarray) -> None:
    masker = Masker.from_export(exported, Manifest.load(exported), provider="cpu")
    with pytest.raises(InputImageError):
        masker.predict(bad)


def test_missing_or_corrupt_onnx(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such ONNX file"):
        Masker.from_onnx(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    with pytest.raises(ModelError, match="junk.onnx"):
        Masker.from_onnx(junk)


def test_export_without_rmbg(tmp_path: Path) -> None:
    manifest = Manifest(precision="fp32", opset=17, models={}, inpaint=None, rmbg=None)
    with pytest.raises(ModelError, match="no RMBG model"):
        Masker.from_export(tmp_path, manifest)


# --- the main-output rule, on the shapes real exporters write ---

B, FEATS = "batch_size", [("input.1232", ["d0", 8, "batch_size", "x"]), ("src", ["d1", 64, "batch_size", "x"])]


@pytest.mark.parametrize(
    ("input_shape", "outputs", "expected"),
    [
        # published style: 'output' first, numeric side masks, feature maps with static channels
        ([B, 3, "h", "w"], [("output", [B, "c", "h", "w"]), ("1982", [B, "c", "h", "w"]), *FEATS], "output"),
        # 'output' wins wherever it sits
        ([1, 3, 1024, 1024], [("1982", [1, 1, 1024, 1024]), ("output", [1, 1, 1024, 1024])], "output"),
        # no 'output': the first mask in graph order is sigmoid(d1)
        ([1, 3, 1024, 1024], [*FEATS, ("d1", [1, 1, 1024, 1024]), ("d2", [1, 1, 1024, 1024])], "d1"),
        # a (B,1,S',S') at another static size is not the mask
        ([1, 3, 64, 64], [("small", [1, 1, 32, 32]), ("mask", [1, 1, 64, 64])], "mask"),
    ],
)
def test_main_output_rule(input_shape: list, outputs: list, expected: str) -> None:
    assert find_main_output(input_shape, outputs) == expected


def test_main_output_rule_rejects_non_masks() -> None:
    with pytest.raises(ModelError, match="not an RMBG"):
        find_main_output([1, 3, 64, 64], [("logits", [1, 1000]), ("feat", [1, 64, 32, 32])])
