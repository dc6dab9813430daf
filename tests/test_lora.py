"""LCM-LoRA fusion vs diffusers/PEFT with the LoRA active and unfused, on the tiny models.

Reference: ``StableDiffusionInpaintPipeline.load_lora_weights`` (diffusers converts the
kohya-style keys and wraps each targeted layer in a PEFT LoRA layer). Our fusion must give
the same UNet output within the UNet's rounding noise (:mod:`tolerance`), change exactly the
layers the file names, and move the output far more than that tolerance.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerance import assert_within, gamma, graph_tolerances

from trt_bgswap.errors import ModelError
from trt_bgswap.export.lora import fuse_lora
from trt_bgswap.export.tiny_sd import LCM_LORA_ALPHA, LCM_LORA_FILE, LCM_LORA_RANK, kohya_key, lcm_lora_module_names
from trt_bgswap.export.unet import load_unet, wrap
from trt_bgswap.manifest import Manifest

KOHYA_KEY = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return (
        torch.randn(2, 9, 8, 16, generator=gen),
        torch.tensor([999.0, 259.0]),
        torch.randn(2, 77, 32, generator=gen),
    )


@pytest.fixture(scope="module")
def peft_unet(tiny_models_dir: Path):
    """diffusers' UNet with the LoRA loaded as active, unfused PEFT layers."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        tiny_models_dir / "sd-inpainting", safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(tiny_models_dir / "lcm-lora"))
    return pipe.unet.eval()


def _run(unet, inputs) -> np.ndarray:
    with torch.no_grad():
        return wrap(unet)(*inputs).numpy()


def test_lora_file_format(tiny_models_dir: Path) -> None:
    """Kohya-style keys over diffusers names, rank 64, alpha 8, fp16, every LCM target module, nothing else."""
    state = load_file(str(tiny_models_dir / "lcm-lora" / LCM_LORA_FILE))
    bad = [k for k in state if not KOHYA_KEY.match(k)]
    assert not bad, f"keys not in lcm-lora-sdv1-5's format: {bad[:5]}"
    unet = load_unet(tiny_models_dir / "sd-inpainting")
    want = {kohya_key(n) for n in lcm_lora_module_names(unet)}
    have = {k.split(".")[0] for k in state}
    assert have == want, f"missing {sorted(want - have)[:5]}, extra {sorted(have - want)[:5]}"
    assert len(state) == 3 * len(want)
    alphas = {float(v) for k, v in state.items() if k.endswith(".alpha")}
    ranks = {v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")}
    assert alphas == {LCM_LORA_ALPHA} and ranks == {LCM_LORA_RANK}, f"alphas {alphas}, ranks {ranks}"
    assert {v.dtype for v in state.values()} == {torch.float16}
    ups = [float(v.abs().max()) for k, v in state.items() if k.endswith(".lora_up.weight")]
    assert min(ups) > 0, "a zero lora_up makes that module's LoRA a no-op"


@pytest.mark.numerics
def test_fused_matches_unfused_peft(tiny_models_dir: Path, exported_dir: Path, peft_unet, unet_inputs) -> None:
    base = _run(load_unet(tiny_models_dir / "sd-inpainting"), unet_inputs)
    fused = _run(load_unet(tiny_models_dir / "sd-inpainting", tiny_models_dir / "lcm-lora"), unet_inputs)
    reference = _run(peft_unet, unet_inputs)
    err = float(np.abs(fused - reference).max())
    moved = float(np.abs(base - reference).max())
    # fused weights vs an extra rank-64 branch: the same function, so the UNet's rounding noise on these
    # inputs (measured on its exported graph, the same network with the LoRA fused)
    entry = Manifest.load(exported_dir).models["unet"]
    tol = graph_tolerances(exported_dir / entry.file, dict(zip(entry.spec.input_names, (t.numpy() for t in unet_inputs))))["out_sample"]
    assert_within(err, tol, f"out_sample: fused vs unfused PEFT (LoRA moves the output by {moved:.3g})")
    assert moved > 1000 * tol, f"the LoRA barely changes the UNet: {moved:.3g} vs tolerance {tol:.3g}"


def test_fusion_changes_exactly_the_lora_modules(tiny_models_dir: Path, peft_unet) -> None:
    from peft.tuners.lora import LoraLayer

    base = load_unet(tiny_models_dir / "sd-inpainting")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = fuse_lora(base, tiny_models_dir / "lcm-lora")
    changed = {k for k, v in base.state_dict().items() if not torch.equal(v, before[k])}
    n_keys = len(load_file(str(tiny_models_dir / "lcm-lora" / LCM_LORA_FILE)))
    peft_layers = sum(1 for m in peft_unet.modules() if isinstance(m, LoraLayer))
    assert all(k.endswith(".weight") for k in changed), f"non-weight tensors changed: {sorted(changed)[:5]}"
    assert len(changed) == result.modules == n_keys // 3 == peft_layers, (
        f"{len(changed)} weights changed, {result.modules} modules fused, {n_keys} keys in the file "
        f"({n_keys // 3} modules), diffusers made {peft_layers} LoRA layers"
    )


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_scale_matches_diffusers_fuse(tiny_models_dir: Path, scale: float) -> None:
    """``scale`` means what diffusers' ``fuse_lora(lora_scale=...)`` means."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        tiny_models_dir / "sd-inpainting", safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(tiny_models_dir / "lcm-lora"))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    ours = load_unet(tiny_models_dir / "sd-inpainting", tiny_models_dir / "lcm-lora", lora_scale=scale)
    ref = pipe.unet.state_dict()
    lora = load_file(str(tiny_models_dir / "lcm-lora" / LCM_LORA_FILE))
    for key, value in ours.state_dict().items():
        w = value.double().numpy()
        bound = np.zeros_like(w)
        module = key.removesuffix(".weight")
        if f"{kohya_key(module)}.lora_up.weight" in lora:
            # both compute W + scale (alpha / rank) (up @ down) in float32, in their own order: a rank-long dot
            # product and three more roundings each, so 2 gamma_(rank+3) (|W| + |scale alpha/rank| |up| @ |down|)
            up = lora[f"{kohya_key(module)}.lora_up.weight"].double().numpy()
            down = lora[f"{kohya_key(module)}.lora_down.weight"].double().numpy()
            rank = down.shape[0]
            products = (np.abs(up.reshape(up.shape[0], rank)) @ np.abs(down.reshape(rank, -1))).reshape(w.shape)
            bound = 2 * gamma(rank + 3) * (np.abs(w) + 2 * abs(scale) * LCM_LORA_ALPHA / rank * products)
        err = np.abs(w - ref[key].double().numpy())
        # every other weight is untouched on both sides: exact (bound 0)
        ratio = np.where(bound > 0, err / np.where(bound > 0, bound, 1.0), np.where(err > 0, np.inf, 0.0))
        worst = np.unravel_index(np.argmax(ratio), ratio.shape) if ratio.size else ()
        assert_within(float(err[worst]), float(bound[worst]), f"scale {scale}: {key}{[int(i) for i in worst]} vs diffusers' fused weight")


def test_foreign_lora_is_rejected(tiny_models_dir: Path, tmp_path: Path) -> None:
    """A LoRA for another architecture (a module this UNet lacks) fails loudly instead of half-merging."""
    state = load_file(str(tiny_models_dir / "lcm-lora" / LCM_LORA_FILE))
    state["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    state["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    save_file(state, str(tmp_path / LCM_LORA_FILE))
    with pytest.raises(ModelError, match="no counterpart"):
        load_unet(tiny_models_dir / "sd-inpainting", tmp_path)


def test_unknown_key_format_is_rejected(tmp_path: Path, tiny_models_dir: Path) -> None:
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32)}, str(tmp_path / LCM_LORA_FILE))
    with pytest.raises(ModelError, match="kohya-style"):
        load_unet(tiny_models_dir / "sd-inpainting", tmp_path)


def test_pickled_lora_is_rejected(tmp_path: Path, tiny_models_dir: Path) -> None:
    path = tmp_path / "pytorch_lora_weights.bin"
    torch.save({}, path)
    with pytest.raises(ModelError, match="safetensors"):
        load_unet(tiny_models_dir / "sd-inpainting", path)
