"""Fuse an LCM-LoRA into the UNet's weights before export, so the exported graph has no LoRA branch.

LoRA (Hu et al. 2021, arXiv:2106.09685) adds ``scale * (alpha / rank) * up @ down`` to a
layer's weight; LCM-LoRA (Luo et al. 2023, arXiv:2311.05556) is such an update for every
attention, feed-forward and ResNet layer of the SD1.5 UNet. The released file
(``latent-consistency/lcm-lora-sdv1-5``) uses kohya-style keys over diffusers' module names
(``lora_unet_<module path with dots as underscores>.{lora_down.weight,lora_up.weight,alpha}``);
for a Conv2d, ``lora_down`` is a ``k x k`` conv to the rank and ``lora_up`` a ``1 x 1`` conv back,
so their product is a full ``k x k`` kernel. The merge is done here directly (no PEFT layers
to unload afterwards); the tests check it against diffusers' ``load_lora_weights`` with the
LoRA active and unfused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_bgswap.errors import ModelError

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_UNET_PREFIX = "lora_unet_"
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


@dataclass(frozen=True)
class FusedLora:
    """What a fusion did: which file, how many modules changed, at what scale."""

    path: Path
    modules: int
    scale: float


def lora_file(src: str | Path) -> Path:
    """The LoRA safetensors file of a folder (diffusers' weight name) or a file path."""
    src = Path(src)
    path = src / LORA_FILE if src.is_dir() else src
    if not path.is_file():
        raise ModelError(
            f"{src}: no LoRA weights found (expected {LORA_FILE}); download latent-consistency/lcm-lora-sdv1-5 "
            "or pass the .safetensors file itself"
        )
    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: LoRA weights must be a .safetensors file (pickled .bin files are not loaded)")
    return path


def _group_kohya(state: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    """Group the file's tensors by LoRA module name: {kohya name: {"down", "up", "alpha"}}."""
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(KOHYA_UNET_PREFIX):
            raise ModelError(
                f"{path}: key {key!r} is not a kohya-style UNet LoRA key (lora_unet_*.lora_down.weight/lora_up.weight/alpha) "
                "as in latent-consistency/lcm-lora-sdv1-5; convert the LoRA to that format"
            )
        groups.setdefault(key[: -len(suffix)], {})[suffix.split(".")[1]] = tensor
    for name, parts in groups.items():
        missing = [p for p in ("lora_down", "lora_up") if p not in parts]
        if missing:
            raise ModelError(f"{path}: LoRA module {name!r} lacks {missing}; the file is incomplete, download it again")
    return groups


def lora_delta(down: Any, up: Any, alpha: float | None, weight_shape: tuple[int, ...]) -> Any:
    """The weight update ``(alpha / rank) * up @ down`` reshaped to the layer's weight (Linear or Conv2d)."""
    rank = down.shape[0]
    factor = (alpha if alpha is not None else rank) / rank  # kohya: no alpha means alpha = rank
    delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    return (factor * delta).reshape(weight_shape)


def fuse_lora(unet: Any, src: str | Path, scale: float = 1.0) -> FusedLora:
    """Add an LCM-LoRA's update to ``unet``'s weights in place (fp32 math), at ``scale``.

    Every module in the file must exist in the UNet with matching shapes: a LoRA made for
    another architecture (e.g. SDXL) is an error, not a silent partial merge.
    """
    import torch
    from safetensors.torch import load_file

    path = lora_file(src)
    groups = _group_kohya(load_file(str(path)), path)
    by_kohya = {KOHYA_UNET_PREFIX + name.replace(".", "_"): name for name, _ in unet.named_modules() if name}
    with torch.no_grad():
        for kname, parts in groups.items():
            if kname not in by_kohya:
                raise ModelError(
                    f"{path}: LoRA module {kname!r} has no counterpart in this UNet; the LoRA was made for another "
                    "architecture (use latent-consistency/lcm-lora-sdv1-5 with SD1.5 models)"
                )
            module = unet.get_submodule(by_kohya[kname])
            weight = module.weight
            down = parts["lora_down"].to(torch.float32)
            up = parts["lora_up"].to(torch.float32)
            alpha = float(parts["alpha"]) if "alpha" in parts else None
            rows, cols = weight.shape[0], weight[0].numel()
            if up.shape[0] != rows or down[0].numel() != cols or up[0].numel() != down.shape[0]:
                raise ModelError(
                    f"{path}: LoRA module {kname!r} has shapes down {tuple(down.shape)} / up {tuple(up.shape)} that do not fit "
                    f"the UNet weight {tuple(weight.shape)}; the LoRA was made for another model"
                )
            delta = lora_delta(down, up, alpha, tuple(weight.shape))
            weight.copy_((weight.to(torch.float32) + scale * delta).to(weight.dtype))
    log.info("fused %d LoRA modules from %s at scale %g", len(groups), path, scale)
    return FusedLora(path=path, modules=len(groups), scale=scale)
