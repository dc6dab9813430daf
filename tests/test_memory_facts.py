"""The exporter's memory facts against independent evidence: PyTorch's own attention modules, and
ONNX Runtime's tensors at a size the facts were not measured at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from trt_bgswap.export import unet as unet_export
from trt_bgswap.export import vae as vae_export
from trt_bgswap.export.memory_facts import _live_sets, _Runner
from trt_bgswap.manifest import Manifest
from trt_bgswap.memory import AREA_FIXED, AREA_LATENT, facts_from_json
from trt_bgswap.specs import pipeline_dims


def _torch_attention(module: torch.nn.Module, run, latent_area: int) -> list[tuple[int, int, int, int | None]]:
    """(heads, head_dim, area / query tokens, keys or None for self-attention) of every diffusers Attention that runs."""
    from diffusers.models.attention_processor import Attention

    seen: list[tuple[int, int, int, int | None]] = []

    def hook(mod, args, kwargs) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        tokens = hidden.shape[2] * hidden.shape[3] if hidden.ndim == 4 else hidden.shape[1]
        inner = mod.to_q.out_features
        seen.append((mod.heads, inner // mod.heads, latent_area // tokens, None if context is None else context.shape[1]))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in module.modules() if isinstance(m, Attention)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return sorted(seen, key=str)


def _facts_attention(exported_dir: Path, model: str) -> list[tuple[int, int, int, int | None]]:
    facts = facts_from_json(Manifest.load(exported_dir).memory)
    assert facts is not None, "the export recorded no memory facts"
    return sorted(((a.heads, a.head_dim, a.q_divisor, a.kv_tokens) for a in facts[model].attention), key=str)


def test_unet_attention_facts_are_the_models_own(exported_dir: Path, tiny_models_dir: Path) -> None:
    cfg = Manifest.load(exported_dir).inpaint
    unet = unet_export.load_unet(tiny_models_dir / "sd-inpainting", tiny_models_dir / "lcm-lora")
    h, w = 2 * cfg.size_multiple // cfg.vae_scale_factor, 3 * cfg.size_multiple // cfg.vae_scale_factor
    sample = torch.randn(1, cfg.unet_in_channels, h, w)
    context = torch.randn(1, cfg.max_length, unet.config.cross_attention_dim)
    expected = _torch_attention(unet, lambda: unet(sample, torch.tensor([500.0]), context), h * w)
    assert expected, "the tiny UNet has no attention to compare"
    assert _facts_attention(exported_dir, "unet") == expected


@pytest.mark.parametrize("model", ["vae_encoder", "vae_decoder"])
def test_vae_attention_facts_are_the_models_own(exported_dir: Path, tiny_models_dir: Path, model: str) -> None:
    cfg = Manifest.load(exported_dir).inpaint
    vae = vae_export.load_vae(tiny_models_dir / "sd-inpainting")
    h, w = 3, 5
    if model == "vae_encoder":
        run = lambda: vae.encode(torch.randn(1, 3, h * cfg.vae_scale_factor, w * cfg.vae_scale_factor))  # noqa: E731
    else:
        run = lambda: vae.decode(torch.randn(1, cfg.latent_channels, h, w))  # noqa: E731
    module = vae.encoder if model == "vae_encoder" else vae.decoder
    assert _facts_attention(exported_dir, model) == _torch_attention(module, run, h * w)


def test_fixed_graphs_have_fixed_costs(exported_dir: Path) -> None:
    facts = facts_from_json(Manifest.load(exported_dir).memory)
    assert facts["text_encoder"].area == facts["rmbg"].area == AREA_FIXED
    assert facts["unet"].area == AREA_LATENT


@pytest.mark.parametrize("bounded", [False, True])
def test_live_sets_extrapolate_to_an_unmeasured_size(exported_dir: Path, bounded: bool) -> None:
    """At a size the facts were not fitted at (batch 2, 16x40 latents), the UNet's recorded live sets give
    the peak that replaying its freeing order over ONNX Runtime's actual tensors gives.

    Exact up to the pruning of live sets that are never the maximum at the areas kept (5% apart):
    between two kept areas a dropped one can exceed the kept maximum only where two parabolas
    cross, by far less than 1e-3 of it.
    """
    manifest = Manifest.load(exported_dir)
    cfg, entry = manifest.inpaint, manifest.models["unet"]
    step = cfg.size_multiple // cfg.vae_scale_factor
    h, w = 2 * step, 5 * step
    dims = pipeline_dims(2, h * cfg.vae_scale_factor, w * cfg.vae_scale_factor, cfg.vae_scale_factor)
    path = exported_dir / entry.file
    model = onnx.load(str(path), load_external_data=False)
    shapes = _Runner(path, model, entry.spec).shapes(dims)
    exact = {k: (float(np.prod(s, dtype=np.int64) * itemsize), 0.0, 0.0, 0.0) for k, (s, itemsize) in shapes.items()}
    from trt_bgswap.attention_pattern import find_attention

    triples, _ = find_attention(model.graph.node)
    drop = {n for t in triples for n in (t.scores.output[0], t.softmax.output[0])} if bounded else set()
    hold = {t.scores.output[0]: t.mix.output[0] for t in triples} if bounded else {}
    replayed = max(v[0] for v in _live_sets(model, exact, drop, hold))
    predicted = facts_from_json(manifest.memory)["unet"].transient(2, h * w, bounded)
    assert predicted <= replayed * (1 + 1e-9) and predicted >= replayed * (1 - 1e-3), (predicted, replayed)
