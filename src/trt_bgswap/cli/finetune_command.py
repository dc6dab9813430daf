"""`trt-bgswap finetune`: train a background-completion LoRA for the inpainting model on a `dataset` folder.

Needs the export extra (torch, diffusers, peft), imported only when the command runs. The
training itself is :mod:`trt_bgswap.training.finetune`; the LoRA it writes is what
`trt-bgswap export --lora LORA_DIR` fuses (with the LCM-LoRA) into the fast graphs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trt_bgswap.cli.options import float_range, int_range
from trt_bgswap.errors import UsageError

log = logging.getLogger("trt_bgswap")

NAME = "finetune"
HELP = "train a background-completion LoRA on a `dataset` folder (needs the export extra)"


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"--lora-targets {text!r}: give module names, e.g. to_q,to_k,to_v,to_out.0")
    return names


def add_arguments(f: argparse.ArgumentParser) -> None:
    from trt_bgswap.registry import DEFAULTS

    f.add_argument("dataset", metavar="DATASET", help="a folder made by `trt-bgswap dataset`")
    f.add_argument("--inpaint", default=DEFAULTS["sd-inpainting"], help="the SD inpainting model: diffusers folder, hub id (org/name[@rev]) or registry name")
    f.add_argument("--out", required=True, help="folder for the LoRA (pytorch_lora_weights.safetensors), checkpoints/ and validation/")
    f.add_argument("--rank", type=int_range("--rank", 1, 1024), default=16, help="LoRA rank")
    f.add_argument("--alpha", type=float_range("--alpha", 1e-6, 1e6), help="LoRA alpha (scale alpha/rank; default: the rank)")
    f.add_argument("--learning-rate", type=float_range("--learning-rate", 1e-9, 1.0), default=1e-4)
    f.add_argument("--steps", type=int_range("--steps", 1, 10**7), default=1000, help="optimizer steps in all (a resumed run continues to this many)")
    f.add_argument("--batch-size", type=int_range("--batch-size", 1, 4096), default=1)
    f.add_argument("--gradient-accumulation", type=int_range("--gradient-accumulation", 1, 4096), default=1, help="micro-batches per optimizer step")
    f.add_argument("--resolution", type=int_range("--resolution", 8, 4096), help="square training crops (default: the model's native size, 512 for SD1.5)")
    f.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto", help="frozen weights and activations in fp16/bf16 on a GPU (auto: bf16 where supported); fp32 on the CPU")
    f.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass: less GPU memory, more compute")
    f.add_argument("--lora-targets", type=_targets, default=None, help="comma-separated UNet module names given LoRA layers (default to_q,to_k,to_v,to_out.0)")
    f.add_argument("--warmup-steps", type=int_range("--warmup-steps", 0, 10**7), default=0, help="linear learning-rate warm-up")
    f.add_argument("--checkpoint-every", type=int_range("--checkpoint-every", 0, 10**7), default=500, help="save a resumable checkpoint every N steps (0: never)")
    f.add_argument("--keep-checkpoints", type=int_range("--keep-checkpoints", 0, 10**6), default=3, help="checkpoints kept (oldest removed; 0: all)")
    f.add_argument("--resume", metavar="latest|DIR", help="continue from the newest checkpoint under --out, or from a checkpoint folder")
    f.add_argument("--validation-every", type=int_range("--validation-every", 0, 10**7), default=250, help="evaluation loss and validation images every N steps (and at the end)")
    f.add_argument("--validation-images", type=int_range("--validation-images", 0, 1024), default=4, help="validation photos inpainted each time")
    f.add_argument("--validation-steps", type=int_range("--validation-steps", 1, 1000), default=25, help="inference steps of the validation images (the model's own scheduler)")
    f.add_argument("--eval-examples", type=int_range("--eval-examples", 1, 100000), default=8, help="examples in the fixed-noise evaluation loss")
    f.add_argument("--seed", type=int_range("--seed", 0, 2**63 - 1), default=0)
    f.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    f.add_argument("--threads", type=int_range("--threads", 0, 256), default=0, help="CPU threads of torch (0: its default)")
    f.add_argument("--overwrite", action="store_true", help="train anew into an --out that holds an earlier LoRA or checkpoints")
    f.add_argument("--offline", action="store_true", help="use only the local hub cache (also HF_HUB_OFFLINE=1)")
    f.add_argument("--allow-pickle", action="store_true", help="accept pickled checkpoints (.bin/.ckpt) from a source you trust")
    f.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")


def run(args: argparse.Namespace) -> int:
    from trt_bgswap.training import checkpoint
    from trt_bgswap.training.data import read_dataset
    from trt_bgswap.training.finetune import DEFAULT_TARGETS, FinetuneOptions, finetune
    from trt_bgswap.training.lora_file import LORA_FILE

    options = FinetuneOptions(
        rank=args.rank, alpha=args.alpha, learning_rate=args.learning_rate, steps=args.steps, batch_size=args.batch_size,
        resolution=args.resolution, gradient_accumulation=args.gradient_accumulation, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        validation_every=args.validation_every, validation_images=args.validation_images, validation_inference_steps=args.validation_steps,
        eval_examples=args.eval_examples, seed=args.seed, targets=args.lora_targets or DEFAULT_TARGETS, warmup_steps=args.warmup_steps, device=args.device, threads=args.threads,
    )
    options.validate()
    dataset, out = Path(args.dataset), Path(args.out)
    read_dataset(dataset)  # a missing or empty dataset is one line now, before the model loads
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; give a folder for the LoRA")
    if args.resume is None and not args.overwrite and ((out / LORA_FILE).exists() or checkpoint.list_checkpoints(out)):
        raise UsageError(f"--out {out} holds an earlier training; --resume latest continues it, --overwrite trains anew there, or give another --out")
    try:
        from trt_bgswap.export.sources import resolve
    except ImportError as e:  # pragma: no cover - the export extra is missing
        raise UsageError(f"finetune needs the export extra ({e.name} is missing); pip install 'trt-bgswap[export]'") from None
    source = resolve(args.inpaint, "sd-inpainting", offline=args.offline, allow_pickle=args.allow_pickle)
    result = finetune(
        dataset, source.path, out, options, base_source={"given": args.inpaint, **source.as_dict()}, resume=args.resume,
        progress=args.progress or sys.stderr.isatty(), overwrite=args.overwrite,
    )
    log.info("LoRA: %s (use it: trt-bgswap export --lora %s ...)", result.lora, out)
    return 0
