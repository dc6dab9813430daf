"""`trt-bgswap bench`: the quick mode's report structure (never its timings), the FLOP counter, the README block.

The FLOP counter is checked against PyTorch's own ``torch.utils.flop_counter.FlopCounterMode``
on the same tiny models (attention run through diffusers'/transformers' explicit-matmul
implementations, whose products the counter sees; its CPU fused SDPA kernel is not counted
by FlopCounterMode).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trt_bgswap.benchmarking.report import README_END, README_START, update_readme
from trt_bgswap.cli import main
from trt_bgswap.errors import UsageError

STAGES = ("rmbg", "text_encoder", "vae_encoder", "unet", "vae_decoder")
STATS_KEYS = {"n", "min", "median", "p90", "mean"}


def _check_stats(stats: dict, where: str, n: int) -> None:
    assert set(stats) == STATS_KEYS, f"{where}: stats keys {sorted(stats)}"
    assert stats["n"] == n, f"{where}: {stats['n']} samples, expected {n}"
    assert 0.0 <= stats["min"] <= stats["median"] <= stats["p90"], f"{where}: min/median/p90 out of order: {stats}"


@pytest.fixture(scope="module")
def quick_report(tiny_models_dir: Path, exported_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("bench")
    readme = work / "README.md"
    readme.write_text(f"# results\n\n{README_START}\nold\n{README_END}\n\ntail\n", encoding="utf-8")
    argv = [
        "-q", "bench", "--mode", "tiny", "--work", str(work / "work"), "--out", str(work / "results"),
        "--sources", str(tiny_models_dir), "--export", str(exported_dir), "--warmup", "0", "--runs", "2",
        "--batch-sizes", "1,2", "--readme", str(readme), "--note", "test run", "--cold-runs", "2",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((work / "results" / "tiny.json").read_text(encoding="utf-8"))
    return report, work


@pytest.mark.slow  # the whole tiny benchmark (about 80 s): out of the default suite's 10 minutes; run with -m slow
def test_quick_report_records_the_run(quick_report: tuple[dict, Path]) -> None:
    report, _ = quick_report
    assert report["schema"] == "trt-bgswap-bench/1"
    # tiny models are not the published sizes: the note must not claim real-model timings (issue 8, item 11)
    assert report["note"].startswith("Tiny models:") and "published architecture" not in report["note"], report["note"]
    assert report["command"].startswith("trt-bgswap bench --mode tiny")
    assert report["settings"]["runs"] == 2 and report["settings"]["steps"] == 4 and report["settings"]["guidance"] == 1.0
    m = report["machine"]
    for key in ("cpu", "usable_cores", "memory_bytes", "versions", "load_average_before", "load_average_after"):
        assert key in m, f"machine lacks {key}"
    assert m["note"] == "test run"
    for pkg in ("onnxruntime", "numpy", "torch", "diffusers"):
        assert pkg in m["versions"], f"versions lack {pkg}"
    assert report["matmul_peak"]["peak_flops"] > 0


@pytest.mark.slow  # the whole tiny benchmark (about 80 s): out of the default suite's 10 minutes; run with -m slow
@pytest.mark.parametrize("side", ["ours", "baseline"])
def test_quick_report_has_every_stage(quick_report: tuple[dict, Path], side: str) -> None:
    report, _ = quick_report
    r = report[side]
    _check_stats(r["e2e"], f"{side}.e2e", 2)
    _check_stats(r["non_model"], f"{side}.non_model", 2)
    for stage in STAGES:
        _check_stats(r["stages"][stage], f"{side}.stages.{stage}", 2)
        assert r["stages"][stage]["min"] > 0, f"{side}: stage {stage} was never timed"
    assert len(r["unet_steps"]) == 4, f"{side}: {len(r['unet_steps'])} UNet steps timed, expected 4"
    for i, st in enumerate(r["unet_steps"]):
        _check_stats(st, f"{side}.unet_steps[{i}]", 2)
    assert r["prepost"], f"{side}: no pre/post-processing timings"
    assert r["peak_rss"] >= r["rss_after_load"] > 0
    assert len(r["requests_in_order"]) == 2  # warm-up 0 + 2 runs: the first request after load is recorded
    memory = r["stage_memory"]
    if memory["per_stage_available"]:  # the process's own peak while each stage ran (issue 15)
        for stage in STAGES:
            assert 0 < memory["peak"][stage] <= r["peak_rss"], f"{side}: {stage} peak {memory['peak'][stage]} vs process {r['peak_rss']}"
            assert 0 <= memory["rise"][stage] <= memory["peak"][stage]
    # model stages happen inside the end-to-end runs: their sum cannot exceed the slowest run
    for run_max, stage_sum in [(r["e2e"]["p90"] * 1.0001 + 1e-9, sum(r["stages"][s]["min"] for s in STAGES))]:
        assert stage_sum <= run_max, f"{side}: stage minima sum to {stage_sum} s, more than a whole run ({run_max} s)"


@pytest.mark.slow  # the whole tiny benchmark (about 80 s): out of the default suite's 10 minutes; run with -m slow
def test_quick_report_has_the_small_box_rows(quick_report: tuple[dict, Path]) -> None:
    """Issue 15: --low-memory, --vae tiny and diffusers with the same tiny autoencoder, each in its own worker; the targets listed."""
    report, work = quick_report
    v = report["variants"]
    assert set(v) == {"ours_low_memory", "ours_vae_tiny", "baseline_vae_tiny"}, sorted(v)
    for name, r in v.items():
        _check_stats(r["e2e"], f"{name}.e2e", 2)
        assert r["peak_rss"] > 0 and r["stage_memory"]["peak"], name
        assert len(r["load_average"]["start"]) == 3, name
    assert v["ours_low_memory"]["session_opens"] >= 2 * len(STAGES) - 1  # sessions open per request (a repeated prompt skips one)
    assert "throughput" not in v["ours_low_memory"], "the variant rows skip the default row's extra comparisons"
    assert report["cold_start"]["ours_low_memory"]["peak_rss"] > 0
    names = {t["name"] for t in report["targets_small_boxes"]}
    assert {"--low-memory: peak RSS", "--vae tiny: end to end", "first request after load"} <= names
    md = (work / "results" / "tiny.md").read_text(encoding="utf-8")
    for row in ("trt-bgswap --low-memory", "trt-bgswap --vae tiny", "diffusers + the same tiny autoencoder", "memory per stage", "issue 15"):
        assert row in md, f"the Markdown report lacks {row!r}"


@pytest.mark.slow  # the whole tiny benchmark (about 80 s): out of the default suite's 10 minutes; run with -m slow
def test_quick_report_compares_flops_targets_and_int8(quick_report: tuple[dict, Path]) -> None:
    report, _ = quick_report
    for stage in STAGES:
        f = report["flops"][stage]
        assert f["total"] > 0 and not f["uncounted"], f"{stage}: FLOPs {f}"
        assert report["comparison"][stage]["ratio"] is not None
    assert report["comparison"]["end-to-end"]["ours_rate"]["fraction_of_peak"] > 0
    names = [t["name"] for t in report["targets"]]
    assert len(names) == 6 and all(t["met"] in (True, False) for t in report["targets"]), report["targets"]
    q = report["ours"]["rmbg_fp32"]
    assert set(q["agreement"]) and 0.0 <= q["mean_iou"] <= 1.0 and q["mean_mae"] >= 0.0
    assert report["build"]["models"]["rmbg"]["kind"] == "int8"
    assert report["build"]["models"]["unet"]["kind"] == "fused"
    for model in ("unet", "text_encoder"):  # a claimed speed-up is measured: fused and unfused on the same inputs
        _check_stats(report["ours"]["unfused"][model]["fused"], f"{model} fused", 2)
        _check_stats(report["ours"]["unfused"][model]["unfused"], f"{model} unfused", 2)
    for side in ("ours", "baseline"):
        c = report["cold_start"][side]
        assert 0 < c["to_first_image"] <= c["process_wall"], f"cold start {side}: {c}"
        assert len(c["samples"]) == 2 and min(c["samples"]) <= c["to_first_image"] <= max(c["samples"]), c
        assert c["cache"] == "primed" and len(c["disk_read_samples"]) == 2, "the default condition: each launch primed by an untimed one"
    assert report["footprint"]["install"]["total_bytes"] > 0
    for b in ("batch1", "batch2"):
        assert report["ours"]["throughput"][b]["rmbg_images_per_s"] > 0


@pytest.mark.slow  # the whole tiny benchmark (about 80 s): out of the default suite's 10 minutes; run with -m slow
def test_quick_markdown_and_readme(quick_report: tuple[dict, Path]) -> None:
    report, work = quick_report
    md = (work / "results" / "tiny.md").read_text(encoding="utf-8")
    assert "> Tiny models: the real architectures at a few channels wide" in md
    for row in (*STAGES, "unet step 4", "end-to-end", "non-model time", "peak RSS", "cold start", "target (issue 5)"):
        assert f"| {row}" in md, f"the Markdown has no row {row!r}"
    readme = (work / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("# results\n") and readme.endswith("\n\ntail\n") and "\nold\n" not in readme
    assert md in readme


def test_readme_without_markers_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text("# no block\n", encoding="utf-8")
    with pytest.raises(UsageError, match="bench:results:start"):
        update_readme(path, "table\n")
    assert path.read_text(encoding="utf-8") == "# no block\n"


def test_bench_help_documents_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--mode", "--runs", "--warmup", "--threads", "--backend", "--readme", "--no-baseline", "--batch-sizes", "Random weights"):
        assert option in out, f"bench --help does not mention {option}"


def _torch_flops(model: str, tiny_models_dir: Path, dims: dict) -> int:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextModel

    sd = tiny_models_dir / "sd-inpainting"
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if model == "unet":
            m = UNet2DConditionModel.from_pretrained(sd / "unet").eval()
            m.set_attn_processor(AttnProcessor())
            m(torch.zeros(dims["sample"]), torch.full(dims["timestep"], 500.0), encoder_hidden_states=torch.zeros(dims["encoder_hidden_states"]))
        elif model == "vae_decoder":
            v = AutoencoderKL.from_pretrained(sd / "vae").eval()
            v.set_attn_processor(AttnProcessor())
            v.decoder(v.post_quant_conv(torch.zeros(dims["latent_sample"])))
        else:
            t = CLIPTextModel.from_pretrained(sd / "text_encoder", attn_implementation="eager").eval()
            t(torch.zeros(dims["input_ids"], dtype=torch.long))
    return int(counter.get_total_flops())


@pytest.mark.parametrize(
    "model, dims",
    [
        ("unet", {"sample": [1, 9, 16, 24], "timestep": [1], "encoder_hidden_states": [1, 77, 32]}),
        ("vae_decoder", {"latent_sample": [1, 4, 16, 16]}),
        ("text_encoder", {"input_ids": [1, 77]}),
    ],
)
def test_flop_counter_matches_pytorch(exported_dir: Path, tiny_models_dir: Path, model: str, dims: dict) -> None:
    from trt_bgswap.benchmarking.flops import count_flops

    ours = count_flops(exported_dir / model / "model.onnx", dims)
    ref = _torch_flops(model, tiny_models_dir, dims)
    assert not ours.uncounted
    assert ours.total == ref, f"{model}: ONNX count {ours.total} vs torch FlopCounterMode {ref} (diff {ours.total - ref})"


def test_flop_counter_counts_fused_attention_like_the_unfused_graph(exported_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trt_bgswap.benchmarking.flops import count_flops
    from trt_bgswap.engines.fusion import fuse_transformer
    from trt_bgswap.engines.winograd import MIN_CHANNELS_ENV

    # the product's fused graph: the Winograd rewrite (opt-in; the suite turns it on) changes what the convolutions
    # cost by design, and its shape-computed tiles are beyond the counter's static shapes (the bench counts the export)
    monkeypatch.setenv(MIN_CHANNELS_ENV, "0")

    dims = {"sample": [1, 9, 16, 16], "timestep": [1], "encoder_hidden_states": [1, 77, 32]}
    fused_path = tmp_path / "fused.onnx"
    fused_ops = fuse_transformer(exported_dir / "unet" / "model.onnx", fused_path, "unet", {"B": 1, "h": 16, "w": 16}, None)
    assert fused_ops.get("MultiHeadAttention", 0) + fused_ops.get("Attention", 0) > 0, fused_ops
    plain = count_flops(exported_dir / "unet" / "model.onnx", dims)
    fused = count_flops(fused_path, dims)
    assert fused.nodes.get("MultiHeadAttention", 0) + fused.nodes.get("Attention", 0) > 0
    # attention and the other products count the same fused or not; the fusion step also computes the
    # upsampling convolutions on the small image (engines/upsample.py): 16 of 36 multiply-adds of those
    attention = fused.by_op.get("MatMul", 0) + fused.by_op.get("MultiHeadAttention", 0) + fused.by_op.get("Attention", 0)
    assert attention == plain.by_op["MatMul"] and fused.by_op.get("Gemm") == plain.by_op.get("Gemm"), (fused.by_op, plain.by_op)
    taken_off = plain.by_op["Conv"] - fused.by_op["Conv"]
    upsampling = 9 * taken_off / 5  # the rewritten convolutions' FLOPs in the export
    assert taken_off > 0 and upsampling < plain.by_op["Conv"] and upsampling == int(upsampling), (fused.by_op, plain.by_op)
