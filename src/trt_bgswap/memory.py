"""What a generation costs in host memory, before it runs, and what this machine (or a budget) allows.

The model (validated against measured peaks in ``benchmarks/README.md``, "Peak memory by
generation size"): a run's peak RSS is

    the process before loading + the weights of the graphs it opens (+ ONNX Runtime's own)
    + the largest set of tensors alive at once in any one graph

The last term is a property of the exported graph, measured once by the exporter
(:mod:`trt_bgswap.export.memory_facts`): every intermediate tensor's size is a polynomial in
the batch ``B`` and the area (latent pixels ``h*w`` for the generation graphs), and ONNX
Runtime frees a tensor after its last consumer, so the tensors alive while one node runs
add up to ``c0 + c1*B + c2*B*area + c3*B*area**2``. The manifest keeps the few such live
sets no other one dominates, for the graph as exported (self-attention scores materialised:
the ``area**2`` term, ``B x heads x tokens**2`` floats, twice while Softmax runs) and with
the attention computed tile by tile (what ``trt-bgswap build`` makes for ONNX Runtime on
the CPU, :mod:`trt_bgswap.engines.attention`). The stages run one after another, so the
peak is that of the costliest stage, plus what the photo itself holds meanwhile.

Available memory is the smallest of: this process's RSS + ``MemAvailable`` (``/proc/meminfo``) less a reserve for the rest of the machine,
the cgroup v2 ``memory.max`` headroom, and a budget (``--memory-budget`` /
``TRT_BGSWAP_MEMORY_BUDGET``; appliances set one so a run never takes more than its share).
numpy-free, torch-free: the lean runtime and the CLI import it before loading anything.
"""

from __future__ import annotations

import os
import re
import sys

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_bgswap.errors import UsageError

BUDGET_ENV = "TRT_BGSWAP_MEMORY_BUDGET"
FACTS_VERSION = 1  # bump when the meaning of the recorded facts changes; older facts are then ignored
GIB = 1 << 30
# A live set: bytes = c[0] + c[1]*B + c[2]*B*area + c[3]*B*area**2 (see the module docstring).
LiveSet = tuple[float, float, float, float]

# Kinds of area a graph's tensors scale with.
AREA_LATENT = "latent"  # h*w latent pixels of the generation (UNet, VAE)
AREA_PHOTO = "photo"  # PH*PW pixels of the photo (graphs that take the photo as it is)
AREA_FIXED = "fixed"  # nothing size-dependent (text encoder, RMBG at its own input size)
AREAS = (AREA_LATENT, AREA_PHOTO, AREA_FIXED)
LATENT_SYMBOLS = ("h", "w", "H", "W")  # specs.py's symbols of latent (and generation pixel) sides
PHOTO_SYMBOLS = ("PH", "PW")  # specs.py's symbols of the photo's sides


def area_kind(symbols: Iterable[str]) -> str:
    """What a graph's tensors scale with, from its I/O spec's symbols (``ModelSpec.symbols()``)."""
    names = set(symbols)
    if names & set(LATENT_SYMBOLS):
        return AREA_LATENT
    if names & set(PHOTO_SYMBOLS):
        return AREA_PHOTO
    return AREA_FIXED


@dataclass(frozen=True)
class AttentionLayer:
    """One softmax(QK^T)V of a graph, measured from the graph itself (not from a model card)."""

    heads: int
    head_dim: int
    q_divisor: int  # query tokens = area / q_divisor (1 at full latent resolution, 4 one level down, ...)
    kv_tokens: int | None  # None: self-attention (keys = queries); else fixed (cross-attention on the text)
    itemsize: int  # bytes of one score

    def tokens(self, area: int) -> int:
        return area // self.q_divisor

    def scores_bytes(self, batch: int, area: int) -> int:
        q = self.tokens(area)
        return batch * self.heads * q * (q if self.kv_tokens is None else self.kv_tokens) * self.itemsize

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "AttentionLayer":
        return cls(int(d["heads"]), int(d["head_dim"]), int(d["q_divisor"]), None if d["kv_tokens"] is None else int(d["kv_tokens"]), int(d["itemsize"]))


def live_bytes(live: LiveSet, batch: int, area: int) -> float:
    return live[0] + live[1] * batch + live[2] * batch * area + live[3] * batch * float(area) ** 2


# Areas the kept live sets must get right: every area up to 2**28 (latent pixels of a 131072-pixel
# square generation; photo pixels of 268 MP) in steps of 5%, at batch 1 and 2. Between two such
# areas a dropped live set can exceed the kept maximum only where two parabolas cross, by a
# fraction of the 5% step: far inside the check's safety margin.
PRUNE_AREAS = tuple(sorted({int(1.05**k) for k in range(0, int(28 / 0.0704) + 2)}))
PRUNE_BATCHES = (1, 2)


def dominant(lives: Iterable[LiveSet]) -> tuple[LiveSet, ...]:
    """The few live sets that are the largest at some batch and area (all that can be a graph's peak)."""
    unique = set(tuple(float(c) for c in live) for live in lives)
    keep = {max(unique, key=lambda v: live_bytes(v, b, a)) for b in PRUNE_BATCHES for a in PRUNE_AREAS} if unique else set()
    return tuple(sorted(keep, reverse=True))  # type: ignore[arg-type]


@dataclass(frozen=True)
class GraphMemory:
    """A graph's memory facts: what scales with what, recorded by the exporter in the manifest."""

    area: str  # AREA_LATENT | AREA_PHOTO | AREA_FIXED
    attention: tuple[AttentionLayer, ...]
    materialised: tuple[LiveSet, ...]  # dominant live sets of the graph as exported
    bounded: tuple[LiveSet, ...]  # the same with attention tile by tile (no scores held)

    def transient(self, batch: int, area: int, bounded: bool) -> int:
        """Peak bytes of tensors alive at once while this graph runs (weights not included)."""
        lives = self.bounded if bounded else self.materialised
        return int(max((live_bytes(v, batch, area) for v in lives), default=0.0))

    def largest_attention(self, area: int) -> AttentionLayer | None:
        """The self-attention with the most scores at ``area`` (what dominates a materialised graph)."""
        layers = [a for a in self.attention if a.kv_tokens is None]
        return max(layers, key=lambda a: a.scores_bytes(1, area), default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "area": self.area,
            "attention": [a.to_json() for a in self.attention],
            "materialised": [list(v) for v in self.materialised],
            "bounded": [list(v) for v in self.bounded],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "GraphMemory":
        if d["area"] not in AREAS:
            raise ValueError(f"area {d['area']!r} is not one of {AREAS}")
        lives = lambda key: tuple(tuple(float(c) for c in v) for v in d[key])  # noqa: E731
        return cls(d["area"], tuple(AttentionLayer.from_json(a) for a in d["attention"]), lives("materialised"), lives("bounded"))  # type: ignore[arg-type]


def facts_to_json(facts: Mapping[str, GraphMemory]) -> dict[str, Any]:
    return {"version": FACTS_VERSION, "graphs": {k: v.to_json() for k, v in sorted(facts.items())}}


def facts_from_json(d: Mapping[str, Any] | None) -> dict[str, GraphMemory] | None:
    """The manifest's memory facts, or None when absent or of another version (re-export to get them)."""
    if not d or d.get("version") != FACTS_VERSION:
        return None
    return {k: GraphMemory.from_json(v) for k, v in d["graphs"].items()}


# --- Constants of this runtime (not of a model), each measured in benchmarks/memory_by_size.py ---

# ONNX Runtime's own resident memory for its sessions (thread pools, kernel registries, graph
# structures) beyond the weights, once the library is imported: measured 34-45 MiB for the tiny
# models' five sessions on 2 cores; each session's intra-op thread pool grows with the cores.
ORT_OVERHEAD = 96 << 20
# Weights held per byte of graph file: ONNX Runtime keeps one copy of each initializer; the CPU
# provider's pre-packed GEMM/conv weights replace, not add to, the originals they are made from.
WEIGHT_COPIES = 1.0
# The photo's own arrays while the graphs run: uint8 RGB, float32 raw and refined alpha, the uint8
# repaint mask (3 + 4 + 4 + 1 bytes a pixel), plus the decoder's copy. At the end the full-size
# composite (runtime/composite.py: float32 alpha and RGB copies, their products and the blend, the
# upscaled background) and the writer's buffers: measured 62.6 and 62.9 bytes a pixel with 12 and
# 48 MP photos (benchmarks/README.md, "Peak memory by generation size"), held arrays included.
PHOTO_HELD_BYTES_PER_PIXEL = 16
PHOTO_COMPOSITE_BYTES_PER_PIXEL = 64
# ONNX Runtime's arena keeps freed blocks and splits them for later requests; blocks freed by one
# stage do not always fit the next one's tensors. Measured peaks were within this fraction above the
# live-set prediction (the spread is in benchmarks/README.md); the check adds it to every prediction.
SAFETY_MARGIN = 0.25


@dataclass(frozen=True)
class Estimate:
    """A predicted peak and its parts (bytes)."""

    total: int
    resident: int  # the process before loading + weights + ONNX Runtime
    stage: str  # the graph (or "composite") whose run is the peak
    stage_bytes: int
    attention_tokens: int | None  # tokens of that stage's largest materialised self-attention
    photo_pixels: int = 0

    def why(self) -> str:
        if self.attention_tokens:
            return f"attention over {self.attention_tokens} tokens"
        if self.stage == "composite":
            return f"compositing a {self.photo_pixels / 1e6:.1f} MP photo"
        return f"{self.stage} at this size"


def estimate_peak(
    facts: Mapping[str, GraphMemory],
    runs: Mapping[str, int],
    bounded: Iterable[str],
    weights: int,
    base: int,
    latent_area: int,
    photo_pixels: int = 0,
) -> Estimate:
    """The peak RSS of one generation.

    ``runs`` maps each graph that runs to its batch (the UNet's is 2 with classifier-free
    guidance); ``bounded`` names the graphs whose attention is computed tile by tile;
    ``weights`` is the bytes of the graph files opened, ``base`` the RSS before opening them.
    """
    bounded = set(bounded)
    resident = base + int(weights * WEIGHT_COPIES) + ORT_OVERHEAD
    held = PHOTO_HELD_BYTES_PER_PIXEL * photo_pixels
    stage, stage_bytes, tokens = "composite", (PHOTO_COMPOSITE_BYTES_PER_PIXEL - PHOTO_HELD_BYTES_PER_PIXEL) * photo_pixels, None
    for name, batch in runs.items():
        g = facts.get(name)
        if g is None:
            continue
        area = {AREA_LATENT: latent_area, AREA_PHOTO: photo_pixels, AREA_FIXED: 1}[g.area]
        cost = g.transient(batch, area, name in bounded)
        if cost > stage_bytes:
            layer = None if name in bounded else g.largest_attention(area)
            stage, stage_bytes = name, cost
            # named in the message when its scores and probabilities are at least half of the stage's cost
            tokens = layer.tokens(area) if layer is not None and 4 * layer.scores_bytes(batch, area) >= cost else None
    return Estimate(resident + held + stage_bytes, resident, stage, stage_bytes, tokens, photo_pixels)


# --- What is available ---


@dataclass(frozen=True)
class Available:
    bytes: int | None  # None: unknown (not Linux, no budget): nothing to check against
    source: str  # what limits it, for the message


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str, what: str = "--memory-budget") -> int:
    """'6G', '6GiB', '512M', '3.5g' or a byte count -> bytes (binary units: 1G = 2**30)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"{what} {text!r}: give a size such as 6G, 6GiB, 512M or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def budget_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    value = (os.environ if environ is None else environ).get(BUDGET_ENV)
    return None if value is None or not value.strip() else parse_bytes(value, BUDGET_ENV)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _status_kb(field: str, status: str | None = None) -> int:
    text = _read(Path("/proc/self/status")) if status is None else status
    m = re.search(rf"^{field}:\s+(\d+) kB", text or "", re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


def process_rss(status: str | None = None) -> int:
    """This process's resident set (``VmRSS``), 0 where /proc is missing."""
    return _status_kb("VmRSS", status)


def address_space_room(status: str | None = None) -> int | None:
    """The resident memory an address-space limit (``ulimit -v``, ``prlimit --as``) leaves this process.

    Allocations fail once the virtual size reaches the limit; the part of it that is not resident
    (thread stacks, reserved arenas) is taken as staying what it is now. None without a limit.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_AS) if resource is not None else (-1, -1)
    if soft < 0 or soft == getattr(resource, "RLIM_INFINITY", -1):
        return None
    text = _read(Path("/proc/self/status")) if status is None else status
    reserved = max(0, _status_kb("VmSize", text) - _status_kb("VmRSS", text))
    return max(0, soft - reserved)


# What a run leaves to the rest of the machine out of MemAvailable (the kernel's estimate is not a
# promise: page cache it counts as reclaimable is shared, and other processes keep growing). A run
# sized to all of it could still push the machine into the out-of-memory killer; the reserve is the
# larger of a fixed floor and a share of the total.
SYSTEM_RESERVE_BYTES = 1 << 30
SYSTEM_RESERVE_SHARE = 0.05


def mem_available(meminfo: str | None = None) -> int | None:
    """``MemAvailable`` minus the system reserve (:data:`SYSTEM_RESERVE_BYTES`, :data:`SYSTEM_RESERVE_SHARE` of ``MemTotal``)."""
    text = _read(Path("/proc/meminfo")) if meminfo is None else meminfo
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text or "", re.MULTILINE)
    if not m:
        return None
    total = re.search(r"^MemTotal:\s+(\d+) kB", text or "", re.MULTILINE)
    reserve = max(SYSTEM_RESERVE_BYTES, int(SYSTEM_RESERVE_SHARE * int(total.group(1)) * 1024) if total else 0)
    return max(0, int(m.group(1)) * 1024 - reserve)


def cgroup_headroom(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: str | None = None) -> int | None:
    """cgroup v2: ``memory.max`` - ``memory.current`` + reclaimable page cache, for this process's group."""
    text = _read(Path("/proc/self/cgroup")) if proc_cgroup is None else proc_cgroup
    m = re.search(r"^0::(/\S*)$", text or "", re.MULTILINE)
    if not m:
        return None
    folder = root / m.group(1).lstrip("/")
    limit, current = _read(folder / "memory.max"), _read(folder / "memory.current")
    if limit is None or current is None or limit.strip() == "max":
        return None
    stat = _read(folder / "memory.stat") or ""
    inactive = re.search(r"^inactive_file (\d+)$", stat, re.MULTILINE)
    return max(0, int(limit) - int(current) + (int(inactive.group(1)) if inactive else 0))


def available_memory(budget: int | None = None, budget_source: str = "--memory-budget", rss: int | None = None) -> Available:
    """The most this process may hold at its peak: the budget, or what is free plus what it holds."""
    rss = process_rss() if rss is None else rss
    limits: list[tuple[int, str]] = []
    free = mem_available()
    if free is not None:
        limits.append((rss + free, "available"))
    room = cgroup_headroom()
    if room is not None:
        limits.append((rss + room, "available in this cgroup"))
    space = address_space_room()
    if space is not None:
        limits.append((space, "allowed by the address-space limit (ulimit -v)"))
    if budget is None:
        budget = budget_from_env()
        budget_source = BUDGET_ENV
    if budget is not None:
        limits.append((budget, f"the budget ({budget_source})"))
    if not limits:
        return Available(None, "unknown")
    return Available(*min(limits))


def flash_attention_available(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ONNX Runtime's CPU MultiHeadAttention will take its tiled (FlashAttention) path here.

    onnxruntime/contrib_ops/cpu/bert/multihead_attention.cc takes it when the host reports an L2
    cache size (``sysconf(_SC_LEVEL2_CACHE_SIZE) > 0``) and ``ORT_DISABLE_FLASH_ATTENTION`` is
    not set to a true value; otherwise it materialises the scores like the exported graph.
    """
    env = os.environ if environ is None else environ
    if env.get("ORT_DISABLE_FLASH_ATTENTION", "0").strip().lower() in ("1", "true"):
        return False
    return l2_cache_size() > 0


# glibc's _SC_LEVEL2_CACHE_SIZE (bits/confname.h: the 191st name); Python's os.sysconf_names lacks it
_SC_LEVEL2_CACHE_SIZE = 191


def l2_cache_size() -> int:
    """``sysconf(_SC_LEVEL2_CACHE_SIZE)`` as ONNX Runtime reads it on Linux/glibc; 0 if unknown."""
    name = os.sysconf_names.get("SC_LEVEL2_CACHE_SIZE", _SC_LEVEL2_CACHE_SIZE if sys.platform.startswith("linux") else None)
    try:
        return max(0, int(os.sysconf(name))) if name is not None else 0
    except (ValueError, OSError):
        return 0


# --- Sizes that fit ---


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def largest_fitting(width: int, height: int, multiple: int, fits: Callable[[int, int], bool]) -> tuple[int, int] | None:
    """The largest size below (width, height) with about its aspect, sides multiples of ``multiple``, that fits."""
    long_side, short_side = max(width, height), min(width, height)
    for steps in range(long_side // multiple - 1, 0, -1):
        long_new = steps * multiple
        short_new = max(multiple, int(round(long_new * short_side / long_side / multiple)) * multiple)
        size = (long_new, short_new) if width >= height else (short_new, long_new)
        if fits(*size):
            return size
    return None


def area_of(width: int, height: int, vae_scale_factor: int) -> int:
    return (width // vae_scale_factor) * (height // vae_scale_factor)

