"""LoRA stacking on SDXL (issue 12): the SDXL LCM-LoRA, then a user's SDXL LoRA (UNet + both text encoders) at 0.7.

The user LoRA is made as diffusers' SDXL training scripts make one: PEFT adapters on the tiny
SDXL UNet, ``text_encoder`` and ``text_encoder_2`` with random "trained" values, saved by
``StableDiffusionXLInpaintPipeline.save_lora_weights`` (``unet.``/``text_encoder.``/``text_encoder_2.``
peft keys). Reference: diffusers' ``load_lora_weights`` + ``fuse_lora(lora_scale=s)`` +
``unload_lora_weights`` per LoRA, in order. Acceptance (issue 12): fused weights within 1e-5,
the image within 1e-3 (and the loop's rounding noise, :mod:`tolerance`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import family_parity as fp
from tolerance import assert_within, rounding_bound
from trt_bgswap.export.lora import LoraSource, fuse_loras
from trt_bgswap.runtime.pipeline import Pipeline

WIDTH, HEIGHT, STEPS = 176, 112, 4
USER_SCALE = 0.7
WEIGHT_ACCEPTANCE = 1e-5
CASE = (2.0, fp.NEGATIVE)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def user_lora(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    src = tiny_models_dir / "sdxl-inpainting"
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src / "unet"))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(src / "text_encoder"))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(src / "text_encoder_2"))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=6.0, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"], init_lora_weights="gaussian"), unet)
    for model in (te, te2):
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2.0, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], init_lora_weights="gaussian"), model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for model in (unet, te, te2):
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    for p in (*module.lora_A.parameters(), *module.lora_B.parameters()):
                        p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
    folder = tmp_path_factory.mktemp("sdxl-user-lora")
    StableDiffusionXLInpaintPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        text_encoder_2_lora_layers=get_peft_model_state_dict(te2),
    )
    return folder


@pytest.fixture(scope="module")
def reference_pipe(tiny_models_dir: Path, user_lora: Path):
    from diffusers import LCMScheduler, StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_models_dir / "sdxl-inpainting", add_watermarker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    for path, scale in ((tiny_models_dir / "lcm-lora-sdxl", 1.0), (user_lora, USER_SCALE)):
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_stacked_weights_match_diffusers(tiny_models_dir: Path, user_lora: Path, reference_pipe) -> None:  # noqa: ANN001
    from trt_bgswap.export.text_encoder import load_text_encoder
    from trt_bgswap.export.text_encoder_2 import load_text_encoder_2
    from trt_bgswap.export.unet import load_unet

    src = tiny_models_dir / "sdxl-inpainting"
    models = {"unet": load_unet(src), "text_encoder": load_text_encoder(src), "text_encoder_2": load_text_encoder_2(src)}
    base = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    fused = fuse_loras(models["unet"], models["text_encoder"], [LoraSource(tiny_models_dir / "lcm-lora-sdxl"), LoraSource(user_lora, USER_SCALE)], text_encoder_2=models["text_encoder_2"])
    assert set(fused[1].touched) == set(COMPONENTS), fused[1].touched  # the user LoRA reached both text encoders
    for component in COMPONENTS:
        ref = getattr(reference_pipe, component).state_dict()
        ours = models[component].state_dict()
        moved = max(float((ours[k] - base[component][k]).abs().max()) for k in ours)
        assert moved > 1e-2, f"{component}: the LoRAs barely moved its weights ({moved:.3g})"
        for key, tensor in ours.items():
            err = float((tensor - ref[key]).abs().max())
            # both sides run diffusers' fusion (W + scale * B @ A): a reordered rank-r sum and the scaling, a few roundings of |W|
            assert_within(err, lambda: float(rounding_bound(float(ref[key].abs().max()), 4 + 3)), f"{component}.{key}: fused weight vs diffusers")
            assert err <= WEIGHT_ACCEPTANCE, f"{component}.{key}: {err:.3g} > {WEIGHT_ACCEPTANCE}"


@pytest.mark.slow  # a second SDXL export and its loop tolerance; the fused weights above run by default
@pytest.mark.numerics
def test_sdxl_stacked_loop_matches_diffusers(tiny_models_dir: Path, user_lora: Path, reference_pipe, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: ANN001
    from trt_bgswap.export.exporter import export_models

    out = tmp_path_factory.mktemp("sdxl-stack") / "export"
    export_models(tiny_models_dir / "sdxl-inpainting", tiny_models_dir / "lcm-lora-sdxl", None, out, loras=[LoraSource(user_lora, USER_SCALE)])
    rgb, mask = fp.photo_and_mask()
    run = fp.lcm_reference(reference_pipe, None, rgb, mask, (WIDTH, HEIGHT), STEPS)
    expected, noise = run(CASE)
    runtime = Pipeline.load(out, provider="cpu")
    ours = runtime.inpaint(rgb, mask, fp.options(CASE, (WIDTH, HEIGHT), STEPS), noise)
    err = float(np.abs(ours - expected).max())
    tol = fp.loop_tolerance(out, runtime, rgb, mask, tmp_path_factory.mktemp("noisy-stack"), (WIDTH, HEIGHT), STEPS)
    assert_within(err, lambda: tol(CASE, noise), "SDXL LCM-LoRA + user LoRA 0.7: generated image vs diffusers")
    assert err <= fp.ACCEPTANCE, f"SDXL stacked LoRAs: image max abs err {err:.3g} > {fp.ACCEPTANCE}"
