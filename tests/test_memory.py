"""The cost model's arithmetic (trt_bgswap.memory) and the guard's decisions, on small hand-made facts.

Precondition / action / postcondition, with facts written out so every expected number can be
checked by hand: an attention of ``heads`` heads over ``area / q_divisor`` tokens holds
``B * heads * tokens**2 * itemsize`` bytes of scores; a live set ``(c0, c1, c2, c3)`` costs
``c0 + c1*B + c2*B*area + c3*B*area**2`` bytes.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from trt_bgswap.errors import UsageError
from trt_bgswap.manifest import InpaintConfig
from trt_bgswap.memory import (
    AREA_FIXED,
    AREA_LATENT,
    PRUNE_AREAS,
    SAFETY_MARGIN,
    AttentionLayer,
    GraphMemory,
    available_memory,
    budget_from_env,
    cgroup_headroom,
    dominant,
    estimate_peak,
    facts_from_json,
    facts_to_json,
    largest_fitting,
    live_bytes,
    mem_available,
    parse_bytes,
    process_rss,
)
from trt_bgswap.runtime.memory_guard import MemoryGuard

MIB = 1 << 20
SELF = AttentionLayer(heads=8, head_dim=40, q_divisor=1, kv_tokens=None, itemsize=4)
CROSS = AttentionLayer(heads=8, head_dim=40, q_divisor=1, kv_tokens=77, itemsize=4)
DOWN = AttentionLayer(heads=8, head_dim=80, q_divisor=4, kv_tokens=None, itemsize=4)


def unet_facts() -> GraphMemory:
    # scores + probabilities of SELF held at once: 2 * 8 heads * 4 bytes = 64 bytes per B * area**2
    return GraphMemory(AREA_LATENT, (SELF, CROSS, DOWN), materialised=((1000.0, 10.0, 500.0, 64.0),), bounded=((1000.0, 10.0, 700.0, 0.0),))


def test_attention_bytes() -> None:
    area = 64 * 64  # 512x512 with a VAE factor of 8
    assert SELF.tokens(area) == 4096
    assert SELF.scores_bytes(1, area) == 8 * 4096 * 4096 * 4 == 512 * MIB
    assert SELF.scores_bytes(2, area) == 1024 * MIB  # classifier-free guidance doubles the batch
    assert CROSS.scores_bytes(1, area) == 8 * 4096 * 77 * 4
    assert DOWN.tokens(area) == 1024 and DOWN.scores_bytes(1, area) == 8 * 1024 * 1024 * 4


def test_transient_and_largest_attention() -> None:
    g = unet_facts()
    area = 128 * 128
    assert g.transient(1, area, bounded=False) == int(1000 + 10 + 500 * area + 64 * area**2)
    assert g.transient(2, area, bounded=False) == int(1000 + 20 + 1000 * area + 128 * area**2)
    assert g.transient(1, area, bounded=True) == int(1000 + 10 + 700 * area)
    assert g.largest_attention(area) is SELF  # cross-attention never dominates: its keys are fixed


def test_estimate_peak_sums_resident_held_photo_and_the_costliest_stage() -> None:
    facts = {"unet": unet_facts(), "text_encoder": GraphMemory(AREA_FIXED, (), ((MIB, 0.0, 0.0, 0.0),), ((MIB, 0.0, 0.0, 0.0),))}
    area, photo = 64 * 64, 1000 * 1000
    est = estimate_peak(facts, {"unet": 1, "text_encoder": 1}, (), weights=100 * MIB, base=50 * MIB, latent_area=area, photo_pixels=photo)
    from trt_bgswap.memory import ORT_OVERHEAD, PHOTO_HELD_BYTES_PER_PIXEL, WEIGHT_COPIES

    assert est.resident == 50 * MIB + int(100 * MIB * WEIGHT_COPIES) + ORT_OVERHEAD
    assert est.stage == "unet" and est.stage_bytes == facts["unet"].transient(1, area, False)
    assert est.total == est.resident + PHOTO_HELD_BYTES_PER_PIXEL * photo + est.stage_bytes
    assert est.attention_tokens == 4096 and "attention over 4096 tokens" in est.why()
    guided = estimate_peak(facts, {"unet": 2, "text_encoder": 1}, (), 100 * MIB, 50 * MIB, area, photo)
    assert guided.stage_bytes == facts["unet"].transient(2, area, False)
    tiled = estimate_peak(facts, {"unet": 1, "text_encoder": 1}, ("unet",), 100 * MIB, 50 * MIB, area, 0)
    assert tiled.stage_bytes == facts["unet"].transient(1, area, True) and tiled.attention_tokens is None


def test_a_huge_photo_makes_the_composite_the_peak() -> None:
    facts = {"unet": unet_facts()}
    est = estimate_peak(facts, {"unet": 1}, ("unet",), 0, 0, latent_area=16 * 16, photo_pixels=8000 * 8000)
    assert est.stage == "composite"


def test_dominant_keeps_every_maximum() -> None:
    rng = random.Random(0)
    lives = [tuple(float(rng.choice([0, rng.randint(1, 10**6)])) for _ in range(4)) for _ in range(300)]
    kept = dominant(lives)
    assert len(kept) < len(lives)
    for b, a in itertools.product((1, 2), PRUNE_AREAS[::7]):
        assert max(live_bytes(v, b, a) for v in kept) == max(live_bytes(v, b, a) for v in lives)


def test_facts_json_round_trip_and_version() -> None:
    facts = {"unet": unet_facts()}
    assert facts_from_json(facts_to_json(facts)) == facts
    stale = facts_to_json(facts) | {"version": -1}
    assert facts_from_json(stale) is None and facts_from_json({}) is None


@pytest.mark.parametrize(
    ("size", "multiple", "fits_area", "expected"),
    [
        ((1024, 1024), 64, 768 * 768, (768, 768)),
        ((1024, 768), 64, 640 * 480, (576, 448)),  # 640x512 (0.75 * 640 = 480 rounds to 512) is too big
        ((768, 1024), 64, 640 * 480, (448, 576)),
        ((1024, 256), 64, 512 * 128, (512, 128)),
        ((512, 512), 64, 63 * 63, None),
    ],
)
def test_largest_fitting(size, multiple, fits_area, expected) -> None:
    assert largest_fitting(*size, multiple, lambda w, h: w * h <= fits_area) == expected


def test_parse_bytes() -> None:
    assert parse_bytes("6G") == parse_bytes("6GiB") == parse_bytes("6 gb") == 6 << 30
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("1.5g") == 3 << 29 and parse_bytes("4096") == 4096
    for bad in ("", "six", "-1G", "0", "6X"):
        with pytest.raises(UsageError, match="give a size such as 6G"):
            parse_bytes(bad)
    assert budget_from_env({"TRT_BGSWAP_MEMORY_BUDGET": "2G"}) == 2 << 30 and budget_from_env({}) is None


def test_proc_and_cgroup_readers(tmp_path: Path) -> None:
    # the system reserve stays out: the floor on a small machine, a share of the total on a large one
    assert mem_available("MemTotal: 4194304 kB\nMemAvailable:    3145728 kB\n") == (3 << 30) - (1 << 30)
    assert mem_available("MemTotal: 67108864 kB\nMemAvailable:   33554432 kB\n") == (32 << 30) - int(0.05 * (64 << 30))
    assert mem_available("MemTotal: 100 kB\nMemAvailable:    2048 kB\n") == 0
    assert mem_available("nothing") is None
    assert process_rss("VmRSS:\t  512 kB\n") == 512 * 1024
    group = tmp_path / "app.slice"
    group.mkdir()
    (group / "memory.max").write_text("1073741824\n")
    (group / "memory.current").write_text("536870912\n")
    (group / "memory.stat").write_text("anon 1\ninactive_file 1048576\n")
    assert cgroup_headroom(tmp_path, "0::/app.slice\n") == (1 << 30) - (1 << 29) + (1 << 20)
    (group / "memory.max").write_text("max\n")
    assert cgroup_headroom(tmp_path, "0::/app.slice\n") is None


def test_budget_is_the_smallest_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRT_BGSWAP_MEMORY_BUDGET", raising=False)
    a = available_memory(budget=1 << 30, rss=0)
    assert a.bytes == 1 << 30 and a.source == "the budget (--memory-budget)"
    monkeypatch.setenv("TRT_BGSWAP_MEMORY_BUDGET", "512M")
    b = available_memory(rss=0)
    assert b.bytes == 512 << 20 and "TRT_BGSWAP_MEMORY_BUDGET" in b.source


def guard(budget: int, bounded: frozenset[str] = frozenset(), unbuilt: frozenset[str] = frozenset()) -> MemoryGuard:
    cfg = InpaintConfig(0.18215, None, 8, 4, 9, 64, 512, 77, {})
    return MemoryGuard(Path("/models"), cfg, {"unet": unet_facts()}, ("unet",), bounded, weights=0, base=0, budget=budget, unbuilt_bounded=unbuilt)


def test_guard_refuses_in_one_line_naming_a_size_that_fits() -> None:
    g = guard(budget=4 << 30)
    g.check((512, 512), guidance=1.0)  # fits: no error
    with pytest.raises(UsageError) as e:
        g.check((1024, 1024), guidance=1.0)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("--size 1024x1024 needs about ") and "(attention over 16384 tokens)" in msg
    assert "the budget (--memory-budget) is 4.0 GiB: use --size " in msg and msg.endswith(" or smaller")
    suggested = tuple(int(v) for v in msg.split("use --size ")[1].split(" ")[0].split("x"))
    g.check(suggested, guidance=1.0)  # the suggestion fits
    bigger = (suggested[0] + 64, suggested[1] + 64)
    with pytest.raises(UsageError):
        g.check(bigger, guidance=1.0)  # and is the largest of that aspect


def test_guard_margin_and_guidance() -> None:
    g = guard(budget=1 << 40)
    est = g.estimate(512, 512, 1.0)
    assert g.need(est) == est.resident + int((est.total - est.resident) * (1 + SAFETY_MARGIN))
    assert g.estimate(512, 512, 2.0).stage_bytes > est.stage_bytes  # batch 2 for the UNet


def test_guard_suggests_building_tiled_attention_when_that_fits() -> None:
    g = guard(budget=2 << 30, unbuilt=frozenset({"unet"}))
    with pytest.raises(UsageError, match=r"or run `trt-bgswap build /models` first \(tiled attention: about [\d.]+ GiB\)"):
        g.check((1024, 1024), guidance=1.0)
    tiled = guard(budget=2 << 30, bounded=frozenset({"unet"}))
    tiled.check((1024, 1024), guidance=1.0)  # the built graphs fit


def test_default_size_shrinks_to_fit(caplog: pytest.LogCaptureFixture) -> None:
    g = guard(budget=4 << 30)
    assert g.fit((640, 448), 1.0) == (640, 448)
    small = g.fit((1024, 768), 1.0)
    assert small[0] < 1024 and abs(small[0] / small[1] - 1024 / 768) < 0.2
    assert "instead of 1024x768" in caplog.text
    with pytest.raises(UsageError, match="no size fits"):
        guard(budget=1 << 20).fit((512, 512), 1.0)


def test_a_photo_too_large_for_any_size_says_so() -> None:
    g = guard(budget=2 << 30)
    with pytest.raises(UsageError, match=r"\(compositing a 100\.0 MP photo\) but .*: downscale the photo"):
        g.check((512, 512), guidance=1.0, photo_pixels=10_000 * 10_000)
