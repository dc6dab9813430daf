"""Will a full-size benchmark fit in this machine's memory? Estimated before any work, refused when it will not.

The full-size run keeps one heavy thing alive at a time (the suite's order: write the models one
module at a time, export one graph at a time, build, then our side and the baseline each in its own
worker process), so the peak is the largest single step, not their sum. Each step's peak is
estimated from the parameter counts of the published configurations (counted on PyTorch's
``meta`` device: no memory) and float32 weights (4 bytes each), times a factor measured on the
full-size SD1.5 UNet (3.44 GB of weights; VmHWM of one process per step, 2-core AMD EPYC,
torch 2.13, onnx 1.23, onnxruntime 1.32, safetensors 0.8), rounded up:

=================  ============  =====================================================================
step               measured      planned (x the largest module's fp32 weights)
=================  ============  =====================================================================
write models       3.80 GB 1.10  1.25: the module, written from its own memory by safetensors
export (ONNX)      4.50 GB 1.31  1.5: load + LoRA fusion (1.25), tracing, the weights file copied
                                 tensor by tensor (:func:`~trt_bgswap.onnx_graph.write_with_external_data`)
build              3.62 GB 1.05  1.5: ONNX Runtime's offline optimization, one graph at a time, then the
                                 parity check (one session at a time); the transformer fusions keep
                                 large weights on disk (engines/fusion.py): 0.40 GB (0.12x; 20.3 GB,
                                 5.9x, with them loaded)
ours               (run)         1.25 x every graph's weights: sessions + arena and activations
                                 (the SD1.5 run measured 1.28 at 512x512)
baseline           (run)         1.25 x every module of the diffusers pipeline
=================  ============  =====================================================================

What the estimate is for is refusing early a run that the out-of-memory killer would end hours
in; the report records each side's measured peak. ``MemAvailable`` of ``/proc/meminfo`` is what
may be used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trt_bgswap.errors import UsageError

log = logging.getLogger(__name__)

FP32 = 4
SAVE_FACTOR = 1.25  # measured 1.10 (table above)
EXPORT_FACTOR = 1.5  # measured 1.31
BUILD_FACTOR = 1.5  # measured 1.05 (optimization) and 0.12 (fusions); the parity check's sessions ~1.3
RUN_FACTOR = 1.25  # weights + arena/activations (measured 1.28 for SD1.5 at 512)
MARGIN = 1 << 30  # left for the OS and the parent process


@dataclass(frozen=True)
class Step:
    name: str
    bytes: int


def parameter_counts(family: str) -> dict[str, int]:
    """Parameters of each module of the family's published configurations, counted without allocating them."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trt_bgswap.export.tiny_sd import SD15_INPAINT_UNET_CONFIG, SD15_TEXT_ENCODER_CONFIG, SD15_VAE_CONFIG
    from trt_bgswap.export.tiny_sdxl import SDXL_INPAINT_UNET_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG

    unet, te2 = (SD15_INPAINT_UNET_CONFIG, None) if family == "sd15" else (SDXL_INPAINT_UNET_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG)
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel.from_config(unet),
            "vae": AutoencoderKL.from_config(SD15_VAE_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG)),
        }
        if te2 is not None:
            modules["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**te2))
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    counts["rmbg"] = 44_000_000  # RMBG-1.4's IS-Net (176 MB of fp32 weights)
    return counts


def plan(family: str, batch_sizes: Sequence[int] = (1,), written: bool = False, exported: bool = False) -> list[Step]:
    """Each step's estimated peak (bytes), in the suite's order; steps given models or an export skip are left out."""
    counts = parameter_counts(family)
    largest = max(counts.values()) * FP32
    total = sum(counts.values()) * FP32
    steps = [] if written else [Step("write the random models", int(largest * SAVE_FACTOR))]
    if not exported:
        steps.append(Step("export to ONNX (the largest graph)", int(largest * EXPORT_FACTOR)))
    steps.append(Step("build (fusions, offline optimization, parity check; the largest graph)", int(largest * BUILD_FACTOR)))
    return [
        *steps,
        Step(f"our pipeline (batch up to {max(batch_sizes)})", int(total * RUN_FACTOR)),
        Step("the diffusers baseline", int(total * RUN_FACTOR)),
    ]


def fits_second_copy(family: str, available: int | None = None) -> bool:
    """Can our side hold a second session of its largest graph (the fused-vs-unfused comparison) on top of the pipeline?"""
    counts = parameter_counts(family)
    need = int((sum(counts.values()) + max(counts.values())) * FP32 * RUN_FACTOR)
    have = available if available is not None else available_bytes()
    return have is None or need <= have - MARGIN


def available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def check_memory_plan(
    family: str, batch_sizes: Sequence[int] = (1,), available: int | None = None, written: bool = False, exported: bool = False
) -> list[Step]:
    """Log the plan; refuse (UsageError naming the step and the fix) when a step's peak exceeds the memory available."""
    steps = plan(family, batch_sizes, written, exported)
    have = available if available is not None else available_bytes()
    for s in steps:
        log.info("memory plan (%s): %s ~%.1f GB", family, s.name, s.bytes / 1e9)
    if have is None:
        log.warning("memory plan: MemAvailable unknown; running without the check")
        return steps
    too_big = [s for s in steps if s.bytes > have - MARGIN]
    if too_big:
        worst = max(too_big, key=lambda s: s.bytes)
        raise UsageError(
            f"the full-size {family} benchmark needs ~{worst.bytes / 1e9:.1f} GB for '{worst.name}' but {have / 1e9:.1f} GB is available "
            f"(less {MARGIN / 1e9:.1f} GB margin); free memory or use a bigger machine, or give --export with an export made elsewhere"
        )
    return steps
