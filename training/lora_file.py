"""Writing a trained UNet LoRA in diffusers' format, with what it was trained on in the file itself.

The file is what ``StableDiffusionLoraLoaderMixin.save_lora_weights`` writes (diffusers >= 0.34):
``pytorch_lora_weights.safetensors`` with PEFT keys ``unet.<module>.lora_A.weight`` /
``.lora_B.weight`` and PEFT's ``LoraConfig`` (rank, ``lora_alpha``, target modules) as JSON under
the safetensors metadata key ``lora_adapter_metadata``, so ``load_lora_weights(folder)`` rebuilds
the adapter with the trained alpha instead of assuming alpha = rank. diffusers writes it; this
module then adds one more metadata key, ``trt_bgswap_training`` (base model, dataset hash,
options, steps, versions), and renames the file into place (``trt_bgswap.atomic``), so a crash
never leaves a partial LoRA. diffusers' loader reads only its own key and ignores the rest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import atomic_path, make_staging_dir

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
TRAINING_KEY = "trt_bgswap_training"


def save_unet_lora(unet: Any, folder: Path, training: dict[str, Any], adapter: str = "default") -> Path:
    """Write ``unet``'s PEFT LoRA ``adapter`` to ``folder/pytorch_lora_weights.safetensors``; returns the file."""
    from diffusers import StableDiffusionInpaintPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    layers = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=adapter).items()}
    staging = make_staging_dir(folder, ".lora.")
    try:
        StableDiffusionInpaintPipeline.save_lora_weights(
            str(staging), unet_lora_layers=layers, unet_lora_adapter_metadata=unet.peft_config[adapter].to_dict(), safe_serialization=True
        )
        with safe_open(str(staging / LORA_FILE), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata[TRAINING_KEY] = json.dumps(training, sort_keys=True)
        target = folder / LORA_FILE
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_training_metadata(path: Path) -> dict[str, Any]:
    """The ``trt_bgswap_training`` record of a LoRA file (empty for LoRAs made elsewhere)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(TRAINING_KEY)
    return json.loads(raw) if raw else {}
