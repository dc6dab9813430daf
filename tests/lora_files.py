"""LoRA files for the tiny SD1.5-inpainting model in every layout diffusers loads, with random "trained" weights.

Each file is written the way its ecosystem writes it, by the libraries where they still can:

Every file starts from PEFT adapters (``inject_adapter_in_model``, rank 4 with rank-2 convs, then
``get_peft_model_state_dict``) on the UNet and the text encoder, given fresh random "trained" values:

- ``peft-metadata``: saved by diffusers' ``save_lora_weights`` with the adapters' ``LoraConfig`` as
  ``lora_adapter_metadata`` (lora_alpha != r), named as current diffusers + transformers 5 name them.
- ``peft``: the same without metadata (alpha = rank, as diffusers then assumes), with the text-encoder
  names of transformers 4's ``CLIPTextModel`` (``text_model.``), which every published LoRA carries.
- ``kohya``: diffusers' ``convert_state_dict_to_kohya`` (``lora_unet_*``, ``lora_te1_*``), with kohya-ss's
  alphas (network_alpha 2 for rank 4, conv_alpha 1 for rank 2) written over the converter's alpha = rank.
- ``diffusers-old``: diffusers' ``convert_state_dict_to_diffusers`` (as its training scripts call it before
  ``save_lora_weights``: ``to_q.lora.down``, ``q_proj.lora_linear_layer.down``), and for the layers that
  function leaves alone the ``<module>.lora.down.weight`` naming of diffusers 0.21-0.24's LoRA-compatible
  layers (``training_utils.unet_lora_state_dict``); the text encoder's attention only, as then.
- ``attn-procs``: diffusers <= 0.20's attention-processor layout, which no library writes any more:
  ``AttnProcsLayers.state_dict`` keys ``<block>.attn1.processor.to_q_lora.down.weight`` (``to_out_lora`` for
  ``to_out.0``) and ``text_encoder_lora_state_dict``'s ``text_model.encoder.layers.N.self_attn.q_proj.
  lora_linear_layer.down.weight``, packed under ``unet.``/``text_encoder.`` by ``save_lora_weights``
  (huggingface/diffusers ``src/diffusers/loaders.py`` at commit 00f391cf2ea7eb65b49934cdcc18da4868ffd66a);
  written here by renaming the ``diffusers-old`` keys of the attention layers (the only ones it covered).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
)  # fmt: skip
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
TE_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
FORMATS = ("kohya", "peft-metadata", "peft", "diffusers-old", "attn-procs")


def _models(sd_dir: Path) -> tuple[Any, Any]:
    """Fresh (random-weight) UNet and text encoder with the tiny model's architecture: only shapes matter here."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd_dir / "unet"))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(sd_dir / "text_encoder"))
    return unet, te


def _configs() -> tuple[Any, Any]:
    """LoraConfigs as diffusers' training scripts make them: UNet rank 4 (convs rank 2), alphas != ranks."""
    from peft import LoraConfig

    convs = [t for t in CONV_TARGETS if t in UNET_TARGETS]
    unet = LoraConfig(
        r=4, lora_alpha=6.0, target_modules=list(UNET_TARGETS), rank_pattern={t: 2 for t in convs},
        alpha_pattern={t: 3.0 for t in convs}, init_lora_weights="gaussian",
    )  # fmt: skip
    te = LoraConfig(r=4, lora_alpha=2.0, target_modules=list(TE_TARGETS), init_lora_weights="gaussian")
    return unet, te


class _Adapters:
    """One PEFT adapter on each model (injecting is the slow part), given fresh "trained" values per file."""

    def __init__(self, sd_dir: Path) -> None:
        from peft import inject_adapter_in_model

        self.unet, self.te = _models(sd_dir)
        self.unet_config, self.te_config = _configs()
        inject_adapter_in_model(self.unet_config, self.unet)
        inject_adapter_in_model(self.te_config, self.te)

    def states(self, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(UNet, text encoder) adapter state dicts as PEFT saves them, with random values from ``seed``."""
        from peft.tuners.lora import LoraLayer
        from peft.utils import get_peft_model_state_dict

        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for model in (self.unet, self.te):
                for module in model.modules():
                    if isinstance(module, LoraLayer):
                        for p in module.lora_A.parameters():
                            p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
                        for p in module.lora_B.parameters():
                            p.copy_(0.5 * torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
        return get_peft_model_state_dict(self.unet), get_peft_model_state_dict(self.te)


def _only(state: dict[str, torch.Tensor], targets: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The adapter as if trained on ``targets`` only (the keys PEFT would have saved then)."""
    return {k: v for k, v in state.items() if k.split(".lora_")[0].endswith(tuple(f".{t}" for t in targets))}


def _with_transformers4_names(te_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 flattened CLIPTextModel; LoRAs trained on transformers 4 name its layers ``text_model.*``."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in te_state.items()}


def _save(folder: Path, unet: dict[str, torch.Tensor], te: dict[str, torch.Tensor], **metadata: Any) -> Path:
    from diffusers import StableDiffusionInpaintPipeline

    StableDiffusionInpaintPipeline.save_lora_weights(folder, unet_lora_layers=unet, text_encoder_lora_layers=te, **metadata)
    return folder / LORA_FILE


def write_peft_metadata(adapters: _Adapters, folder: Path, seed: int) -> Path:
    unet, te = adapters.states(seed)
    return _save(
        folder, unet, te,
        unet_lora_adapter_metadata=adapters.unet_config.to_dict(), text_encoder_lora_adapter_metadata=adapters.te_config.to_dict(),
    )  # fmt: skip


def write_peft(adapters: _Adapters, folder: Path, seed: int) -> Path:
    unet, te = adapters.states(seed)
    return _save(folder, unet, _with_transformers4_names(te))


def write_kohya(adapters: _Adapters, folder: Path, seed: int) -> Path:
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    unet, te = adapters.states(seed)
    peft_state = {f"unet.{k}": v for k, v in unet.items()}
    peft_state.update({f"text_encoder.{k}": v for k, v in _with_transformers4_names(te).items()})
    state = convert_state_dict_to_kohya(peft_state)
    for key in [k for k in state if k.endswith(".alpha")]:
        rank = state[key.replace(".alpha", ".lora_down.weight")].shape[0]
        state[key] = torch.tensor(2.0 if rank == 4 else 1.0)  # kohya-ss network_dim 4 / alpha 2, conv_dim 2 / conv_alpha 1
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(folder / LORA_FILE))  # kohya's fp16
    return folder / LORA_FILE


def _old_unet_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``convert_state_dict_to_diffusers`` renames attention layers only; LoRA-compatible layers saved ``<module>.lora.down``."""
    from diffusers.utils import convert_state_dict_to_diffusers

    renamed = convert_state_dict_to_diffusers(state)
    return {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in renamed.items()}


def write_diffusers_old(adapters: _Adapters, folder: Path, seed: int) -> Path:
    from diffusers.utils import convert_state_dict_to_diffusers

    unet, te = adapters.states(seed)
    te_state = convert_state_dict_to_diffusers(_with_transformers4_names(_only(te, TE_ATTENTION)))
    return _save(folder, _old_unet_names(unet), te_state)


_ATTN_KEY = re.compile(r"\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)\.lora\.(down|up)\.weight$")


def write_attn_procs(adapters: _Adapters, folder: Path, seed: int) -> Path:
    from diffusers.utils import convert_state_dict_to_diffusers

    unet, te = adapters.states(seed)

    def processor_key(key: str) -> str:
        def repl(m: re.Match[str]) -> str:
            proj = "to_out" if m.group(2) == "to_out.0" else m.group(2)
            return f".{m.group(1)}.processor.{proj}_lora.{m.group(3)}.weight"

        new = _ATTN_KEY.sub(repl, key)
        assert new != key, f"not an attention LoRA key: {key}"
        return new

    unet_state = {processor_key(k): v for k, v in _old_unet_names(_only(unet, UNET_ATTENTION)).items()}
    te_state = convert_state_dict_to_diffusers(_with_transformers4_names(_only(te, TE_ATTENTION)))
    return _save(folder, unet_state, te_state)


WRITERS: dict[str, Callable[[_Adapters, Path, int], Path]] = {
    "kohya": write_kohya,
    "peft-metadata": write_peft_metadata,
    "peft": write_peft,
    "diffusers-old": write_diffusers_old,
    "attn-procs": write_attn_procs,
}


def write_loras(root: Path, sd_dir: Path, formats: tuple[str, ...] = FORMATS, seed: int = 0) -> dict[str, Path]:
    """Write ``root/<format>/pytorch_lora_weights.safetensors`` for each format (different weights each); returns the files."""
    adapters = _Adapters(Path(sd_dir))
    return {fmt: WRITERS[fmt](adapters, Path(root) / fmt, seed + 10 * i) for i, fmt in enumerate(formats)}
