"""Tiny ONNX graphs with the I/O of the published BiRefNet and RMBG-2.0 files, in their repos' layouts.

What was matched (from the public model cards and the code that loads these files; no download here):

- ``onnx-community/BiRefNet-ONNX`` (the transformers.js conversion of ZhengPeng7/BiRefNet, MIT):
  ``onnx/model.onnx`` takes ``input_image`` float32 (batch, 3, 1024, 1024) and returns
  ``output_image`` float32 (batch, 1, 1024, 1024) *logits* (the model card applies ``.sigmoid()``);
  ``preprocessor_config.json`` with ImageNet mean/std, 1024x1024, rescale 1/255; ``config.json``
  with ``model_type`` birefnet.
- ``briaai/RMBG-2.0`` (BiRefNet architecture, CC BY-NC 4.0, gated): ``config.json`` declares
  ``architectures: ["BiRefNet"]`` (with ``auto_map`` to its remote code), no preprocessor config
  (the model card hard-codes 1024x1024 and ImageNet mean/std); ``onnx/model.onnx`` as re-exported
  by third parties takes ``pixel_values`` and returns ``alphas`` with the sigmoid inside.

Not verified (needs the gated files): the exact input/output names and symbolic dim names of
briaai's own ``onnx/model.onnx``, and whether its graph ends in a sigmoid. The runtime does not
depend on them: the main output is found by shape, and a final Sigmoid node is detected in the graph.
The nets are stand-ins (pool, conv, upsample), not BiRefNet: the tests are about the I/O and the
pre/post-processing around the net.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE = 1024
POOL = 16  # the stand-in net works at 64x64 and upsamples back: cheap at 1024x1024
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def conv_weights(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((1, 3, 3, 3)) * 0.5).astype(np.float32)


def stand_in_graph(path: Path, input_name: str, output_name: str, sigmoid: bool, seed: int) -> Path:
    """AveragePool /16 -> Conv 3->1 (3x3) -> linear Resize x16 [-> Sigmoid], batch dim symbolic."""
    w = conv_weights(seed)
    nodes = [
        helper.make_node("AveragePool", [input_name], ["pooled"], kernel_shape=[POOL, POOL], strides=[POOL, POOL]),
        helper.make_node("Conv", ["pooled", "w", "b"], ["logits_small"], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["logits_small", "", "scales"], ["logits" if sigmoid else output_name], mode="linear"),
    ]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["logits"], [output_name]))
    graph = helper.make_graph(
        nodes,
        "stand_in",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch_size", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch_size", 1, SIZE, SIZE])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0.1], np.float32), "b"),
         numpy_helper.from_array(np.array([1, 1, POOL, POOL], np.float32), "scales")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def write_birefnet(folder: Path, seed: int = 0) -> Path:
    """onnx-community/BiRefNet-ONNX's layout: config.json, preprocessor_config.json, onnx/model.onnx (logits out)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "birefnet"}), encoding="utf-8")
    pre = {"do_normalize": True, "do_rescale": True, "do_resize": True, "rescale_factor": 1 / 255, "resample": 2,
           "size": {"height": SIZE, "width": SIZE}, "feature_extractor_type": "ImageFeatureExtractor", **IMAGENET}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre), encoding="utf-8")
    stand_in_graph(folder / "onnx" / "model.onnx", "input_image", "output_image", sigmoid=False, seed=seed)
    return folder


def write_rmbg2(folder: Path, seed: int = 1) -> Path:
    """briaai/RMBG-2.0's layout: config.json (BiRefNet architecture), onnx/model.onnx (sigmoid inside), no preprocessor config."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_name_or_path": "briaai/RMBG-2.0", "architectures": ["BiRefNet"], "bb_pretrained": False,
              "auto_map": {"AutoConfig": "BiRefNet_config.BiRefNetConfig", "AutoModelForImageSegmentation": "birefnet.BiRefNet"}}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    stand_in_graph(folder / "onnx" / "model.onnx", "pixel_values", "alphas", sigmoid=True, seed=seed)
    return folder
