"""A tiny RMBG-1.4-layout model folder with seeded random weights, for offline tests.

Mirrors the files of the briaai/RMBG-1.4 hub repo that trt-bgswap reads:

- ``config.json``: BRIA's config (``in_ch``/``out_ch`` plus their ``auto_map``) and our
  ``channel_divisor`` (absent in the real file, where it means full width);
- ``model.safetensors``: the state dict of :class:`~trt_bgswap.export.isnet.BriaRMBG`, same keys
  as the real checkpoint (BatchNorm running statistics included and non-trivial);
- ``preprocessor_config.json``: as RMBG-1.4 ships it (resize to ``size``, rescale 1/255,
  normalise with mean 0.5 and std 1), with this model's input size;
- ``onnx/model.onnx``, ``onnx/model_fp16.onnx``, ``onnx/model_quantized.onnx``: like the
  published transformers.js-style exports: input ``input`` (``batch_size x 3 x height x width``),
  output ``output`` = ``sigmoid(d1)`` followed by the eleven other tensors ``forward`` returns
  (five side masks, six feature maps) under the tracer's numeric names. What the published
  files do (``model({ input })`` then ``output``) is documented by transformers.js usage; that
  their spatial dims are dynamic and the side outputs are kept is our best reading, not
  verified against the files (no hub access here). ``model_fp16`` is ONNX Runtime's fp16
  conversion with fp32 I/O; ``model_quantized`` is ONNX Runtime's dynamic uint8 quantization.

Same seed, same files (byte for byte).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

TINY_INPUT_SIZE = 256
TINY_CHANNEL_DIVISOR = 8  # 64 -> 8 channels in the stem; ~0.7 M parameters
ONNX_OPSET = 17
ONNX_FILES = ("model.onnx", "model_fp16.onnx", "model_quantized.onnx")

# briaai/RMBG-1.4 config.json (its custom-code pointers kept so the folder looks like the real one).
RMBG14_CONFIG: dict[str, Any] = {
    "_name_or_path": "briaai/RMBG-1.4",
    "architectures": ["BriaRMBG"],
    "auto_map": {
        "AutoConfig": "MyConfig.RMBGConfig",
        "AutoModelForImageSegmentation": "briarmbg.BriaRMBG",
    },
    "in_ch": 3,
    "model_type": "SegformerForSemanticSegmentation",
    "out_ch": 1,
    "torch_dtype": "float32",
}


def rmbg_preprocessor_config(input_size: int) -> dict[str, Any]:
    """RMBG-1.4's preprocessor_config.json with the given square size."""
    return {
        "do_normalize": True,
        "do_pad": False,
        "do_rescale": True,
        "do_resize": True,
        "feature_extractor_type": "ImageFeatureExtractor",
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [1, 1, 1],
        "resample": 2,
        "rescale_factor": 0.00392156862745098,
        "size": {"width": input_size, "height": input_size},
    }


def random_isnet(seed: int = 0, channel_divisor: int = TINY_CHANNEL_DIVISOR) -> Any:
    """A :class:`BriaRMBG` in eval mode with seeded weights that keep activations in range.

    He-scaled convs, BatchNorm affine terms near identity and running statistics that are
    not the 0/1 defaults, so a bug that skips or misreads them changes the output.
    """
    import torch

    from trt_bgswap.export.isnet import BriaRMBG

    gen = torch.Generator().manual_seed(seed)
    model = BriaRMBG(channel_divisor=channel_divisor)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(1000 + seed)
            elif name.endswith("bn_s1.weight"):
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.75)
            elif name.endswith("bn_s1.bias") or name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) * 1.0 + 0.5)
            elif name.endswith(".weight"):  # conv kernels
                fan_in = math.prod(t.shape[1:])
                t.copy_(torch.randn(t.shape, generator=gen) * math.sqrt(2.0 / fan_in))
            elif name.endswith(".bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.05)
            else:  # pragma: no cover - the state dict has no other kinds
                raise AssertionError(f"unexpected tensor {name}")
    return model.eval()


def _export_published_style(model: Any, path: Path, input_size: int) -> None:
    """torch.onnx.export of the whole forward, named as the published file is."""
    import torch

    sample = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={
                "input": {0: "batch_size", 2: "height", 3: "width"},
                "output": {0: "batch_size", 2: "height", 3: "width"},
            },
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def write_rmbg_weights(model: Any, folder: str | Path, input_size: int, dtype: Any = None) -> Path:
    """Write ``model`` (a :class:`BriaRMBG`) as RMBG-1.4's weights folder: config.json,
    preprocessor_config.json and model.safetensors (in ``dtype``, default the model's own).

    ``channel_divisor`` goes into config.json so that ``export --rmbg`` rebuilds the same width.
    """
    from safetensors.torch import save_file

    from trt_bgswap.export.isnet import CONFIG_DIVISOR_KEY

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    config = {**RMBG14_CONFIG, CONFIG_DIVISOR_KEY: model.channel_divisor}
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_text_atomic(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_text_atomic(
        folder / "preprocessor_config.json",
        json.dumps(rmbg_preprocessor_config(input_size), indent=2, sort_keys=True) + "\n",
    )
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return folder


def write_tiny_rmbg(
    folder: str | Path,
    seed: int = 0,
    input_size: int = TINY_INPUT_SIZE,
    channel_divisor: int = TINY_CHANNEL_DIVISOR,
) -> Path:
    """Write a tiny RMBG-1.4-style folder (weights, configs, three ONNX files) and return it."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from trt_bgswap.export.fp16 import convert_to_fp16

    folder = Path(folder)
    model = random_isnet(seed, channel_divisor)
    write_rmbg_weights(model, folder, input_size)

    onnx_dir = folder / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".onnx.", dir=folder))
    try:
        fp32 = stage / "model.onnx"
        _export_published_style(model, fp32, input_size)
        fp16 = convert_to_fp16(fp32)
        onnx.save_model(fp16, str(stage / "model_fp16.onnx"))
        quantize_dynamic(str(fp32), str(stage / "model_quantized.onnx"), weight_type=QuantType.QUInt8)
        for name in ONNX_FILES:  # the stage is inside ``folder``: each rename is atomic
            os.replace(stage / name, onnx_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("wrote tiny RMBG model (seed %d, %dx%d, channels / %d) to %s", seed, input_size, input_size, channel_divisor, folder)
    return folder
