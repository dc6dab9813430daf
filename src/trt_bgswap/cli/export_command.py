"""`trt-bgswap export`: PyTorch models (hub ids, registry names or local folders) -> an exported ONNX folder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from trt_bgswap.cli.run_command import add_source_options, given_sources
from trt_bgswap.model_folders import FAMILY_TINY_VAE, export_sources, with_defaults

log = logging.getLogger("trt_bgswap")

NAME = "export"
HELP = "PyTorch models -> ONNX folder (needs the export extra)"


def add_arguments(e: argparse.ArgumentParser) -> None:
    add_source_options(e, defaults=True)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    e.add_argument("--force", action="store_true", help="replace an existing exported folder")
    e.add_argument(
        "--vae-src", type=Path, metavar="DIR",
        help="a diffusers AutoencoderKL folder replacing the model's VAE, e.g. an fp16-safe one (madebyollin/sdxl-vae-fp16-fix): "
        "with --precision fp16 it is exported in fp16 when its config says force_upcast: false (the model's own VAE stays fp32)",
    )
    e.add_argument("--fused-step", action="store_true", help="also export unet_step/: UNet + guidance + LCM step in one graph (the TensorRT device loop runs it)")
    e.add_argument(
        "--device-graphs",
        action="store_true",
        help="also export vae_encoder_sample/, vae_decoder_image/, rmbg_full/: the VAE and RMBG with their pre/post-processing inside (TensorRT keeps data on the GPU)",
    )
    e.add_argument(
        "--vae", choices=["full", "tiny"], default="full",
        help="tiny: the tiny autoencoder (TAESD) encodes and decodes instead of the model's VAE: much faster, less detail",
    )  # fmt: skip
    e.add_argument(
        "--taesd", default=FAMILY_TINY_VAE,
        help="with --vae tiny: the tiny autoencoder, a folder, hub id or registry name (default: the inpainting model's family's: "
        "taesd = madebyollin/taesd for SD1.x/2.x, taesdxl = madebyollin/taesdxl for SDXL)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    sources = with_defaults(given_sources(args), need_inpaint=True, need_rmbg=True)
    manifest = export_sources(
        sources, Path(args.out), precision=args.precision, opset=args.opset, offline=args.offline, allow_pickle=args.allow_pickle,
        overwrite=args.force, fused_step=args.fused_step, device_graphs=args.device_graphs, loras=args.loras, masker=args.masker,
        tiny_vae=args.taesd if args.vae == "tiny" else None, vae_src=args.vae_src,
    )
    log.info("exported %s to %s", ", ".join(manifest.models), args.out)
    return 0
