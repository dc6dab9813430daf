"""The VAE stages: encode the masked image to UNet-ready latents, decode the final latents to an image.

Each has two implementations, picked once at load: the host-path graph with the arithmetic
around it in numpy (the posterior draw ``mean + std * eps`` whose ``eps`` the caller gives, as
diffusers samples it from its generator; the shift/scaling factors from the VAE's config), or
the export's device graph with that arithmetic inside (``export --device-graphs``), which is
what TensorRT keeps on the GPU.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from trt_bgswap.errors import ModelError
from trt_bgswap.manifest import InpaintConfig
from trt_bgswap.runtime.denoise import cast_for
from trt_bgswap.runtime.engine import Engine, EngineStage
from trt_bgswap.specs import VAE_DECODER_IMAGE, VaeDecoderImageIO, VaeDecoderIO, VaeEncoderIO, VaeEncoderSampleIO


class VaeEncoder(Protocol):
    @property
    def backend(self) -> str: ...

    def encode(self, masked_image: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) masked images in [-1, 1] and the posterior draws -> scaled (N, C, h, w) latents."""
        ...

    def close(self) -> None: ...


class VaeDecoder(Protocol):
    @property
    def backend(self) -> str: ...

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Scaled (N, C, h, w) latents -> float32 (N, H, W, 3) images in [0, 1]."""
        ...

    def close(self) -> None: ...


class HostVaeEncoder(EngineStage):
    def __init__(self, engine: Engine, cfg: InpaintConfig) -> None:
        super().__init__(engine)
        self.cfg = cfg

    def encode(self, masked_image: np.ndarray, eps: np.ndarray) -> np.ndarray:
        out = self.engine(**{VaeEncoderIO.SAMPLE: cast_for(self.engine, VaeEncoderIO.SAMPLE, masked_image)})
        latents = out[VaeEncoderIO.MEAN].astype(np.float32) + out[VaeEncoderIO.STD].astype(np.float32) * eps
        if self.cfg.vae_shift_factor is not None:
            latents = latents - np.float32(self.cfg.vae_shift_factor)
        return latents * np.float32(self.cfg.vae_scaling_factor)


class GraphVaeEncoder(EngineStage):
    """``vae_encoder_sample``: the draw and the scaling inside the graph."""

    def encode(self, masked_image: np.ndarray, eps: np.ndarray) -> np.ndarray:
        e = self.engine
        feeds = {VaeEncoderSampleIO.SAMPLE: cast_for(e, VaeEncoderSampleIO.SAMPLE, masked_image), VaeEncoderSampleIO.EPS: cast_for(e, VaeEncoderSampleIO.EPS, eps)}
        return e(**feeds)[VaeEncoderSampleIO.LATENTS]


class HostVaeDecoder(EngineStage):
    def __init__(self, engine: Engine, cfg: InpaintConfig) -> None:
        super().__init__(engine)
        self.cfg = cfg

    def decode(self, latents: np.ndarray) -> np.ndarray:
        z = latents / np.float32(self.cfg.vae_scaling_factor)
        if self.cfg.vae_shift_factor is not None:
            z = z + np.float32(self.cfg.vae_shift_factor)
        img = self.engine(**{VaeDecoderIO.LATENTS: cast_for(self.engine, VaeDecoderIO.LATENTS, z)})[VaeDecoderIO.SAMPLE].astype(np.float32)
        return np.clip(img / 2.0 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def image_hwc(image: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) images as the pipeline's (N, H, W, 3) (a view; no arithmetic left on the host)."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ModelError(f"{VAE_DECODER_IMAGE} returned shape {image.shape}; expected (N, 3, H, W)")
    return image.transpose(0, 2, 3, 1)


class GraphVaeDecoder(EngineStage):
    """``vae_decoder_image``: the unscaling and the [-1, 1] -> [0, 1] clamp inside the graph."""

    def decode(self, latents: np.ndarray) -> np.ndarray:
        e = self.engine
        return image_hwc(e(**{VaeDecoderImageIO.LATENTS: cast_for(e, VaeDecoderImageIO.LATENTS, latents)})[VaeDecoderImageIO.IMAGE])
