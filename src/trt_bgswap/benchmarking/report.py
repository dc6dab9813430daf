"""The benchmark report: one JSON document (everything) and a Markdown summary (the tables).

The JSON records the settings, the machine and library versions, the load average before
and after (the machine may be shared), build times, per-stage statistics of both sides,
FLOPs and achieved compute rates against the measured matmul peak, memory, cold starts,
the int8 RMBG's accuracy, the install footprint, and each target of issue 5 as met / not met.
"""

from __future__ import annotations

import datetime as _dt

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trt_bgswap.atomic import write_text_atomic
from trt_bgswap.errors import UsageError
from trt_bgswap.manifest import Manifest

README_START = "<!-- bench:results:start -->"
README_END = "<!-- bench:results:end -->"
STAGES = ("rmbg", "text_encoder", "vae_encoder", "unet", "vae_decoder")
BASELINE_PIPELINES = {"sd15": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLInpaintPipeline"}  # by --family
# Issue 5's targets (ratios ours / baseline, or absolute limits)
TARGET_E2E_RATIO = 0.6
TARGET_COLD_RATIO = 0.5
TARGET_OVERHEAD = 0.03
TARGET_INSTALL_BYTES = 300 * 10**6
TARGET_IMPORT_S = 0.5
IMPORT_KEY = "trt_bgswap.api, onnxruntime"
# Issue 15's targets (small boxes), all on the full-size benchmark, both sides in the same run
TARGET_MEMORY_RATIO = 1.0  # default mode: peak RSS and one cold `run` process at most the baseline's
TARGET_E2E_NOW = 0.83  # default mode end to end: no slower than before issue 15
TARGET_LOW_MEMORY_RATIO = 0.5  # --low-memory peak RSS / the baseline's
TARGET_TINY_VS_FULL = 0.5  # --vae tiny end to end / diffusers with the full VAE
TARGET_TINY_VS_TINY = 0.8  # --vae tiny end to end / diffusers with the same tiny autoencoder
TARGET_FIRST_REQUEST = 1.1  # the first request after load / the second


SCHEMA = "trt-bgswap-bench/1"
FAMILY_MODELS = {  # what --family puts in the run, for the report's note
    "sd15": "SD1.5-inpainting UNet/VAE/CLIP text encoder",
    "sdxl": "SDXL-inpainting UNet/VAE, CLIP ViT-L and OpenCLIP ViT-bigG text encoders",
}
MODE_NOTES = {
    "full": (
        "Random weights give real timings: every model has its published architecture and tensor sizes "
        "({models}, LCM-LoRA rank 64, RMBG-1.4 IS-Net), so latency, memory "
        "and FLOPs are those of the real models; the images themselves are meaningless, and so is the absolute "
        "quality of the int8 masks (their agreement with fp32 is what is measured)."
    ),
    "tiny": (
        "Tiny models: the real architectures at a few channels wide with random weights, so the timings show the "
        "pipeline's structure and overheads, not what the real models cost (run --mode full for that); the images "
        "are meaningless."
    ),
}


def created_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

def _median(stats: Mapping[str, Any] | None) -> float | None:
    return None if stats is None else float(stats["median"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _rate(flops: int | None, seconds: float | None, peak: float) -> dict[str, Any] | None:
    if not flops or not seconds:
        return None
    rate = flops / seconds
    return {"flops": flops, "seconds": seconds, "flops_per_s": rate, "fraction_of_peak": rate / peak}


def _comparison(ours: Mapping[str, Any], baseline: Mapping[str, Any] | None, flops: Mapping[str, Any], peak: float, steps: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}

    def row(name: str, o: float | None, b: float | None, f: int | None) -> None:
        rows[name] = {"ours": o, "baseline": b, "ratio": _ratio(o, b), "ours_rate": _rate(f, o, peak), "baseline_rate": _rate(f, b, peak)}

    for name in STAGES:
        f = flops.get(name, {}).get("total")
        if name == "unet":
            f = f * steps if f else None
        row(name, _median(ours["stages"][name]), _median(baseline["stages"][name]) if baseline else None, f)
    unet_f = flops.get("unet", {}).get("total")
    for i, st in enumerate(ours["unet_steps"]):
        b = baseline["unet_steps"][i] if baseline and i < len(baseline["unet_steps"]) else None
        row(f"unet step {i + 1}", _median(st), _median(b), unet_f)
    ours_pp = sum(float(s["median"]) for s in ours["prepost"].values())
    base_pp = sum(float(s["median"]) for k, s in baseline["prepost"].items() if k != "diffusers_internal") if baseline else None
    row("pre/post-processing + composite", ours_pp, base_pp, None)
    row("non-model time (end-to-end - models)", _median(ours["non_model"]), _median(baseline["non_model"]) if baseline else None, None)
    total_f = sum(int(flops[s]["total"]) * (steps if s == "unet" else 1) for s in STAGES if s in flops)
    row("end-to-end", _median(ours["e2e"]), _median(baseline["e2e"]) if baseline else None, total_f)
    return rows


def _target(name: str, target: str, measured: float | None, limit: float, unit: str) -> dict[str, Any]:
    met = None if measured is None or (isinstance(measured, float) and math.isnan(measured)) else measured <= limit
    return {"name": name, "target": target, "measured": measured, "unit": unit, "met": met}


def _cold(side: Mapping[str, Any] | None) -> str:
    """A side's median cold start, with every sample when there are several."""
    if not side:
        return "-"
    samples = side.get("samples", [])
    text = _s(side["to_first_image"]) + (f" ({', '.join(f'{x:.1f}' for x in samples)})" if len(samples) > 1 else "")
    read = [b for b in side.get("disk_read_samples", []) if b is not None]
    return text + (f", disk read {max(read) / 1e9:.1f} GB at most" if read else "")


def _targets(ours: Mapping[str, Any], baseline: Mapping[str, Any] | None, cold: Mapping[str, Any], footprint: Mapping[str, Any]) -> list[dict[str, Any]]:
    e2e_ratio = _ratio(_median(ours["e2e"]), _median(baseline["e2e"]) if baseline else None)
    cold_ratio = None
    if "ours" in cold and "baseline" in cold:
        cold_ratio = cold["ours"]["to_first_image"] / cold["baseline"]["to_first_image"]
    mem_ratio = _ratio(float(ours["peak_rss"]), float(baseline["peak_rss"]) if baseline else None)
    overhead = _median(ours["non_model"]) / _median(ours["e2e"])  # type: ignore[operator]
    return [
        _target("end-to-end warm latency", f"<= {TARGET_E2E_RATIO}x baseline", e2e_ratio, TARGET_E2E_RATIO, "x baseline"),
        _target("cold start of `trt-bgswap run`", f"<= {TARGET_COLD_RATIO}x baseline script", cold_ratio, TARGET_COLD_RATIO, "x baseline"),
        _target("peak memory (RSS)", "<= baseline", mem_ratio, 1.0, "x baseline"),
        _target("pipeline overhead (end-to-end - model stages)", f"< {TARGET_OVERHEAD:.0%} of end-to-end", overhead, TARGET_OVERHEAD, "fraction"),
        _target("runtime install size (no extras)", "< 300 MB", footprint["install"]["total_bytes"] / 1e6, TARGET_INSTALL_BYTES / 1e6, "MB"),
        _target("runtime import time (API + onnxruntime)", "< 0.5 s", footprint["import"].get(IMPORT_KEY), TARGET_IMPORT_S, "s"),
    ]


def _targets_small_boxes(
    ours: Mapping[str, Any], baseline: Mapping[str, Any] | None, variants: Mapping[str, Any], cold: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Issue 15's acceptance, each measured in this run (None where a side was not run)."""
    low, tiny, base_tiny = variants.get("ours_low_memory"), variants.get("ours_vae_tiny"), variants.get("baseline_vae_tiny")
    co, cb = cold.get("ours"), cold.get("baseline")
    order = ours.get("requests_in_order") or []
    return [
        _target("default mode: peak RSS", f"<= {TARGET_MEMORY_RATIO}x baseline", _ratio(ours["peak_rss"], baseline["peak_rss"] if baseline else None), TARGET_MEMORY_RATIO, "x baseline"),
        _target("default mode: one cold `run` process's peak RSS", f"<= {TARGET_MEMORY_RATIO}x baseline script", _ratio(co["peak_rss"], cb["peak_rss"]) if co and cb else None, TARGET_MEMORY_RATIO, "x baseline"),
        _target("default mode: end to end", f"<= {TARGET_E2E_NOW}x baseline", _ratio(_median(ours["e2e"]), _median(baseline["e2e"]) if baseline else None), TARGET_E2E_NOW, "x baseline"),
        _target("--low-memory: peak RSS", f"<= {TARGET_LOW_MEMORY_RATIO}x baseline", _ratio(low["peak_rss"], baseline["peak_rss"]) if low and baseline else None, TARGET_LOW_MEMORY_RATIO, "x baseline"),
        _target("cold start of `trt-bgswap run`", f"<= {TARGET_COLD_RATIO}x baseline script", _ratio(co["to_first_image"], cb["to_first_image"]) if co and cb else None, TARGET_COLD_RATIO, "x baseline"),
        _target("first request after load", f"<= {TARGET_FIRST_REQUEST}x the second", order[0] / order[1] if len(order) > 1 else None, TARGET_FIRST_REQUEST, "x second"),
        _target("--vae tiny: end to end", f"<= {TARGET_TINY_VS_FULL}x diffusers (full VAE)", _ratio(_median(tiny["e2e"]), _median(baseline["e2e"])) if tiny and baseline else None, TARGET_TINY_VS_FULL, "x baseline"),
        _target("--vae tiny: end to end", f"<= {TARGET_TINY_VS_TINY}x diffusers with the same tiny autoencoder", _ratio(_median(tiny["e2e"]), _median(base_tiny["e2e"])) if tiny and base_tiny else None, TARGET_TINY_VS_TINY, "x diffusers+TAESD"),
    ]


def build_report(
    *,
    settings: Any,
    machine_info: Mapping[str, Any],
    threads: int,
    load_before: Any,
    load_after: Any,
    timeline: Mapping[str, float],
    export_reused: bool,
    build: Mapping[str, Any],
    flops: Mapping[str, Any],
    peak: Mapping[str, Any],
    ours: Mapping[str, Any],
    baseline: Mapping[str, Any] | None,
    cold: Mapping[str, Any],
    footprint: Mapping[str, Any],
    started: float,
    manifest: Manifest,
    applied: Mapping[str, bool],
    errors: list[str],
    variants: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    assert manifest.inpaint is not None and manifest.rmbg is not None
    comparison = _comparison(ours, baseline, flops, float(peak["peak_flops"]), settings.steps)
    return {
        "schema": SCHEMA,
        "note": MODE_NOTES[settings.mode].format(models=FAMILY_MODELS[settings.family]),
        "created": created_now(),
        "command": settings.command,
        "settings": {**settings.to_json(), "threads_used": threads, "applied": dict(applied)},
        "errors": list(errors),
        "wall_seconds": time.time() - started,
        "workload": {
            "generation_size": [manifest.inpaint.default_size, manifest.inpaint.default_size],
            "rmbg_input": list(manifest.rmbg.input_size),
            "steps": settings.steps,
            "guidance": settings.guidance,
            "photo": settings.photo,
            "precision": manifest.precision,
        },
        "machine": {**machine_info, "load_average_before": load_before, "load_average_after": load_after, "note": settings.note},
        "timeline_seconds": dict(timeline),
        "build": {"export_reused": export_reused, "models": dict(build)},
        "flops": dict(flops),
        "matmul_peak": dict(peak),
        "ours": dict(ours),
        "baseline": dict(baseline) if baseline is not None else None,
        "comparison": comparison,
        "cold_start": dict(cold),
        "footprint": dict(footprint),
        "targets": _targets(ours, baseline, cold, footprint),
        "variants": dict(variants or {}),
        "targets_small_boxes": _targets_small_boxes(ours, baseline, variants or {}, cold),
    }


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def _gflops(r: Mapping[str, Any] | None) -> str:
    return "-" if r is None else f"{r['flops_per_s'] / 1e9:.0f} ({r['fraction_of_peak']:.0%})"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The tables people read; every number is also in the JSON."""
    s, w, m, o, b = report["settings"], report["workload"], report["machine"], report["ours"], report["baseline"]
    lines = [
        f"### {s['mode']} models, {w['generation_size'][0]}x{w['generation_size'][1]}, {w['steps']} steps, guidance {w['guidance']}, "
        f"RMBG {w['rmbg_input'][0]}x{w['rmbg_input'][1]} ({report['created']})",
        "",
        f"> {report['note']}",
        "",
        f"- command: `{report['command']}`" if report["command"] else "- command: (Python API)",
        f"- machine: {m['cpu']}, {m['usable_cores']} usable cores, {_gb(m['memory_bytes'])} RAM, {m['os']}; "
        f"threads {s['threads_used']}; load average before/after {m['load_average_before']} / {m['load_average_after']}"
        + (f"; {m['note']}" if m.get("note") else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- ours: ONNX Runtime {s['backend']} ({', '.join(sorted(set(o['backends'].values())))}), pre-optimized graphs"
        + (", fused attention (UNet) / LayerNorm (text encoder)" if s["applied"]["fuse"] else "")
        + (", static int8 RMBG" if s["applied"]["int8_rmbg"] else ", fp32 RMBG"),
        f"- baseline: diffusers {BASELINE_PIPELINES.get(s.get('family', 'sd15'), 'StableDiffusionInpaintPipeline')} + LCMScheduler, LoRA fused; RMBG IS-Net in PyTorch; {b['backends']['all']}" if b else "- baseline: not run",
        f"- timing: {s['warmup']} warm-up run(s), then {s['runs']} timed; median shown (min / p90 in the JSON); "
        f"matmul peak {report['matmul_peak']['peak_flops'] / 1e9:.0f} GFLOP/s (fp32 GEMM measured in this run)",
        "",
        "| stage | ours (median) | baseline (median) | ours / baseline | GFLOP | ours GFLOP/s (% of peak) | baseline GFLOP/s (% of peak) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["comparison"].items():
        fl = r["ours_rate"]["flops"] / 1e9 if r["ours_rate"] else None
        lines.append(
            f"| {name} | {_s(r['ours'])} | {_s(r['baseline'])} | {_x(r['ratio'])} | {'-' if fl is None else f'{fl:.1f}'} | "
            f"{_gflops(r['ours_rate'])} | {_gflops(r['baseline_rate'])} |"
        )
    lines += ["", "| measure | ours | baseline | ours / baseline |", "|---|---:|---:|---:|"]
    lines.append(f"| peak RSS | {_gb(o['peak_rss'])} | {_gb(b['peak_rss']) if b else '-'} | {_x(_ratio(o['peak_rss'], b['peak_rss']) if b else None)} |")
    lines.append(f"| warm load (sessions / pipeline) | {_s(o['load_seconds'])} | {_s(b['load_seconds']) if b else '-'} | {_x(_ratio(o['load_seconds'], b['load_seconds']) if b else None)} |")
    cold = report["cold_start"]
    if cold:
        co, cb = cold.get("ours"), cold.get("baseline")
        n = len((co or cb or {}).get("samples", [None]))
        lines.append(
            f"| peak RSS of one cold `run` process{f' (largest of {n})' if n > 1 else ''} | {_gb(co['peak_rss']) if co else '-'} | {_gb(cb['peak_rss']) if cb else '-'} | "
            f"{_x(_ratio(co['peak_rss'], cb['peak_rss']) if co and cb else None)} |"
        )
        lines.append(
            f"| cold start (launch -> image written{f', median of {n}, interleaved' if n > 1 else ''}; file cache {(co or cb or {}).get('cache', 'as-found')}) | {_cold(co)} | {_cold(cb)} | "
            f"{_x(_ratio(co['to_first_image'], cb['to_first_image']) if co and cb else None)} |"
        )
    lines.append(f"| end-to-end images/s (sequential) | {o['throughput']['e2e_images_per_s']:.3f} | {b['throughput']['e2e_images_per_s']:.3f} |" + (f" {_x(_ratio(o['throughput']['e2e_images_per_s'], b['throughput']['e2e_images_per_s']))} |" if b else " - |") if b else f"| end-to-end images/s | {o['throughput']['e2e_images_per_s']:.3f} | - | - |")
    lines += _stage_memory_lines(o, b)
    lines += ["", "| batch | RMBG images/s (ours) | UNet samples/s (ours) |", "|---:|---:|---:|"]
    for k, v in o["throughput"].items():
        if k.startswith("batch"):
            lines.append(f"| {k[5:]} | {v['rmbg_images_per_s']:.2f} | {v['unet_samples_per_s']:.3f} |")
    if o.get("rmbg_fp32"):
        q = o["rmbg_fp32"]
        lines += [
            "",
            f"RMBG int8 (static, QDQ) vs fp32, model alone: {_s(_median(q['pipeline_model']))} vs {_s(_median(q['model']))} "
            f"({_x(_ratio(_median(q['pipeline_model']), _median(q['model'])))}); mask agreement on {len(q['agreement'])} real photos: "
            f"mean IoU {q['mean_iou']:.4f}, mean MAE {q['mean_mae']:.5f} (per photo in the JSON).",
        ]
    if o.get("unfused"):
        lines += ["", "| transformer fusions (same inputs, batch 1) | fused | exported graph, ONNX Runtime 'all' | fused / unfused |", "|---|---:|---:|---:|"]
        for name, v in o["unfused"].items():
            lines.append(f"| {name} | {_s(_median(v['fused']))} | {_s(_median(v['unfused']))} | {_x(_ratio(_median(v['fused']), _median(v['unfused'])))} |")
    lines += ["", "| build step | seconds |", "|---|---:|"]
    for k, v in report["timeline_seconds"].items():
        lines.append(f"| {k} | {v:.1f} |")
    if report["errors"]:
        lines += ["", "Errors (the run continued without the failed part):", ""] + [f"- {' '.join(e.split())[:400]}" for e in report["errors"]]
    lines += ["", f"Total wall time of the benchmark: {report['wall_seconds'] / 60:.1f} min.", ""]
    lines += _variant_lines(report)
    for title, key in (("target (issue 5)", "targets"), ("target (issue 15, small boxes)", "targets_small_boxes")):
        lines += ["", f"| {title} | measured | met |", "|---|---:|:---:|"]
        for t in report.get(key) or []:
            meas = "-" if t["measured"] is None else (f"{t['measured']:.1%}" if t["unit"] == "fraction" else f"{t['measured']:.3g} {t['unit']}")
            met = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
            lines.append(f"| {t['name']}: {t['target']} | {meas} | {met} |")
    return "\n".join(lines) + "\n"


def _load(side: Mapping[str, Any]) -> str:
    la = side.get("load_average") or {}
    start, end = la.get("start"), la.get("end")
    return "-" if not start or not end else f"{start[0]:.1f} / {end[0]:.1f}"


VARIANT_ROWS = (
    ("ours", "trt-bgswap (default)"),
    ("ours_low_memory", "trt-bgswap --low-memory"),
    ("ours_vae_tiny", "trt-bgswap --vae tiny"),
    ("baseline", "diffusers (full VAE)"),
    ("baseline_vae_tiny", "diffusers + the same tiny autoencoder"),
)


def _variant_lines(report: Mapping[str, Any]) -> list[str]:
    """Issue 15's rows side by side: end to end, peak memory, load, first request; ratios to both diffusers rows."""
    sides = {"ours": report["ours"], "baseline": report["baseline"], **(report.get("variants") or {})}
    if len(sides) <= 2 and not report.get("variants"):
        return []
    base, base_tiny = sides.get("baseline"), sides.get("baseline_vae_tiny")
    lines = [
        "",
        "| row (each in its own process) | end to end (median) | peak RSS | load | first / second request | vs diffusers (full VAE) | vs diffusers + tiny AE | load average (1 min) start / end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in VARIANT_ROWS:
        r = sides.get(key)
        if r is None:
            continue
        e2e = _median(r["e2e"])
        extra = f" ({r['session_opens']} session opens)" if r.get("session_opens") is not None else ""
        lines.append(
            f"| {label}{extra} | {_s(e2e)} | {_gb(r['peak_rss'])} | {_s(r['load_seconds'])} | {_first_vs_second(r)} | "
            f"{_x(_ratio(e2e, _median(base['e2e'])) if base else None)} | {_x(_ratio(e2e, _median(base_tiny['e2e'])) if base_tiny else None)} | "
            f"{_load(r)} |"
        )
    low = (report.get("cold_start") or {}).get("ours_low_memory")
    if low:
        lines.append(f"| cold `run --low-memory` process | {_s(low['to_first_image'])} to the image | {_gb(low['peak_rss'])} | - | - | - | - | - |")
    return lines


def _first_vs_second(side: Mapping[str, Any] | None) -> str:
    order = (side or {}).get("requests_in_order") or []
    return "-" if len(order) < 2 else f"{_s(order[0])} / {_s(order[1])} ({_x(order[0] / order[1])})"


def _stage_memory_lines(o: Mapping[str, Any], b: Mapping[str, Any] | None) -> list[str]:
    """The process's own peak while each model stage ran, and what the stage added over the RSS at its start."""
    om, bm = o.get("stage_memory") or {}, (b or {}).get("stage_memory") or {}
    if not om.get("peak"):
        return []
    lines = [
        "",
        "| memory per stage: peak RSS while it ran (its own rise) | ours | baseline |",
        "|---|---:|---:|",
    ]
    for name in STAGES:

        def cell(m: Mapping[str, Any]) -> str:
            peak = m.get("peak", {}).get(name)
            return "-" if peak is None else f"{_gb(peak)} (+{m['rise'][name] / 2**20:.0f} MiB)"

        lines.append(f"| {name} | {cell(om)} | {cell(bm)} |")
    lines.append(f"| first / second request after load | {_first_vs_second(o)} | {_first_vs_second(b)} |")
    return lines


def update_readme(readme: str | Path, markdown: str, start: str = README_START, end: str = README_END) -> None:
    """Replace the block between the results markers (``start`` ... ``end``) of ``readme`` with ``markdown``."""
    path = Path(readme)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if start not in text or end not in text:
        raise UsageError(f"{path}: no '{start}' ... '{end}' block to replace; add the two markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    write_text_atomic(path, f"{head}{start}\n{markdown}{end}{tail}")
