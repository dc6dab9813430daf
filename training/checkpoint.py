"""Training checkpoints: everything a resumed run needs to continue on the same loss trajectory.

A checkpoint is a folder ``checkpoints/step-000500/`` holding ``state.pt`` (the LoRA's fp32
weights, AdamW's moments, the learning-rate schedule, the fp16 loss scaler, torch's global CPU and
CUDA generator states, the loss history and the run's identity) and the LoRA so far as
``pytorch_lora_weights.safetensors`` (loadable by diffusers, for looking at intermediate results).
The folder is written under a temporary name and renamed into place, so a checkpoint that exists
is complete. ``state.pt`` is read with ``torch.load(weights_only=True)``: tensors, numbers,
strings and containers only, no code runs on loading.

The batches, crops and noise of every step come from generators seeded with (seed, step)
(:mod:`trt_bgswap.training.data`), so the step number is their whole state; the global
generators are saved for anything else drawing from them (LoRA dropout).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import make_staging_dir
from trt_bgswap.errors import UsageError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
_NAME = re.compile(r"step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints under ``out``, oldest first."""
    root = out / CHECKPOINTS
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _NAME.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def find_checkpoint(out: Path, resume: str) -> Path:
    """``latest`` (the newest under ``out``) or a checkpoint folder given by path."""
    if resume == "latest":
        found = list_checkpoints(out)
        if not found:
            raise UsageError(f"--resume latest: {out / CHECKPOINTS} holds no checkpoint; train without --resume (or give a checkpoint folder)")
        return found[-1][1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}); give 'latest' or a {out / CHECKPOINTS}/step-N folder")
    return path


def save_checkpoint(out: Path, step: int, state: dict[str, Any], write_lora: Any, keep: int) -> Path:
    """Write ``state`` (and the LoRA, through ``write_lora(folder)``) as checkpoint ``step``; keep the newest ``keep``."""
    import torch

    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    staging = make_staging_dir(root, f".{final.name}.")
    try:
        torch.save(state, staging / STATE_FILE)
        write_lora(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for _, old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s", final)
    return final


def load_checkpoint(folder: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state is the same problem for the user
        raise UsageError(f"{folder / STATE_FILE}: unreadable checkpoint ({type(e).__name__}: {e}); resume from another one") from None
