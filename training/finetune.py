"""LoRA fine-tuning of a Stable Diffusion inpainting UNet for background completion.

The objective (:mod:`~trt_bgswap.training.objective`) is diffusers' inpainting training. Only LoRA
layers train (Hu et al. 2021), added with PEFT as ``examples/text_to_image/train_text_to_image_lora.py``
does (``unet.add_adapter(LoraConfig(r, lora_alpha, init_lora_weights="gaussian", target_modules))``,
LoRA weights kept in fp32 under mixed precision, AdamW with diffusers' defaults, gradient
clipping at 1). With the masks of ``trt-bgswap dataset`` the masked area is the photo's
background, so the LoRA learns to complete backgrounds of the user's domain around a given subject.

Two things differ from the scripts, on purpose: the loop is plain PyTorch instead of
``accelerate`` (one device; every random draw comes from a generator seeded with (seed, step),
so a run resumed from a checkpoint follows the uninterrupted run's loss trajectory exactly, which
``accelerate``'s dataloader-skipping resume does not promise), and a fixed-noise *evaluation
loss* (the same examples, timesteps and noise every time) is measured before training and at
every validation, because the training loss of diffusion models jumps with the random timestep
and hides progress.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trt_bgswap import __version__
from trt_bgswap.atomic import write_text_atomic
from trt_bgswap.errors import BackendUnavailable, UsageError
from trt_bgswap.training import checkpoint as ckpt
from trt_bgswap.training.data import Example, batch_indices, collate, counter_seed, dataset_hash, read_dataset
from trt_bgswap.training.dataset import describe_differences
from trt_bgswap.training.lora_file import LORA_FILE, save_unet_lora
from trt_bgswap.training.objective import EVAL_TIMESTEP_FRACTIONS, Models, Objective, load_models
from trt_bgswap.training.validation import write_validation_images

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'trt-bgswap[export]'"
TRAINING_FILE = "training.json"
VALIDATION_DIR = "validation"
PRECISIONS = ("auto", "no", "fp16", "bf16")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA scripts
# Fields that decide the loss trajectory: a resumed run must have the same ones.
TRAJECTORY_FIELDS = (
    "rank", "alpha", "learning_rate", "batch_size", "resolution", "gradient_accumulation", "seed", "targets", "warmup_steps", "max_grad_norm", "eval_examples",
)


@dataclass(frozen=True)
class FinetuneOptions:
    rank: int = 16
    alpha: float | None = None  # LoRA alpha; None: = rank (scale 1)
    learning_rate: float = 1e-4  # diffusers' LoRA scripts' default
    steps: int = 1000  # optimizer steps (each takes batch_size x gradient_accumulation examples)
    batch_size: int = 1
    resolution: int | None = None  # square training crops; None: the model's native size (512 for SD1.5)
    gradient_accumulation: int = 1
    mixed_precision: str = "auto"  # auto: bf16 on GPUs that have it, else fp16; fp32 on the CPU
    gradient_checkpointing: bool = False  # trade compute for activation memory
    checkpoint_every: int = 500  # 0: no checkpoints
    keep_checkpoints: int = 3
    validation_every: int = 250  # evaluation loss and validation images every N steps (and at the end); 0: only at the end
    validation_images: int = 4
    validation_inference_steps: int = 25
    eval_examples: int = 8  # examples of the fixed-noise evaluation loss
    seed: int = 0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    device: str = "auto"  # auto: cuda if available, else cpu
    threads: int = 0  # torch's intra-op CPU threads (0: its default); not part of the run's identity

    def validate(self) -> None:
        def positive(name: str, v: float) -> None:
            if not v > 0:
                raise UsageError(f"{name}={v}: give a positive value")

        for name in ("rank", "steps", "batch_size", "gradient_accumulation", "learning_rate", "eval_examples"):
            positive(name, getattr(self, name))
        if self.alpha is not None:
            positive("alpha", self.alpha)
        for name in ("checkpoint_every", "keep_checkpoints", "validation_every", "validation_images", "warmup_steps", "threads"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name}={getattr(self, name)}: give 0 or more")
        positive("validation_inference_steps", self.validation_inference_steps)
        positive("max_grad_norm", self.max_grad_norm)
        if self.mixed_precision not in PRECISIONS:
            raise UsageError(f"--mixed-precision {self.mixed_precision}: choose one of {', '.join(PRECISIONS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device {self.device}: choose auto, cpu or cuda")
        if not self.targets or any(not t.strip() for t in self.targets):
            raise UsageError(f"--lora-targets {','.join(self.targets)!r}: give module names such as to_q,to_k,to_v,to_out.0")
        if self.resolution is not None and self.resolution < 8:
            raise UsageError(f"--resolution {self.resolution}: too small")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


@dataclass
class FinetuneResult:
    lora: Path  # the LoRA file written
    steps: int
    losses: list[float]  # training loss of every optimizer step (mean over its accumulated micro-batches)
    eval_losses: dict[int, float]  # step -> fixed-noise evaluation loss
    eval_samples: dict[int, list[float]] = field(default_factory=dict)  # step -> the evaluation loss of each (example, timestep)


def _require_stack() -> None:
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"finetune needs torch, diffusers and peft ({e.name} is missing); {INSTALL_HINT}") from e


def pick_device(options: FinetuneOptions) -> tuple[Any, Any, str]:
    """(device, dtype of the frozen weights, resolved precision): mixed precision on CUDA only, fp32 on the CPU."""
    import torch

    cuda = torch.cuda.is_available()
    if options.device == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA device found (torch.cuda.is_available() is False); use --device cpu or auto")
    device = torch.device("cuda" if options.device == "cuda" or (options.device == "auto" and cuda) else "cpu")
    mp = options.mixed_precision
    if device.type != "cuda":
        if mp in ("fp16", "bf16"):
            raise UsageError(f"--mixed-precision {mp} needs a CUDA GPU; on the CPU training runs in fp32 (--mixed-precision no or auto)")
        return device, torch.float32, "no"
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mp == "bf16" and not torch.cuda.is_bf16_supported():
        raise UsageError("--mixed-precision bf16: this GPU has no bf16 (Ampere or newer needed); use fp16")
    return device, {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp], mp


class Trainer:
    """One fine-tuning run: the models with their LoRA, the optimizer, and the step function."""

    def __init__(self, models: Models, options: FinetuneOptions, resolution: int, device: Any, dtype: Any) -> None:
        import torch
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig

        self.m, self.options, self.resolution, self.device, self.dtype = models, options, resolution, device, dtype
        self.objective = Objective(models, resolution, device, dtype, options.seed, options.eval_examples)
        config = LoraConfig(
            r=options.rank, lora_alpha=options.alpha if options.alpha is not None else options.rank, init_lora_weights="gaussian", target_modules=list(options.targets)
        )
        torch.manual_seed(counter_seed(options.seed, "lora-init", 0))  # PEFT's gaussian init draws from the global generator
        try:
            models.unet.add_adapter(config)
        except ValueError as e:
            raise UsageError(f"--lora-targets {','.join(options.targets)}: {e}") from None
        self.params = [p for p in models.unet.parameters() if p.requires_grad]
        for p in self.params:  # LoRA weights train in fp32 under mixed precision (diffusers' cast_training_params)
            p.data = p.data.float()
        if options.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(self.params, lr=options.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = get_scheduler("constant_with_warmup", optimizer=self.optimizer, num_warmup_steps=options.warmup_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.params)

    def train_step(self, examples: list[Example], step: int) -> float:
        """One optimizer step over ``gradient_accumulation`` micro-batches; returns their mean loss."""
        import torch

        o = self.options
        self.m.unet.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for a in range(o.gradient_accumulation):
            micro = step * o.gradient_accumulation + a
            idx = batch_indices(len(examples), o.batch_size, micro, o.seed)
            rng = np.random.default_rng(counter_seed(o.seed, "crop", micro))
            batch = collate([examples[i] for i in idx], self.resolution, [tuple(rng.random(2)) for _ in idx])
            loss = self.objective.loss(batch, self.objective.generator("noise", micro))
            if not torch.isfinite(loss):
                raise UsageError(f"step {step + 1}: the loss is {loss.item()}; lower --learning-rate or use --mixed-precision bf16/no")
            self.scaler.scale(loss / o.gradient_accumulation).backward()
            total += float(loss.detach()) / o.gradient_accumulation
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, o.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        return total

    def lora_state(self) -> dict[str, Any]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(self.m.unet).items()}

    def load_lora_state(self, state: dict[str, Any]) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.m.unet, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise UsageError(f"the checkpoint's LoRA does not fit this model ({len(unexpected)} unknown keys, e.g. {unexpected[0]})")


def finetune(
    dataset: Path,
    base: Path,
    out: Path,
    options: FinetuneOptions,
    *,
    base_source: dict[str, Any] | None = None,
    resume: str | None = None,
    progress: bool = False,
    overwrite: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Train a LoRA on ``dataset`` (a `trt-bgswap dataset` folder) for the inpainting model in ``base``; write it to ``out``.

    ``base_source``: where ``base`` came from (hub id, commit), recorded in the LoRA's metadata.
    ``resume``: ``latest`` or a checkpoint folder; the run must have the same options, data and model.
    ``overwrite``: without ``resume``, an earlier training's checkpoints and validation images in ``out``
    are removed once the models have loaded (so a new run never resumes into an old one's steps).
    """
    options.validate()
    _require_stack()
    import torch

    threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        return _finetune(dataset, base, out, options, base_source, resume, progress, overwrite, on_step)
    finally:
        torch.set_num_threads(threads)


def _finetune(
    dataset: Path,
    base: Path,
    out: Path,
    options: FinetuneOptions,
    base_source: dict[str, Any] | None,
    resume: str | None,
    progress: bool,
    overwrite: bool,
    on_step: Callable[[int, float], None] | None,
) -> FinetuneResult:
    import torch
    from tqdm import tqdm

    from trt_bgswap.manifest import sha256_file

    train, validation = read_dataset(dataset)
    if not validation:
        log.info("%s has no validation split: the evaluation loss and validation images use training photos", dataset)
    held_out = validation or train
    device, dtype, precision = pick_device(options)
    models = load_models(base, device, dtype)
    resolution = options.resolution or models.default_size
    if resolution % models.size_multiple:
        raise UsageError(f"--resolution {resolution}: must be a multiple of {models.size_multiple} for this model (VAE factor x UNet downsampling)")
    unet_files = sorted((base / "unet").glob("*.safetensors")) or sorted((base / "unet").glob("*.bin"))
    identity = {
        "options": {k: options.to_json()[k] for k in TRAJECTORY_FIELDS} | {"resolution": resolution, "mixed_precision": precision},
        "dataset_sha256": dataset_hash(dataset),
        "base_unet_sha256": sha256_file(unet_files[0]) if unet_files else None,
    }
    trainer = Trainer(models, options, resolution, device, dtype)
    log.info(
        "training a rank-%d LoRA (%d parameters on %s) at %dx%d, %s, on %s: %d training / %d validation examples",
        options.rank, trainer.trainable_count(), ",".join(options.targets), resolution, resolution, "fp32" if precision == "no" else precision, device, len(train), len(validation),
    )
    step, losses, eval_losses, eval_samples = 0, [], {}, {}
    if resume is None and ((out / LORA_FILE).exists() or ckpt.list_checkpoints(out)):
        if not overwrite:
            raise UsageError(f"{out} holds an earlier training; resume it (--resume latest), train anew there (--overwrite), or give another --out")
        for old in (out / ckpt.CHECKPOINTS, out / VALIDATION_DIR):
            shutil.rmtree(old, ignore_errors=True)
    if resume is not None:
        folder = ckpt.find_checkpoint(out, resume)
        state = ckpt.load_checkpoint(folder)
        if state.get("identity") != identity:
            raise UsageError(
                f"{folder} was made by another run ({describe_differences(state.get('identity') or {}, identity)}); "
                "resume with the same dataset, model and options, or train anew into another --out"
            )
        trainer.load_lora_state(state["lora"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        step, losses = int(state["step"]), list(state["losses"])
        eval_losses = {int(k): float(v) for k, v in state["eval_losses"].items()}
        eval_samples = {int(k): list(v) for k, v in state.get("eval_samples", {}).items()}
        log.info("resumed from %s at step %d", folder, step)
    record = {
        "base_model": base_source or {"path": str(base)},
        **identity,
        "all_options": options.to_json(),
        "versions": _versions(),
    }

    def evaluate(at: int) -> None:
        samples = trainer.objective.evaluate(held_out)
        eval_samples[at] = samples
        eval_losses[at] = float(np.mean(samples))
        log.info("step %d: evaluation loss %.5f (%d examples x %d timesteps, fixed noise)", at, eval_losses[at], len(samples) // len(EVAL_TIMESTEP_FRACTIONS), len(EVAL_TIMESTEP_FRACTIONS))

    def validate(at: int) -> None:
        evaluate(at)
        if options.validation_images:
            folder = out / VALIDATION_DIR / ckpt.checkpoint_name(at)
            written = write_validation_images(trainer.objective, base, held_out, folder, options.validation_images, options.validation_inference_steps, options.seed)
            log.info("step %d: %d validation image(s) in %s", at, len(written), folder)

    def save_state(at: int) -> None:
        state = {
            "step": at, "identity": identity, "lora": trainer.lora_state(), "optimizer": trainer.optimizer.state_dict(),
            "lr_scheduler": trainer.lr_scheduler.state_dict(), "scaler": trainer.scaler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            "losses": losses, "eval_losses": eval_losses, "eval_samples": eval_samples,
        }
        meta = {**record, "steps": at}
        ckpt.save_checkpoint(out, at, state, lambda folder: save_unet_lora(models.unet, folder, meta), options.keep_checkpoints)

    out.mkdir(parents=True, exist_ok=True)
    if step == 0:
        evaluate(0)
    start = time.perf_counter()
    bar = tqdm(total=options.steps, initial=min(step, options.steps), disable=not progress, unit="step", dynamic_ncols=True)
    with bar:
        while step < options.steps:
            loss = trainer.train_step(train, step)
            step += 1
            losses.append(loss)
            bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step, loss)
            if step == options.steps or (options.validation_every and step % options.validation_every == 0):
                validate(step)
            if options.checkpoint_every and step % options.checkpoint_every == 0:
                save_state(step)
    seconds = time.perf_counter() - start
    if step not in eval_losses:
        validate(step)
    meta = {**record, "steps": step, "final_eval_loss": eval_losses[step], "initial_eval_loss": eval_losses.get(0)}
    lora = save_unet_lora(models.unet, out, meta)
    write_text_atomic(
        out / TRAINING_FILE,
        json.dumps({**meta, "losses": losses, "eval_losses": {str(k): v for k, v in sorted(eval_losses.items())}, "seconds_this_run": round(seconds, 2)}, indent=2, sort_keys=True) + "\n",
    )
    log.info("wrote %s (%d steps; evaluation loss %s -> %.5f)", lora, step, f"{eval_losses[0]:.5f}" if 0 in eval_losses else "?", eval_losses[step])
    return FinetuneResult(lora, step, losses, eval_losses, eval_samples)


def _versions() -> dict[str, str]:
    import diffusers
    import peft
    import torch

    return {"trt_bgswap": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__, "python": platform.python_version()}
