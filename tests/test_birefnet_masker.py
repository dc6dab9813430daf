"""BiRefNet and RMBG-2.0 maskers (issue 12): chosen from the graph and the repo's configs, each with its own pre/post-processing.

The published files cannot be downloaded here; :mod:`published_maskers` writes tiny graphs with
their I/O in their repos' layouts (and says what could not be verified). The reference is the
model cards' processing (``resize to 1024x1024, /255, ImageNet mean/std -> net -> [-1].sigmoid()
-> resize to the photo``) in PyTorch float arithmetic (``F.interpolate`` bilinear, as RMBG-1.4's
reference; the cards resize with PIL in uint8, a quantisation of at most 1/255 that neither side
needs), around the same graph run by ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from published_maskers import IMAGENET, SIZE, write_birefnet, write_rmbg2
from tolerance import TRANSCENDENTAL_ULPS, U32, assert_within, bilinear_bound, graph_tolerances, rounding_bound
from trt_bgswap.manifest import Manifest
from trt_bgswap.runtime.masker import Masker

PHOTOS = ("chelsea", "astronaut", "coffee")  # 300x451, 512x512, 400x600: up- and down-scaled to 1024


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("maskers")
    return {"birefnet": write_birefnet(root / "BiRefNet-ONNX"), "rmbg-2.0": write_rmbg2(root / "RMBG-2.0")}


def reference(path: Path, rgb: np.ndarray, logits: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model card's processing in float: (normalised input, net output, alpha at the photo's size)."""
    mean = torch.tensor(IMAGENET["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET["image_std"]).view(1, 3, 1, 1)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    x = (F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False) / 255.0 - mean) / std
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    pred = out.sigmoid() if logits else out
    alpha = F.interpolate(pred, size=rgb.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    return x.numpy(), out.numpy(), alpha.numpy()


def bound(path: Path, rgb: np.ndarray, x: np.ndarray, out: np.ndarray, logits: bool) -> float:
    """How far two float32 implementations of the same processing may be apart, from the arithmetic.

    - input: the two bilinear resizes (:func:`tolerance.bilinear_bound`, in pixel units, /255 and
      /std scale it) plus /255, -mean, /std (3 roundings of the normalised value);
    - the net carries an input error with gain at most sum|w| of its conv (average pooling and a
      linear upsample are convex); its own rounding: :func:`tolerance.graph_tolerances`;
    - sigmoid has gain 1/4 and is within a few ulp (numpy's exp/add/reciprocal vs PyTorch's sigmoid);
      a sigmoid inside the graph is the same node on both sides (gain 1 for the clip);
    - the resize back: gain 1 plus its own :func:`tolerance.bilinear_bound`.
    """
    std = min(IMAGENET["image_std"])
    chw = rgb.transpose(2, 0, 1).astype(np.float32)
    e_in = bilinear_bound(chw, rgb.shape[:2]) / 255.0 / std + rounding_bound(float(np.abs(x).max()), 3)
    w = next(np for np in [onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer] if np.ndim == 4)
    name = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    e_net = float(np.abs(w).sum()) * e_in + max(graph_tolerances(path, {name: x}).values())
    pred = 1 / (1 + np.exp(-out)) if logits else out
    e_act = (0.25 * e_net + (TRANSCENDENTAL_ULPS + 3) * U32) if logits else e_net
    return e_act + bilinear_bound(pred[0, 0], (SIZE, SIZE))


@pytest.mark.parametrize(("repo", "masker", "want", "post"), [
    ("birefnet", None, "birefnet", "sigmoid"),  # config.json model_type birefnet; logits out
    ("rmbg-2.0", None, "birefnet", "clip"),  # BiRefNet architecture; the graph's own Sigmoid is found
    ("rmbg-2.0", "rmbg-2.0", "rmbg-2.0", "clip"),  # --masker names BRIA's licence, which the files cannot tell
])
def test_masker_chosen_from_config_and_graph(repos: dict[str, Path], tmp_path: Path, repo: str, masker: str | None, want: str, post: str) -> None:
    from trt_bgswap.export.exporter import export_models

    out = tmp_path / "export"
    export_models(None, None, repos[repo], out, masker=masker)
    cfg = Manifest.load(out).rmbg
    assert cfg is not None and (cfg.masker, cfg.postprocess) == (want, post)
    assert (cfg.mean, cfg.std, cfg.input_size) == (tuple(IMAGENET["image_mean"]), tuple(IMAGENET["image_std"]), (SIZE, SIZE))


@pytest.mark.numerics
@pytest.mark.parametrize("photo", PHOTOS)
@pytest.mark.parametrize("repo", ["birefnet", "rmbg-2.0"])
def test_masker_matches_the_model_card_processing(repos: dict[str, Path], repo: str, photo: str) -> None:
    rgb = getattr(data, photo)()
    path = repos[repo] / "onnx" / "model.onnx"
    logits = repo == "birefnet"
    x, out, expected = reference(path, rgb, logits)
    masker = Masker.from_onnx(path, provider="cpu")
    ours = masker.predict(rgb)
    assert ours.shape == expected.shape == rgb.shape[:2]
    err = float(np.abs(ours - expected).max())
    assert_within(err, lambda: bound(path, rgb, x, out, logits), f"{repo} on {photo}: alpha vs the model card's processing")
    assert 0.0 <= float(ours.min()) and float(ours.max()) <= 1.0 and float(ours.std()) > 1e-3


def test_wrong_processing_is_far_from_the_reference(repos: dict[str, Path]) -> None:
    """RMBG-1.4's processing (mean 0.5, std 1, min-max) on a BiRefNet graph lands far from its reference: the choice matters."""
    from dataclasses import replace

    rgb = data.chelsea()
    path = repos["birefnet"] / "onnx" / "model.onnx"
    _, _, expected = reference(path, rgb, logits=True)
    masker = Masker.from_onnx(path, provider="cpu")
    wrong = Masker(masker.engine, replace(masker.cfg, mean=(0.5,) * 3, std=(1.0,) * 3, postprocess="minmax"))
    assert float(np.abs(wrong.predict(rgb) - expected).max()) > 0.05


def test_mask_command_names_rmbg2(repos: dict[str, Path], tmp_path: Path) -> None:
    """`trt-bgswap mask --rmbg RMBG-2.0/onnx/model.onnx --masker rmbg-2.0`: BRIA's processing and a mask per photo."""
    from PIL import Image

    from trt_bgswap.cli.main import main

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(data.chelsea()).save(photos / "cat.png")
    code = main(["-q", "mask", str(photos), "--rmbg", str(repos["rmbg-2.0"] / "onnx" / "model.onnx"), "--masker", "rmbg-2.0", "-o", str(tmp_path / "masks"), "--provider", "cpu"])
    assert code == 0
    mask = np.asarray(Image.open(tmp_path / "masks" / "cat.png"))
    _, _, expected = reference(repos["rmbg-2.0"] / "onnx" / "model.onnx", data.chelsea(), logits=False)
    assert mask.shape == expected.shape and int(np.abs(mask.astype(int) - np.round(expected * 255).astype(int)).max()) <= 1  # uint8 rounding
