"""The inpainting training objective: diffusers' masked-latent denoising loss, and its fixed-noise evaluation.

As in diffusers' inpainting training scripts (``examples/research_projects/dreambooth_inpaint/
train_dreambooth_inpaint_lora.py``): the photo and the masked photo are encoded by the VAE
(posterior samples times ``scaling_factor``), the mask is resized to the latent grid (nearest), and
the 9-channel UNet sees ``[noisy latents, mask, masked-image latents]``, trained with the MSE to the
noise (or to the velocity for v-prediction models). The loop that trains it is
:mod:`~trt_bgswap.training.finetune`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_bgswap.errors import UsageError
from trt_bgswap.training.data import Example, collate, counter_seed

EVAL_TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)  # of num_train_timesteps: the evaluation loss spans the schedule


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """from_pretrained's dtype argument for half precision; nothing for fp32 (the default, and no deprecation warning)."""
    import torch

    return {} if dtype == torch.float32 else {"torch_dtype": dtype}


@dataclass
class Models:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    default_size: int
    size_multiple: int


def load_models(base: Path, device: Any, dtype: Any) -> Models:
    """The diffusers components of an SD inpainting folder, frozen, on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not (base / "unet" / "config.json").is_file():
        raise UsageError(f"--inpaint {base}: not a diffusers Stable Diffusion folder (no unet/config.json); give an SD inpainting folder or hub id")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **dtype_kwargs(dtype))
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **dtype_kwargs(dtype))
    vae_channels = int(vae.config.latent_channels)
    if unet.config.in_channels != 2 * vae_channels + 1:
        raise UsageError(
            f"--inpaint {base}: its UNet takes {unet.config.in_channels} channels, an inpainting UNet {2 * vae_channels + 1} "
            "(latents, mask, masked-image latents); give an inpainting model such as stable-diffusion-v1-5/stable-diffusion-inpainting"
        )
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **dtype_kwargs(dtype))
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.to(device)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
    return Models(tokenizer, text_encoder, vae, unet, noise_scheduler, int(unet.config.sample_size) * vae_factor, vae_factor * unet_factor)


class Objective:
    """The masked-latent loss on a set of models (trained or loaded), and its fixed-noise evaluation."""

    def __init__(self, models: Models, resolution: int, device: Any, dtype: Any, seed: int, eval_examples: int) -> None:
        self.m, self.resolution, self.device, self.dtype, self.seed, self.eval_examples = models, resolution, device, dtype, seed, eval_examples
        self._text_cache: dict[str, Any] = {}

    def encode_text(self, texts: list[str]) -> Any:
        import torch

        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            tok = self.m.tokenizer(missing, padding="max_length", max_length=self.m.tokenizer.model_max_length, truncation=True, return_tensors="pt")
            with torch.no_grad():
                hidden = self.m.text_encoder(tok.input_ids.to(self.device))[0]
            for t, h in zip(missing, hidden):
                self._text_cache[t] = h
        return torch.stack([self._text_cache[t] for t in texts])

    def _latents(self, pixels: Any, generator: Any) -> Any:
        return self.m.vae.encode(pixels).latent_dist.sample(generator=generator) * self.m.vae.config.scaling_factor

    def encode(self, batch: dict[str, Any], generator: Any) -> tuple[Any, Any, Any, Any]:
        """(latents, mask on the latent grid, masked-image latents, text states): the frozen models' part, no gradients."""
        import torch
        import torch.nn.functional as F

        to = dict(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            latents = self._latents(torch.from_numpy(batch["pixels"]).to(**to), generator)
            masked_latents = self._latents(torch.from_numpy(batch["masked"]).to(**to), generator)
            mask = F.interpolate(torch.from_numpy(batch["masks"]).to(**to), size=latents.shape[-2:])  # nearest, as the scripts
            hidden = self.encode_text(batch["texts"])
        return latents, mask, masked_latents, hidden

    def denoising_loss(self, encoded: tuple[Any, Any, Any, Any], generator: Any, timesteps: Any | None = None, reduce: bool = True) -> Any:
        """The MSE of the UNet's prediction on noised latents; ``timesteps`` None draws one per example from ``generator``."""
        import torch
        import torch.nn.functional as F

        latents, mask, masked_latents, hidden = encoded
        sched = self.m.noise_scheduler
        if timesteps is None:
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=self.device)
        noise = torch.randn(latents.shape, generator=generator, device=self.device, dtype=latents.dtype)
        noisy = sched.add_noise(latents, noise, timesteps)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
        with torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            pred = self.m.unet(torch.cat([noisy, mask, masked_latents], dim=1), timesteps, hidden).sample
        err = F.mse_loss(pred.float(), target.float(), reduction="none")
        return err.mean() if reduce else err.mean(dim=(1, 2, 3))

    def loss(self, batch: dict[str, Any], generator: Any) -> Any:
        """The masked-latent objective on one training batch (VAE samples, timesteps and noise from ``generator``)."""
        return self.denoising_loss(self.encode(batch, generator), generator)

    def generator(self, purpose: str, counter: int) -> Any:
        import torch

        return torch.Generator(device=self.device).manual_seed(counter_seed(self.seed, purpose, counter))

    def evaluate(self, examples: list[Example]) -> list[float]:
        """The fixed-noise evaluation loss of each (example, timestep): same crops, timesteps and noise every call."""
        import torch

        was_training = self.m.unet.training
        self.m.unet.eval()
        t_max = self.m.noise_scheduler.config.num_train_timesteps
        ts = torch.tensor([int(f * t_max) for f in EVAL_TIMESTEP_FRACTIONS], device=self.device)
        out: list[float] = []
        with torch.no_grad():
            for k, ex in enumerate(examples[: self.eval_examples]):
                generator = self.generator("eval", k)
                encoded = self.encode(collate([ex], self.resolution, [None]), generator)  # once per example, shared by its timesteps
                repeated = tuple(t.expand(len(ts), *t.shape[1:]) for t in encoded)
                out += [float(v) for v in self.denoising_loss(repeated, generator, timesteps=ts, reduce=False)]
        self.m.unet.train(was_training)
        return out
