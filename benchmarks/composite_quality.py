"""Composite quality (issue 13): clean edges, full-resolution alpha, grain and light matching.

    python benchmarks/composite_quality.py            # ~35 composites; writes benchmarks/results/composite.{json,md}
                                                      # and the table in benchmarks/README.md
    python benchmarks/composite_quality.py --count 10 --no-readme     # a quick look

Needs the test extra (scikit-image: photos and CIEDE2000); ``pip install pymatting`` adds its
``estimate_foreground_ml`` as the reference row (it is not a dependency of the project).
Every number comes from composites with a known truth (:mod:`trt_bgswap.benchmarking.mattes`):

- **edges**: ``I = a*F + (1-a)*B`` put on a solid colour with the TRUE alpha (the
  ``--bg-color`` + ``--mask`` case), error in the soft band (0.02 < a < 0.98) against
  ``a*F + (1-a)*C``, for naive compositing, ours (``compose``'s default) and pymatting; core
  pixels (a = 1) must be the input's; time per megapixel. Also with a masker-like alpha
  (the true one at 1024 per 4000 px and back), where the estimate must still not hurt.
- **alpha**: the masker simulated at several photo/mask size ratios; boundary error and IoU of
  the plain resized alpha vs the refined one, and the end-to-end edge error of the composite.
- **grain**: subjects with known added noise; the background (a photo at 1/7 size, Lanczos-
  upscaled like a generated one) after grain matching, its noise measured against the known one.
- **light**: a subject under a known cast; the new background under another light (the same
  scene relit, and other scenes); CIEDE2000 of the subject to itself truly lit by the new light,
  before and after ``harmonize``, against a bounded mean/std transfer in OKLab (Reinhard et al.).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from trt_bgswap.atomic import write_text_atomic
from trt_bgswap.benchmarking.machine import cpu_model, library_versions, load_average
from trt_bgswap.benchmarking.mattes import (
    EDGE_KINDS,
    NEW_COLOURS,
    SOFT,
    MatteCase,
    boundary_metrics,
    fit_photo,
    matte_cases,
    render_alpha,
    scene_photo,
    simulated_mask,
    soft_band_error,
    truth_on,
)
from trt_bgswap.benchmarking.photos import load_photo
from trt_bgswap.benchmarking.report import update_readme
from trt_bgswap.runtime.compose import CompositeOptions, compose
from trt_bgswap.runtime.composite import composite, solid_background
from trt_bgswap.runtime.foreground import estimate_foreground
from trt_bgswap.runtime.grain import estimate_noise, match_grain
from trt_bgswap.runtime.guided_filter import MIN_UPSCALE, refine_alpha_to_photo
from trt_bgswap.runtime.harmonize import linear_to_oklab, linear_to_srgb, oklab_to_linear, srgb_to_linear
from trt_bgswap.runtime.mask_ops import dilate
from trt_bgswap.runtime.resize import resize_bilinear

README_START = "<!-- composite:results:start -->"
README_END = "<!-- composite:results:end -->"
ROOT = Path(__file__).resolve().parent
MASK_SIDE = 1024  # RMBG-1.4's input
PHOTO_SIDES = (4000, 2000, 1280)  # photo long sides the masker's alpha is simulated for (at MASK_SIDE)
NOISE_SIGMAS = (3.0, 6.0, 10.0)
GRAIN_UPSCALE = 7.0  # 4000x3000 from 576x448
GRAIN_TOLERANCE = 0.25  # the acceptance: within 25 % of the subject's noise
CASTS = (  # (old light, new light) as linear-RGB gains: warm -> cool, cool -> warm, neutral -> warm, warm -> neutral, dimmer
    ((1.2, 1.0, 0.75), (0.8, 1.0, 1.25)),
    ((0.8, 1.0, 1.25), (1.2, 1.0, 0.75)),
    ((1.0, 1.0, 1.0), (1.15, 1.0, 0.85)),
    ((1.1, 1.0, 0.9), (1.0, 1.0, 1.0)),
    ((1.0, 1.0, 1.0), (0.6, 0.6, 0.6)),
)
LIGHT_SUBJECTS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina")
LIGHT_BACKGROUNDS = ("grass", "brick", "gravel", "coffee", "rocket", "chelsea", "astronaut")


def _kind(case: MatteCase) -> str:
    return case.name.split("-")[1]


def _pymatting() -> Any:
    try:
        from pymatting import estimate_foreground_ml
    except ImportError:
        return None
    return estimate_foreground_ml


# --- edges: foreground colour estimation -------------------------------------------------------


def bench_edges(cases: list[MatteCase], with_pymatting: bool) -> dict[str, Any]:
    ml = _pymatting() if with_pymatting else None
    if ml is not None:  # compile its numba kernels before timing
        ml(cases[0].image[:64, :64].astype(np.float64) / 255.0, cases[0].alpha[:64, :64].astype(np.float64))
    err: dict[str, float] = defaultdict(float)
    count = 0
    by_kind: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    per_case: list[dict[str, Any]] = []
    seconds: dict[str, float] = defaultdict(float)
    core_mismatches = 0
    masker_err: dict[str, float] = defaultdict(float)
    megapixels = 0.0
    for i, case in enumerate(cases):
        h, w = case.alpha.shape
        megapixels += h * w / 1e6
        colour = NEW_COLOURS[i % len(NEW_COLOURS)]
        bg = solid_background(colour, w, h)
        outs = {"naive": composite(case.image, bg, case.alpha)}
        t = time.perf_counter()
        outs["ours"], _ = compose(case.image, bg, case.alpha, CompositeOptions())
        seconds["ours"] += time.perf_counter() - t
        t = time.perf_counter()
        estimate_foreground(case.image, case.alpha)
        seconds["estimate"] += time.perf_counter() - t
        core = case.alpha >= 1.0
        core_mismatches += int(np.count_nonzero(outs["ours"][core] != case.image[core]))
        if ml is not None:
            t = time.perf_counter()
            f = ml(case.image.astype(np.float64) / 255.0, case.alpha.astype(np.float64))
            seconds["pymatting"] += time.perf_counter() - t
            a = case.alpha[..., None]
            pm = np.clip(np.rint(a * f * 255.0 + (1.0 - a) * np.asarray(colour, np.float64)), 0, 255).astype(np.uint8)
            outs["pymatting"] = np.where(core[..., None], case.image, pm)
        row: dict[str, Any] = {"case": case.name}
        for name, out in outs.items():
            e, n = soft_band_error(case, out, colour)
            err[name] += e
            by_kind[_kind(case)][name] += e
            row[name] = e / n
        count += n
        per_case.append(row)
        # A masker's alpha instead of the truth (what a user without --mask gets): must not hurt.
        side = round(MASK_SIDE * max(h, w) / PHOTO_SIDES[0])
        est = simulated_mask(case.alpha, side)
        region = ((case.alpha > SOFT[0]) & (case.alpha < SOFT[1])) | ((est > SOFT[0]) & (est < SOFT[1]))
        truth = truth_on(case, colour)
        for name, opts in (("naive", CompositeOptions(decontaminate=False)), ("ours", CompositeOptions())):
            out, _ = compose(case.image, bg, est, opts)
            masker_err[name] += float(np.abs(out[region].astype(np.float64) - truth[region]).mean())
    result: dict[str, Any] = {
        "composites": len(cases),
        "size": list(cases[0].alpha.shape),
        "soft_band_values": count,
        "mae": {k: v / count for k, v in err.items()},
        "ratio": {k: v / err["naive"] for k, v in err.items()},
        "ratio_by_kind": {k: {m: v[m] / v["naive"] for m in err} for k, v in by_kind.items()},
        "core_mismatches": core_mismatches,
        "seconds_per_megapixel": {k: v / megapixels for k, v in seconds.items()},
        "per_case_ratio_max": max(r["ours"] / r["naive"] for r in per_case),
        "masker_alpha": {"photo_side": PHOTO_SIDES[0], "mae": {k: v / len(cases) for k, v in masker_err.items()}},
        "per_case": per_case,
    }
    result["masker_alpha"]["ratio"] = masker_err["ours"] / masker_err["naive"]
    return result


# --- alpha: full-resolution refinement --------------------------------------------------------


def bench_alpha(cases: list[MatteCase]) -> dict[str, Any]:
    rows = []
    for photo_side in PHOTO_SIDES:
        metrics: dict[str, list[tuple[float, float]]] = {"plain": [], "refined": []}
        edge_err: dict[str, float] = defaultdict(float)
        by_kind: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        seconds = 0.0
        megapixels = 0.0
        upscale = 0.0
        for i, case in enumerate(cases):
            h, w = case.alpha.shape
            side = round(MASK_SIDE * max(h, w) / photo_side)
            width = int(np.ceil(2 * max(h, w) / side))
            plain = simulated_mask(case.alpha, side)
            t = time.perf_counter()
            refined, info = refine_alpha_to_photo(case.image, plain, (side, side))
            seconds += time.perf_counter() - t
            megapixels += h * w / 1e6
            upscale = info.upscale
            colour = NEW_COLOURS[i % len(NEW_COLOURS)]
            bg = solid_background(colour, w, h)
            truth = truth_on(case, colour)
            near = dilate(((case.alpha > 0.0) & (case.alpha < 1.0)).astype(np.uint8), width) > 0
            for name, a in (("plain", plain), ("refined", refined)):
                m = boundary_metrics(a, case.alpha, width)
                metrics[name].append(m)
                by_kind[_kind(case)][name] += m[0]
                out, _ = compose(case.image, bg, a, CompositeOptions())
                edge_err[name] += float(np.abs(out[near].astype(np.float64) - truth[near]).mean()) / len(cases)
            naive = composite(case.image, bg, plain)
            edge_err["naive"] += float(np.abs(naive[near].astype(np.float64) - truth[near]).mean()) / len(cases)
        plain_m, refined_m = np.array(metrics["plain"]), np.array(metrics["refined"])
        rows.append({
            "photo_side": photo_side,
            "upscale": upscale,
            "applied": bool(upscale >= MIN_UPSCALE),
            "boundary_mae": {"plain": float(plain_m[:, 0].mean()), "refined": float(refined_m[:, 0].mean())},
            "iou": {"plain": float(plain_m[:, 1].mean()), "refined": float(refined_m[:, 1].mean())},
            "wins": int(np.count_nonzero(refined_m[:, 0] < plain_m[:, 0])),
            "losses": int(np.count_nonzero(refined_m[:, 0] > plain_m[:, 0])),
            "boundary_ratio_by_kind": {k: v["refined"] / v["plain"] for k, v in by_kind.items()},
            "composite_edge_mae": dict(edge_err),
            "seconds_per_megapixel": seconds / megapixels,
        })
    return {"mask_side": MASK_SIDE, "rows": rows}


def bench_large(height: int = 3000, width: int = 4000) -> dict[str, Any]:
    """Seconds at a 12 MP photo: a composite upscaled, the masker's alpha from 1024."""
    case = matte_cases(1, seed=1)[0]
    photo = np.asarray(Image.fromarray(case.image).resize((width, height), Image.Resampling.LANCZOS))
    alpha = np.clip(resize_bilinear(case.alpha, (height, width)), 0.0, 1.0)
    mask = np.clip(resize_bilinear(resize_bilinear(alpha, (MASK_SIDE, MASK_SIDE)), (height, width)), 0.0, 1.0)
    bg = solid_background((30, 144, 255), width, height)
    out: dict[str, Any] = {"size": [height, width]}
    t = time.perf_counter()
    refined, _ = refine_alpha_to_photo(photo, mask, (MASK_SIDE, MASK_SIDE))
    out["refine_s"] = time.perf_counter() - t
    band = (refined > 0.5 / 255) & (refined < 1 - 0.5 / 255)
    out["band_fraction"] = float(band.mean())
    t = time.perf_counter()
    composite(photo, bg, refined)
    out["naive_s"] = time.perf_counter() - t
    t = time.perf_counter()
    compose(photo, bg, refined, CompositeOptions())
    out["compose_s"] = time.perf_counter() - t
    t = time.perf_counter()
    compose(photo, bg, refined, CompositeOptions(grain=True, harmonize=0.5))
    out["compose_grain_harmonize_s"] = time.perf_counter() - t
    return out


# --- grain ----------------------------------------------------------------------------------


def bench_grain(height: int, width: int) -> dict[str, Any]:
    rows = []
    for i, name in enumerate(LIGHT_SUBJECTS):
        photo = scene_photo(name, height, width).astype(np.float32)
        other = LIGHT_BACKGROUNDS[(i + 3) % len(LIGHT_BACKGROUNDS)]
        small = fit_photo(load_photo(other), round(height / GRAIN_UPSCALE), round(width / GRAIN_UPSCALE))
        background = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.LANCZOS))
        alpha = render_alpha("antialiased", height, width, np.random.default_rng(i))
        for sigma in NOISE_SIGMAS:
            rng = np.random.default_rng([i, int(sigma * 10)])
            noisy = np.clip(np.rint(photo + rng.normal(0.0, sigma, photo.shape)), 0, 255).astype(np.uint8)
            out, report = match_grain(background, noisy, alpha, seed=i)
            after = estimate_noise(out, alpha <= 0.0)
            assert report.subject is not None and after is not None
            rows.append({
                "subject": name,
                "sigma": sigma,
                "subject_estimate": list(report.subject.sigma),
                "background_before": list(report.background.sigma) if report.background else None,
                "background_after": list(after.sigma),
                "ratio_to_known": [s / sigma for s in after.sigma],
                "ratio_to_subject_estimate": [s / e for s, e in zip(after.sigma, report.subject.sigma)],
                "sharpness": [report.subject.sharpness, report.background.sharpness if report.background else None],
            })
    ratios = np.array([r["ratio_to_known"] for r in rows])
    return {
        "upscale": GRAIN_UPSCALE,
        "cases": len(rows),
        "ratio_min": float(ratios.min()),
        "ratio_max": float(ratios.max()),
        "ratio_mean": float(ratios.mean()),
        "within_tolerance": int(np.count_nonzero(np.all(np.abs(ratios - 1.0) <= GRAIN_TOLERANCE, axis=1))),
        "rows": rows,
    }


# --- light ------------------------------------------------------------------------------------


def relit(rgb: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    """A photo under another light: linear-RGB gains (a von Kries cast)."""
    lin = srgb_to_linear(rgb / 255.0) * np.asarray(gains)
    return np.clip(np.rint(linear_to_srgb(lin) * 255.0), 0, 255).astype(np.uint8)


def reinhard_oklab(photo: np.ndarray, background: np.ndarray, alpha: np.ndarray, strength: float) -> np.ndarray:
    """The comparison: mean/std transfer of L, a, b in OKLab (Reinhard et al. 2001) toward the background,
    chroma shift <= 0.04, lightness shift <= 0.12, lightness std ratio within 1.25 (bounds like ours)."""
    to_lab = lambda x: linear_to_oklab(srgb_to_linear(x.reshape(-1, 3) / 255.0))  # noqa: E731
    lab_p, lab_b = to_lab(photo), to_lab(background)
    wa, wb = alpha.ravel(), 1.0 - alpha.ravel()
    mp, mb = (lab_p * wa[:, None]).sum(0) / wa.sum(), (lab_b * wb[:, None]).sum(0) / wb.sum()
    sp = np.sqrt((((lab_p - mp) ** 2) * wa[:, None]).sum(0) / wa.sum())
    sb = np.sqrt((((lab_b - mb) ** 2) * wb[:, None]).sum(0) / wb.sum())
    shift = strength * (mb - mp)
    shift[0] = np.clip(shift[0], -0.12, 0.12)
    c = float(np.hypot(shift[1], shift[2]))
    if c > 0.04:
        shift[1:] *= 0.04 / c
    contrast = np.clip(sb[0] / sp[0], 0.8, 1.25) ** strength
    out = lab_p.copy()
    out[:, 0] = mp[0] + (out[:, 0] - mp[0]) * contrast
    out += shift
    rgb = linear_to_srgb(oklab_to_linear(out))
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8).reshape(photo.shape)


def bench_light(height: int, width: int) -> dict[str, Any]:
    from skimage.color import deltaE_ciede2000, rgb2lab

    result: dict[str, Any] = {}
    for mode in ("same scene relit", "other scenes"):
        de: dict[str, list[float]] = defaultdict(list)
        for i, name in enumerate(LIGHT_SUBJECTS):
            scene = scene_photo(name, height, width)
            other = LIGHT_BACKGROUNDS[(3 * i + 1) % len(LIGHT_BACKGROUNDS)]
            if other == name:
                other = LIGHT_BACKGROUNDS[(3 * i + 2) % len(LIGHT_BACKGROUNDS)]
            new_scene = scene if mode == "same scene relit" else scene_photo(other, height, width)
            alpha = render_alpha("antialiased", height, width, np.random.default_rng(100 + i))
            core = alpha >= 1.0
            for old, new in CASTS:
                photo, background, truth = relit(scene, old), relit(new_scene, new), relit(scene, new)
                truth_lab = rgb2lab(truth[core])
                de["before"].append(float(deltaE_ciede2000(rgb2lab(photo[core]), truth_lab).mean()))
                for s in (0.5, 1.0):
                    out, _ = compose(photo, background, alpha, CompositeOptions(harmonize=s))
                    de[f"ours {s:g}"].append(float(deltaE_ciede2000(rgb2lab(out[core]), truth_lab).mean()))
                ref = reinhard_oklab(photo, background, alpha, 0.5)
                de["OKLab mean/std 0.5"].append(float(deltaE_ciede2000(rgb2lab(ref[core]), truth_lab).mean()))
        before = np.array(de["before"])
        result[mode] = {
            k: {
                "mean_de2000": float(np.mean(v)),
                "improved": int(np.count_nonzero(np.array(v) < before)),
                "worst_increase": float(max(np.array(v) - before)),
            }
            for k, v in de.items()
        }
        result[mode]["cases"] = len(before)
    return result


# --- report -----------------------------------------------------------------------------------


def _light_cell(r: dict[str, Any], cases: int) -> str:
    return f"{r['mean_de2000']:.2f} (better in {r['improved']}/{cases}, worst +{max(r['worst_increase'], 0):.1f})"


def render(report: dict[str, Any]) -> str:
    e, a, g, light, big = report["edges"], report["alpha"], report["grain"], report["light"], report["large"]
    lines = [
        f"Command: `{report['command']}`; {report['machine']['cpu']}, load average {report['machine']['load_before']} before, "
        f"{report['machine']['load_after']} after (shared machine: times are upper bounds).",
        "",
        f"**Clean edges** ({e['composites']} composites {e['size'][1]}x{e['size'][0]}, {len(EDGE_KINDS)} edge kinds, "
        f"true alpha, solid new colour; soft band = {SOFT[0]} < a < {SOFT[1]}, {e['soft_band_values']} values):",
        "",
        "| | soft-band MAE (8-bit) | ratio to naive | " + " | ".join(EDGE_KINDS) + " | s / MP |",
        "|---|---|---|" + "---|" * len(EDGE_KINDS) + "---|",
    ]
    names = [n for n in ("naive", "pymatting", "ours") if n in e["mae"]]
    label = {"naive": "naive (`a*I + (1-a)*C`, before)", "pymatting": "pymatting `estimate_foreground_ml` (defaults)", "ours": "**ours** (`compose`, default options)"}
    for n in names:
        kinds = " | ".join(f"{e['ratio_by_kind'][k][n]:.2f}" for k in EDGE_KINDS)
        sec = e["seconds_per_megapixel"].get(n)
        lines.append(f"| {label[n]} | {e['mae'][n]:.2f} | {e['ratio'][n]:.2f} | {kinds} | {'' if sec is None else f'{sec:.2f}'} |")
    m = e["masker_alpha"]
    lines += [
        "",
        f"Core pixels (a = 1) differing from the input: {e['core_mismatches']}. Worst single composite: {e['per_case_ratio_max']:.2f}x naive. "
        f"Foreground estimate alone: {e['seconds_per_megapixel']['estimate']:.2f} s/MP. With a masker's alpha instead of the truth "
        f"(the true one at {MASK_SIDE} px per {m['photo_side']} px and back), error near the edge {m['mae']['naive']:.2f} -> {m['mae']['ours']:.2f} "
        f"({m['ratio']:.2f}x).",
        "",
        f"**Full-resolution alpha** (masker at {MASK_SIDE} px simulated for each photo size; boundary = within 2 mask pixels of the true edge):",
        "",
        "| photo long side (upscale) | boundary MAE plain -> refined | IoU plain -> refined | refined better / worse | composite edge error naive -> plain -> refined | s / MP |",
        "|---|---|---|---|---|---|",
    ]
    for r in a["rows"]:
        state = "" if r["applied"] else f" (not applied: below {MIN_UPSCALE}x)"
        c = r["composite_edge_mae"]
        lines.append(
            f"| {r['photo_side']} ({r['upscale']:.2f}x){state} | {r['boundary_mae']['plain']:.4f} -> {r['boundary_mae']['refined']:.4f} | "
            f"{r['iou']['plain']:.4f} -> {r['iou']['refined']:.4f} | {r['wins']} / {r['losses']} | "
            f"{c['naive']:.2f} -> {c['plain']:.2f} -> {c['refined']:.2f} | {r['seconds_per_megapixel']:.2f} |"
        )
    kinds = a["rows"][0]["boundary_ratio_by_kind"]
    lines += [
        "",
        "Boundary error refined / plain by edge kind at the largest photo: " + ", ".join(f"{k} {kinds[k]:.2f}" for k in EDGE_KINDS) + ".",
        "",
        f"**At 12 MP** ({big['size'][1]}x{big['size'][0]}, alpha from {MASK_SIDE} px, soft band {100 * big['band_fraction']:.1f} % of the photo): "
        f"refine {big['refine_s']:.1f} s, naive composite {big['naive_s']:.1f} s, `compose` (decontaminate) {big['compose_s']:.1f} s, "
        f"with grain and harmonize 0.5 {big['compose_grain_harmonize_s']:.1f} s.",
        "",
        f"**Grain** ({g['cases']} subjects with known noise sigma {', '.join(f'{s:g}' for s in NOISE_SIGMAS)}; background a photo upscaled "
        f"{g['upscale']:g}x): background noise after / known subject noise {g['ratio_min']:.2f} .. {g['ratio_max']:.2f} "
        f"(mean {g['ratio_mean']:.2f}); within {100 * GRAIN_TOLERANCE:.0f} % on all channels: {g['within_tolerance']} of {g['cases']}.",
        "",
        "**Light** (subject under a known cast, background under another light; mean CIEDE2000 of the subject to itself under the new light):",
        "",
        "| new background | before | harmonize 0.5 | harmonize 1 | OKLab mean/std transfer 0.5 (bounded alike) |",
        "|---|---|---|---|---|",
    ]
    for mode, r in light.items():
        cells = " | ".join(_light_cell(r[k], r["cases"]) for k in ("ours 0.5", "ours 1", "OKLab mean/std 0.5"))
        lines.append(f"| {mode} ({r['cases']}) | {r['before']['mean_de2000']:.2f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=35, help="composites (cycling through the edge kinds)")
    p.add_argument("--size", default="640x480", help="composite size WxH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pymatting", action="store_true", help="skip the pymatting reference row")
    p.add_argument("--no-large", action="store_true", help="skip the 12 MP timing")
    p.add_argument("--out", default=str(ROOT / "results" / "composite.json"))
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--no-readme", action="store_true", help="do not update the README table")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    load_before = load_average()
    cases = matte_cases(args.count, height, width, seed=args.seed)
    report: dict[str, Any] = {
        "command": "python benchmarks/composite_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "edges": bench_edges(cases, not args.no_pymatting),
        "alpha": bench_alpha(cases),
        "grain": bench_grain(height, width),
        "light": bench_light(height, width),
        "large": {} if args.no_large else bench_large(),
    }
    report["command"] = report["command"].strip()
    report["machine"] = {"cpu": cpu_model(), "load_before": load_before, "load_after": load_average(), "versions": library_versions()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=1) + "\n")
    if args.no_large:
        report["large"] = {"size": [0, 0], "band_fraction": 0.0, "refine_s": 0.0, "naive_s": 0.0, "compose_s": 0.0, "compose_grain_harmonize_s": 0.0}
    markdown = render(report)
    write_text_atomic(out.with_suffix(".md"), markdown)
    if not args.no_readme:
        update_readme(args.readme, markdown, README_START, README_END)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
