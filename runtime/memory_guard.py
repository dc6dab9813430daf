"""Know what a generation size costs before running it, and refuse (or pick a smaller size) when it does not fit.

The guard is made from an export folder before any graph is opened: the manifest's memory
facts (measured by the exporter, :mod:`trt_bgswap.export.memory_facts`), which graphs the
chosen backend will open, whether ``trt-bgswap build`` tiled their attention (the build
index says so), and the size of their weights. :mod:`trt_bgswap.memory` does the arithmetic.
It guards host memory, so it applies where ONNX Runtime runs on the CPU; on a GPU the
activations live in device memory, which TensorRT and ONNX Runtime's CUDA provider size
(and refuse) themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from trt_bgswap.build_index import read_index
from trt_bgswap.errors import UsageError
from trt_bgswap.manifest import InpaintConfig, Manifest
from trt_bgswap.memory import (
    AREA_FIXED,
    Available,
    Estimate,
    GraphMemory,
    SAFETY_MARGIN,
    area_kind,
    area_of,
    available_memory,
    estimate_peak,
    facts_from_json,
    flash_attention_available,
    gib,
    largest_fitting,
    process_rss,
)
from trt_bgswap.runtime.backends import BackendChoice
from trt_bgswap.runtime.sizing import generation_size
from trt_bgswap.runtime.residency import files_bytes
from trt_bgswap.specs import UNET, UNET_STEP, VAE_DECODER, VAE_ENCODER

log = logging.getLogger(__name__)

BOUNDED = "bounded"  # engines/attention.py's index value for graphs whose attention is tiled
GUIDED_MODELS = (UNET, UNET_STEP)  # their batch doubles when classifier-free guidance runs
GENERATION_MODELS = (VAE_ENCODER, VAE_DECODER)  # they run stacked generations together with the UNet


def _weights_bytes(folder: Path, manifest: Manifest, names: list[str], resident_budget: int | None = None) -> int:
    """Bytes of each opened graph's file and its external weights (``model.onnx`` + ``model.onnx_data``).

    ``resident_budget`` (``--low-memory``, :mod:`~.residency`): sessions stay open only up to that many
    bytes besides the one running, so at most the budget plus the largest graph is resident.
    """
    sizes = [files_bytes(folder / manifest.models[name].file) for name in names]
    if resident_budget is None or not sizes:
        return sum(sizes)
    return min(sum(sizes), resident_budget + max(sizes))


@dataclass
class MemoryGuard:
    """What one loaded pipeline costs at a size, and whether it fits what is available."""

    folder: Path
    config: InpaintConfig
    facts: Mapping[str, GraphMemory]
    graphs: tuple[str, ...]  # the graphs that run a generation (all opened ones)
    bounded: frozenset[str]  # graphs whose attention is tiled on this host
    weights: int
    base: int  # this process's RSS before the graphs were opened
    budget: int | None = None
    budget_source: str = "--memory-budget"
    unbuilt_bounded: frozenset[str] = frozenset()  # graphs `trt-bgswap build` would tile (hint in messages)

    @classmethod
    def for_folder(
        cls,
        folder: str | Path,
        choice: BackendChoice,
        names: list[str],
        manifest: Manifest | None = None,
        budget: int | None = None,
        budget_source: str = "--memory-budget",
        resident_budget: int | None = None,
    ) -> "SizeGuard | None":
        """The guard for ``names`` opened from ``folder`` on ``choice``; None where it does not apply.

        ``resident_budget``: with ``--low-memory`` the bytes of sessions kept open (0: one at a time).

        It does not apply on GPU backends (device memory). An export without memory facts (made
        before they were recorded) gets an :class:`UnmeasuredGuard`.
        """
        folder = Path(folder)
        manifest = manifest if manifest is not None else Manifest.load(folder)
        if choice.engine != "ort" or choice.provider != "cpu" or manifest.inpaint is None:
            return None
        facts = facts_from_json(manifest.memory)
        if facts is None:
            return UnmeasuredGuard.for_folder(folder, manifest.inpaint, budget, budget_source)
        # a graph whose cost grows with the size but was not measured (the exporter could not): no estimate is safe
        unmeasured = tuple(n for n in names if n not in facts and area_kind(manifest.models[n].spec.symbols()) != AREA_FIXED)
        if unmeasured:
            return UnmeasuredGuard.for_folder(folder, manifest.inpaint, budget, budget_source, unmeasured)
        index = read_index(folder, choice.engine, choice.provider) or {}
        flash = flash_attention_available()
        built = {n for n in names if n in index and index[n].attention == BOUNDED}
        has_attention = {n for n in names if n in facts and facts[n].attention}
        return cls(
            folder=folder,
            config=manifest.inpaint,
            facts=facts,
            graphs=tuple(names),
            bounded=frozenset(built if flash else ()),
            weights=_weights_bytes(folder, manifest, names, resident_budget),
            base=process_rss(),
            budget=budget,
            budget_source=budget_source,
            unbuilt_bounded=frozenset(has_attention - built if flash else ()),
        )

    def _runs(self, guidance: float, generations: int) -> dict[str, int]:
        """Each graph's batch: the VAE and the UNet run stacked generations together, the UNet twice over with guidance."""
        guided = 2 if guidance > 1.0 else 1
        return {n: generations * guided if n in GUIDED_MODELS else generations if n in GENERATION_MODELS else 1 for n in self.graphs}

    def estimate(
        self, width: int, height: int, guidance: float, photo_pixels: int = 0, bounded: frozenset[str] | None = None, generations: int = 1
    ) -> Estimate:
        """The predicted peak of ``generations`` stacked generations at ``width`` x ``height`` (photos of ``photo_pixels`` each)."""
        return estimate_peak(
            self.facts,
            self._runs(guidance, generations),
            self.bounded if bounded is None else bounded,
            self.weights,
            self.base,
            area_of(width, height, self.config.vae_scale_factor),
            photo_pixels * generations,
        )

    def need(self, est: Estimate) -> int:
        """The prediction plus the safety margin on what the run adds (weights are known exactly)."""
        return est.resident + int((est.total - est.resident) * (1.0 + SAFETY_MARGIN))

    def available(self) -> Available:
        return available_memory(self.budget, self.budget_source)

    def _fits(self, guidance: float, photo_pixels: int, limit: int, bounded: frozenset[str] | None = None):  # noqa: ANN202
        return lambda w, h: self.need(self.estimate(w, h, guidance, photo_pixels, bounded)) <= limit

    def check(self, size: tuple[int, int], guidance: float, photo_pixels: int = 0, what: str | None = None) -> None:
        """Raise a one-line UsageError when generating at ``size`` would not fit, naming a size that does."""
        avail = self.available()
        if avail.bytes is None:
            return
        width, height = size
        est = self.estimate(width, height, guidance, photo_pixels)
        need = self.need(est)
        what = what or f"--size {width}x{height}"
        log.debug("%s: predicted peak %s (%s); %s %s", what, gib(need), est, avail.source, gib(avail.bytes))
        if need <= avail.bytes:
            return
        raise UsageError(f"{what} needs about {gib(need)} ({est.why()}) but {self._limit(avail)}: {self._advice(width, height, guidance, photo_pixels, avail.bytes)}")

    def stackable(self, size: tuple[int, int], guidance: float, most: int, photo_pixels: int = 0) -> int:
        """How many generations of ``size`` may run stacked (at most ``most``, at least 1: one was checked alone)."""
        avail = self.available()
        if avail.bytes is None or most <= 1:
            return max(1, most)
        fits = [k for k in range(2, most + 1) if self.need(self.estimate(*size, guidance, photo_pixels, generations=k)) <= avail.bytes]
        n = max(fits, default=1)
        if n < most:
            log.info("stacking %d generations at a time, not %d: more would not fit in memory (%s)", n, most, self._limit(avail))
        return n

    def fit(self, size: tuple[int, int], guidance: float, photo_pixels: int = 0, warn: bool = True) -> tuple[int, int]:
        """``size`` if it fits, else the largest size of about its aspect that does (the default-size policy's cap)."""
        avail = self.available()
        if avail.bytes is None:
            return size
        fits = self._fits(guidance, photo_pixels, avail.bytes)
        if fits(*size):
            return size
        smaller = largest_fitting(size[0], size[1], self.config.size_multiple, fits)
        if smaller is None:  # raises with the full explanation
            self.check(size, guidance, photo_pixels, f"generating at {size[0]}x{size[1]} (the default size)")
        assert smaller is not None
        est = self.estimate(size[0], size[1], guidance, photo_pixels)
        if warn:
            log.warning(
                "generating at %dx%d instead of %dx%d: that would need about %s (%s) but %s",
                smaller[0], smaller[1], size[0], size[1], gib(self.need(est)), est.why(), self._limit(avail),
            )  # fmt: skip
        return smaller

    def _limit(self, avail: Available) -> str:
        assert avail.bytes is not None
        if avail.source == "available":
            return f"only {gib(avail.bytes)} are available"
        if avail.source.startswith("the budget"):
            return f"{avail.source} is {gib(avail.bytes)}"
        return f"only {gib(avail.bytes)} are {avail.source}"

    def _advice(self, width: int, height: int, guidance: float, photo_pixels: int, limit: int) -> str:
        smaller = largest_fitting(width, height, self.config.size_multiple, self._fits(guidance, photo_pixels, limit))
        if smaller:
            parts = [f"use --size {smaller[0]}x{smaller[1]} or smaller"]
        elif photo_pixels and self.need(self.estimate(self.config.size_multiple, self.config.size_multiple, guidance)) <= limit:
            parts = ["downscale the photo (no size fits beside its own arrays)"]
        else:
            parts = ["no size fits; free memory or raise the budget"]
        if self.unbuilt_bounded:
            tiled = self.bounded | self.unbuilt_bounded
            est = self.estimate(width, height, guidance, photo_pixels, tiled)
            if self.need(est) <= limit:
                parts.append(f"or run `trt-bgswap build {self.folder}` first (tiled attention: about {gib(self.need(est))})")
        return ", ".join(parts)


_WARNED: set[Path] = set()


def _warn_unmeasured(folder: Path, missing: str, budget_source: str | None) -> None:
    """Once per folder (the CLI makes a guard before loading, the pipeline another while loading)."""
    if folder.resolve() in _WARNED:
        return
    _WARNED.add(folder.resolve())
    log.warning("%s: sizes above the model's native area are refused; re-export it to get the memory check", missing)
    if budget_source is not None:
        log.warning("%s cannot be checked: %s", budget_source, missing)


@dataclass
class UnmeasuredGuard:
    """The guard of an export made before memory facts were recorded: what a size costs is unknown.

    Sizes up to the one the default-size policy picks for the same aspect (the model's native
    area, what such exports have always run at) run unchecked; larger ones are refused, because
    self-attention memory grows with the square of the pixels (an older export took 12.9 GB at
    768x768 and the whole machine at 1024x1024 with the tiny models). Re-exporting records the
    facts and lifts the limit to what memory allows.
    """

    folder: Path
    config: InpaintConfig
    graphs: tuple[str, ...] = ()  # the graphs without facts; () for none at all

    @classmethod
    def for_folder(
        cls, folder: Path, config: InpaintConfig, budget: int | None = None, budget_source: str = "--memory-budget", graphs: tuple[str, ...] = ()
    ) -> "UnmeasuredGuard":
        guard = cls(folder, config, graphs)
        _warn_unmeasured(folder, guard.missing(), budget_source if budget is not None else None)
        return guard

    def missing(self) -> str:
        """What the folder lacks, for messages."""
        return f"{self.folder} records no memory facts" + (f" for {', '.join(self.graphs)}" if self.graphs else "")

    def _why(self) -> str:
        return "its exporter could not measure them" if self.graphs else "exported by an older trt-bgswap"

    def _native(self, width: int, height: int) -> bool:
        """Whether ``width`` x ``height`` is no larger than the default-size policy's size for its aspect."""
        policy = generation_size(width, height, self.config.default_size, self.config.size_multiple)
        return width * height <= policy[0] * policy[1]

    def check(self, size: tuple[int, int], guidance: float, photo_pixels: int = 0, what: str | None = None) -> None:
        """Raise a one-line UsageError for a size above the native area, naming the largest native one."""
        width, height = size
        if self._native(width, height):
            return
        policy = generation_size(width, height, self.config.default_size, self.config.size_multiple)
        smaller = largest_fitting(width, height, self.config.size_multiple, lambda w, h: w * h <= policy[0] * policy[1])
        raise UsageError(
            f"{what or f'--size {width}x{height}'}: {self.missing()} ({self._why()}), "
            f"so the memory this size needs is unknown (attention memory grows with the square of the pixels): "
            f"re-export it with `trt-bgswap export` to get the memory check, or use --size {smaller[0]}x{smaller[1]} or smaller"
        )

    def fit(self, size: tuple[int, int], guidance: float, photo_pixels: int = 0, warn: bool = True) -> tuple[int, int]:
        """``size`` (the policy's own sizes are native)."""
        return size

    def stackable(self, size: tuple[int, int], guidance: float, most: int, photo_pixels: int = 0) -> int:
        """``most``: stacking at native sizes is what such exports have always done."""
        return max(1, most)


SizeGuard = MemoryGuard | UnmeasuredGuard  # what Pipeline.memory holds: check, fit, stackable, config


def guard_for_run(
    folder: str | Path,
    provider: str = "auto",
    budget: int | None = None,
    budget_source: str = "--memory-budget",
    stages: Collection[str] | None = None,
    resident_budget: int | None = None,
) -> SizeGuard | None:
    """The guard of the graphs ``Pipeline.load(folder, provider, stages=stages)`` would open, made without opening any.

    For callers that want to refuse a size before loading (the CLI does, once per batch).
    """
    from trt_bgswap.runtime.assemble import STAGES, models_to_open
    from trt_bgswap.runtime.loader import resolve_backend

    folder = Path(folder)
    manifest = Manifest.load(folder)
    choice = resolve_backend(provider, announce=False)  # Pipeline.load logs the choice when it loads
    if choice.engine != "ort" or choice.provider != "cpu":
        return None
    names = models_to_open(manifest, False, STAGES if stages is None else stages)  # as Pipeline.load opens them on the CPU
    return MemoryGuard.for_folder(folder, choice, names, manifest, budget, budget_source, resident_budget)
