"""export_models: the manifest says what the models' own configs say, bad sources fail with the fix, no half exports.

The InpaintConfig is checked against what diffusers itself derives from the same folder
(``pipe.vae_scale_factor``, the VAE/UNet configs, the tokenizer), not against literals.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from trt_bgswap.errors import ModelError, OutputError, UsageError
from trt_bgswap.export.exporter import export_models
from trt_bgswap.export.unet import downsample_factor
from trt_bgswap.manifest import MODEL_NAMES, Manifest, sha256_file


@pytest.fixture(scope="module")
def reference_pipe(tiny_models_dir: Path):
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline.from_pretrained(
        tiny_models_dir / "sd-inpainting", safety_checker=None, requires_safety_checker=False
    )


def test_manifest_models_and_hashes(exported_dir: Path) -> None:
    m = Manifest.load(exported_dir)
    assert set(m.models) == set(MODEL_NAMES)
    assert m.precision == "fp32" and m.opset == 17
    for name, entry in m.models.items():
        path = exported_dir / entry.file
        assert entry.file == f"{name}/model.onnx" and path.is_file(), f"{name}: {entry.file}"
        assert sha256_file(path) == entry.sha256, f"{name}: sha256 mismatch"
        assert (entry.precision, entry.spec.name) == ("fp32", name), f"{name}: precision {entry.precision}, spec {entry.spec.name}"
    assert {"torch", "diffusers", "transformers", "onnx", "onnxruntime"} <= set(m.versions), f"versions {m.versions}"
    assert m.created, "no creation time"
    assert (m.extra["lora_scale"], m.extra["vae_precision"]) == (1.0, "fp32"), f"extra {m.extra}"


def test_manifest_sources(exported_dir: Path, tiny_models_dir: Path) -> None:
    sources = Manifest.load(exported_dir).sources
    for name, expected_files in (
        ("sd-inpainting", {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}),
        ("lcm-lora", {"pytorch_lora_weights.safetensors"}),
    ):
        src = sources[name]
        root = Path(src["path"]) if Path(src["path"]).is_dir() else Path(src["path"]).parent
        assert set(src["sha256"]) == expected_files, f"{name}: hashed {sorted(src['sha256'])}"
        for rel, digest in src["sha256"].items():
            assert sha256_file(root / rel) == digest, f"{name}/{rel}: sha256 mismatch"
    assert "rmbg" in sources and sources["rmbg"]["sha256"], "the RMBG weights are not recorded"


def test_inpaint_config_from_model_configs(exported_dir: Path, tiny_models_dir: Path, reference_pipe) -> None:
    cfg = Manifest.load(exported_dir).inpaint
    assert cfg is not None
    vae, unet, tok = reference_pipe.vae.config, reference_pipe.unet, reference_pipe.tokenizer
    scheduler = json.loads((tiny_models_dir / "sd-inpainting" / "scheduler" / "scheduler_config.json").read_text())
    assert cfg.vae_scaling_factor == vae.scaling_factor
    assert cfg.vae_shift_factor == vae.shift_factor
    assert cfg.vae_scale_factor == reference_pipe.vae_scale_factor
    assert cfg.latent_channels == vae.latent_channels
    assert cfg.unet_in_channels == unet.config.in_channels == 9
    assert cfg.size_multiple == reference_pipe.vae_scale_factor * downsample_factor(unet)
    assert cfg.default_size == unet.config.sample_size * reference_pipe.vae_scale_factor
    assert cfg.max_length == tok.model_max_length == reference_pipe.text_encoder.config.max_position_embeddings
    assert cfg.scheduler == scheduler
    copied = sorted(p.name for p in (exported_dir / cfg.tokenizer_dir).iterdir())
    original = sorted(p.name for p in (tiny_models_dir / "sd-inpainting" / "tokenizer").iterdir())
    assert copied == original
    for name in copied:
        a = (exported_dir / cfg.tokenizer_dir / name).read_bytes()
        assert a == (tiny_models_dir / "sd-inpainting" / "tokenizer" / name).read_bytes(), name


def test_manifest_specs_match_the_models(exported_dir: Path, reference_pipe) -> None:
    from trt_bgswap.specs import text_encoder_spec, unet_spec, vae_decoder_spec, vae_encoder_spec

    models = Manifest.load(exported_dir).models
    te, unet, vae = reference_pipe.text_encoder.config, reference_pipe.unet.config, reference_pipe.vae.config
    assert models["text_encoder"].spec == text_encoder_spec(te.max_position_embeddings, te.hidden_size)
    assert models["unet"].spec == unet_spec(unet.in_channels, unet.out_channels, te.max_position_embeddings, unet.cross_attention_dim)
    assert models["vae_encoder"].spec == vae_encoder_spec(vae.in_channels, vae.latent_channels)
    assert models["vae_decoder"].spec == vae_decoder_spec(vae.out_channels, vae.latent_channels)


def _copy_sd(tiny_models_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "sd"
    shutil.copytree(tiny_models_dir / "sd-inpainting", dst)
    return dst


def _break_missing_index(src: Path) -> None:
    (src / "model_index.json").unlink()


def _break_txt2img_unet(src: Path) -> None:
    config = json.loads((src / "unet" / "config.json").read_text())
    config["in_channels"] = 4
    (src / "unet" / "config.json").write_text(json.dumps(config))


def _break_pickled_only(src: Path) -> None:
    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save({}, src / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()


def _break_missing_component(src: Path) -> None:
    shutil.rmtree(src / "vae")


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_break_missing_index, "no model_index.json"),
        (_break_txt2img_unet, "in_channels=4, an inpainting UNet takes 9"),
        (_break_pickled_only, "only pickled weights"),
        (_break_missing_component, r"lacks \['vae'\]"),
    ],
)
def test_bad_source_is_rejected_with_the_fix(tiny_models_dir: Path, tmp_path: Path, breaker, message: str) -> None:
    src = _copy_sd(tiny_models_dir, tmp_path)
    breaker(src)
    out = tmp_path / "out"
    with pytest.raises(ModelError, match=message):
        export_models(src, None, None, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["sd"], "export left files behind"


def test_failure_midway_leaves_nothing(tiny_models_dir: Path, tmp_path: Path) -> None:
    """The LoRA is bad (foreign module): it fails to fuse once the staging folder exists, before any graph is written."""
    from safetensors.torch import load_file, save_file

    lora = tmp_path / "lora"
    lora.mkdir()
    state = load_file(str(tiny_models_dir / "lcm-lora" / "pytorch_lora_weights.safetensors"))
    state["lora_unet_conv_xyz.lora_down.weight"] = torch.zeros(4, 4)
    state["lora_unet_conv_xyz.lora_up.weight"] = torch.zeros(4, 4)
    save_file(state, str(lora / "pytorch_lora_weights.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="no counterpart"):
        export_models(tiny_models_dir / "sd-inpainting", lora, None, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"], "a half export or staging folder was left behind"


def test_existing_output_needs_overwrite(tiny_models_dir: Path, tmp_path: Path, exported_dir: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(exported_dir, out)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        export_models(tiny_models_dir / "sd-inpainting", None, None, out)
    assert (out / "manifest.json").read_bytes() == before
    m = export_models(tiny_models_dir / "sd-inpainting", None, None, out, overwrite=True)
    assert set(m.models) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"} and m.extra["lora_scale"] is None
    assert Manifest.load(out).models.keys() == m.models.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "old export or staging folder left behind"


def test_unrelated_folder_is_never_replaced(tiny_models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not a model")
    with pytest.raises(UsageError, match="not an exported folder"):
        export_models(tiny_models_dir / "sd-inpainting", None, None, out, overwrite=True)
    assert (out / "holiday.jpg").read_bytes() == b"not a model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_unknown_precision_is_rejected(tiny_models_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="precision='int8'"):
        export_models(tiny_models_dir / "sd-inpainting", None, None, tmp_path / "out", precision="int8")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 2 MiB file system (tmpfs): smaller than a tiny export's staging needs."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_is_refused_before_tracing(tiny_models_dir: Path, small_disk: Path) -> None:
    """CI once filled its disk: onnx's infer_shapes_path wrote an empty file and the fp16 graph came back empty."""
    with pytest.raises(OutputError, match=r"exporting \w+ needs about \d+ MiB but only \d+ MiB are free there; free some space"):
        export_models(tiny_models_dir / "sd-inpainting", None, None, small_disk / "out", precision="fp16")
    assert list(small_disk.iterdir()) == [], "a staging folder was left on the full disk"


def test_an_empty_graph_read_back_is_named(tmp_path: Path) -> None:
    """What infer_shapes_path leaves on a full disk (an empty file) is refused with the fix, not converted."""
    from trt_bgswap.mixed_precision import to_mixed_fp16

    empty = tmp_path / "model.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="read back an empty graph; check the free space"):
        to_mixed_fp16(empty, "unet")
