"""The PyTorch baseline a user would otherwise run: diffusers inpainting + LCM-LoRA, RMBG in PyTorch.

- Inpainting: diffusers' ``StableDiffusionInpaintPipeline`` with ``LCMScheduler`` (from the
  pipeline's own scheduler config), the LCM-LoRA loaded with ``load_lora_weights``, fused with
  ``fuse_lora`` and its adapter layers unloaded (diffusers' documented recipe for speed),
  no safety checker, float32, ``torch.set_num_threads(threads)``.
- Masking: RMBG-1.4's IS-Net (:class:`trt_bgswap.export.isnet.BriaRMBG`, the same weights)
  with BRIA's reference ``utilities.py`` pre/post-processing (bilinear resize to 1024,
  ``/255``, normalise with mean 0.5 / std 1; bilinear back, min-max, uint8).
- Compositing: PIL, the way an example script would (resize the generated background with
  Lanczos, ``Image.composite`` with the RMBG mask).

Stage times come from forward hooks on the text encoder, UNet, VAE encoder and decoder
modules; CPU torch is synchronous, so reading the clock in a hook is exact.

``python -m trt_bgswap.benchmarking.baseline`` is the baseline *script* for the cold-start
measurement: load everything, process one photo, write the PNG, exit.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trt_bgswap.benchmarking.peak_memory import StagePeaks
from trt_bgswap.benchmarking.stats import StageClock, Stats, non_model_stats, stage_stats, time_runs

log = logging.getLogger(__name__)

RMBG_MEAN = 0.5  # BRIA's utilities.py: normalize(image, [0.5, 0.5, 0.5], [1.0, 1.0, 1.0])
RMBG_STD = 1.0
# The diffusers pipeline of each model family (trt_bgswap.families) and its from_pretrained options.
PIPELINES: dict[str, tuple[str, dict[str, Any]]] = {
    "sd1": ("StableDiffusionInpaintPipeline", {"safety_checker": None, "requires_safety_checker": False}),
    "sd2": ("StableDiffusionInpaintPipeline", {"safety_checker": None, "requires_safety_checker": False}),
    "sdxl": ("StableDiffusionXLInpaintPipeline", {"add_watermarker": False}),
}


class Baseline:
    """The loaded baseline: diffusers pipeline + RMBG module, with optional stage hooks."""

    def __init__(self, sd: Path, lora: Path | None, rmbg: Path, threads: int, rmbg_size: int, taesd: Path | None = None) -> None:
        import diffusers
        import torch
        from diffusers import LCMScheduler

        from trt_bgswap.export.exporter import validate_inpaint_source
        from trt_bgswap.export.rmbg import load_rmbg_weights

        if threads:
            torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        family = validate_inpaint_source(sd)["family"].name  # from the model's configs, as the export decides it
        cls_name, kwargs = PIPELINES[family]
        pipe = getattr(diffusers, cls_name).from_pretrained(str(sd), torch_dtype=torch.float32, **kwargs)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        if lora is not None:
            lora_path = Path(lora)
            weight = lora_path.name if lora_path.is_file() else "pytorch_lora_weights.safetensors"
            pipe.load_lora_weights(str(lora_path.parent if lora_path.is_file() else lora_path), weight_name=weight)
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        if taesd is not None:  # diffusers' documented swap: pipe.vae = AutoencoderTiny.from_pretrained("madebyollin/taesd")
            from diffusers import AutoencoderTiny

            pipe.vae = AutoencoderTiny.from_pretrained(str(taesd), torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.net = load_rmbg_weights(Path(rmbg)).eval()
        self.rmbg_size = rmbg_size
        self.torch = torch
        self.peaks: StagePeaks | None = None

    def attach(self, clock: StageClock, peaks: StagePeaks | None = None) -> None:
        """Time the model modules' forward calls into ``clock`` (and their peak memory into ``peaks``)."""
        modules = [
            ("text_encoder", self.pipe.text_encoder),
            ("text_encoder", getattr(self.pipe, "text_encoder_2", None)),  # SDXL: both encoders are the text stage
            ("vae_encoder", self.pipe.vae.encoder),
            ("unet", self.pipe.unet),
            ("vae_decoder", self.pipe.vae.decoder),
        ]
        self.peaks = peaks
        for name, module in modules:
            if module is None:
                continue
            start: list[tuple[float, Any]] = []

            def before(m: Any, args: Any, s: list[tuple[float, Any]] = start, n: str = name) -> None:
                scope = self.peaks.stage(n) if self.peaks is not None else contextlib.nullcontext()
                scope.__enter__()
                s.append((time.perf_counter(), scope))

            def after(m: Any, args: Any, out: Any, s: list[tuple[float, Any]] = start, n: str = name) -> None:
                t0, scope = s.pop()
                clock.add(n, time.perf_counter() - t0)
                scope.__exit__(None, None, None)

            module.register_forward_pre_hook(before)
            module.register_forward_hook(after)

    def mask(self, rgb: np.ndarray, clock: StageClock) -> np.ndarray:
        """RMBG-1.4's reference: uint8 HxW mask."""
        import torch.nn.functional as F

        torch = self.torch
        h, w = rgb.shape[:2]
        with clock.measure("rmbg_preprocess"):
            x = torch.tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None]
            x = F.interpolate(x, size=(self.rmbg_size, self.rmbg_size), mode="bilinear")
            x = (x / 255.0 - RMBG_MEAN) / RMBG_STD
        with clock.measure("rmbg"), self.peaks.stage("rmbg") if self.peaks is not None else contextlib.nullcontext():
            y = self.net(x)[0][0]
        with clock.measure("rmbg_postprocess"):
            y = torch.squeeze(F.interpolate(y, size=(h, w), mode="bilinear"), 0)
            hi, lo = torch.max(y), torch.min(y)
            y = (y - lo) / (hi - lo)
            out = (y * 255).permute(1, 2, 0).cpu().numpy().astype(np.uint8)[..., 0]
        return out

    def replace(self, rgb: np.ndarray, prompt: str, steps: int, guidance: float, size: tuple[int, int], seed: int, clock: StageClock) -> Any:
        """One background replacement; returns the PIL composite."""
        from PIL import Image

        mask = self.mask(rgb, clock)
        with clock.measure("mask_prepare"):
            image = Image.fromarray(rgb)
            repaint = Image.fromarray(np.where(mask < 128, 255, 0).astype(np.uint8), "L")
        width, height = size
        with clock.measure("diffusers_call"):
            generated = self.pipe(
                prompt=prompt, image=image, mask_image=repaint, height=height, width=width, num_inference_steps=steps,
                guidance_scale=guidance, generator=self.torch.Generator().manual_seed(seed), strength=1.0,
            ).images[0]  # fmt: skip  (strength 1: SDXL's default is 0.9999; ours always starts from noise)
        with clock.measure("composite"):
            background = generated.resize(image.size, Image.LANCZOS)
            out = Image.composite(image, background, Image.fromarray(mask, "L"))
        return out


def _load(job: Mapping[str, Any]) -> Baseline:
    src = job["sources"]
    return Baseline(
        Path(src["sd-inpainting"]), Path(src["lcm-lora"]) if src.get("lcm-lora") else None, Path(src["rmbg"]), int(job["threads"]), int(job["rmbg_size"]),
        taesd=Path(job["taesd"]) if job.get("taesd") else None,
    )  # fmt: skip


def measure_baseline(job: Mapping[str, Any]) -> dict[str, Any]:
    """The ``baseline`` worker: same photo, size, steps, guidance and threads as ours."""
    from trt_bgswap.benchmarking.machine import current_rss_bytes
    from trt_bgswap.benchmarking.photos import load_photo

    result: dict[str, Any] = {"rss_start": current_rss_bytes()}
    peaks = StagePeaks()
    t0 = time.perf_counter()
    base = _load(job)
    result["load_seconds"] = time.perf_counter() - t0
    result["rss_after_load"] = current_rss_bytes()
    result["backends"] = {"all": f"torch {base.torch.__version__} CPU, {base.torch.get_num_threads()} threads"}
    clock = StageClock()
    base.attach(clock, peaks)
    rgb = load_photo(job["photo"])
    warmup, runs, steps = int(job["warmup"]), int(job["runs"]), int(job["steps"])
    size = tuple(job["size"])
    def e2e(i: int) -> None:
        base.replace(rgb, f"{job['prompt']} {i}", steps, float(job["guidance"]), size, 0, clock)  # type: ignore[arg-type]

    samples, every = time_runs(clock, e2e, warmup, runs)
    result["e2e"] = Stats.of(samples).to_json()
    result["requests_in_order"] = every
    result["stages"], result["unet_steps"] = stage_stats(clock.runs, steps)
    result["non_model"] = non_model_stats(samples, clock.runs)
    prepost = {}
    for name in ("rmbg_preprocess", "rmbg_postprocess", "mask_prepare", "composite"):
        prepost[name] = Stats.of([sum(r.get(name, [])) for r in clock.runs]).to_json()
    diffusers_overhead = [sum(r["diffusers_call"]) - sum(sum(r.get(k, [])) for k in ("text_encoder", "vae_encoder", "unet", "vae_decoder")) for r in clock.runs]
    prepost["diffusers_internal"] = Stats.of(diffusers_overhead).to_json()
    result["prepost"] = prepost
    result["throughput"] = {"e2e_images_per_s": 1.0 / float(np.median(samples))}
    result["stage_memory"] = peaks.to_json()
    result["peak_rss"] = peaks.peak()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """The cold-start baseline script: load, one photo, write the PNG."""
    p = argparse.ArgumentParser(description="PyTorch/diffusers baseline: one background replacement")
    p.add_argument("--sd", required=True)
    p.add_argument("--lora")
    p.add_argument("--rmbg", required=True)
    p.add_argument("--photo", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--size", type=int, nargs=2, required=True, metavar=("W", "H"))
    p.add_argument("--rmbg-size", type=int, required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args(argv)
    from trt_bgswap.benchmarking.photos import load_photo

    base = Baseline(Path(a.sd), Path(a.lora) if a.lora else None, Path(a.rmbg), a.threads, a.rmbg_size)
    from trt_bgswap.atomic import atomic_path

    out = base.replace(load_photo(a.photo), a.prompt, a.steps, a.guidance, (a.size[0], a.size[1]), 0, StageClock())
    with atomic_path(a.output, suffix=Path(a.output).suffix) as tmp:
        out.save(tmp)
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a subprocess by the cold-start measurement
    sys.exit(main())
