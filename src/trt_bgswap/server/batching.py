"""The bounded queue and the batch worker: one thread owns the engines; requests wait together and run together.

A request becomes a :class:`Job` (decoded photo, subject alpha if the client gave one, checked
options, a ``concurrent.futures.Future``) and is put on a bounded queue; a full queue is the
caller's 503. The worker takes the first job, waits up to ``batch_wait`` for more (up to
``max_batch``), and runs the batch stage by stage through the pipeline's batch calls: every
photo that needs RMBG in one engine call (``Pipeline.mask_batch``), then the generations
grouped by ``Pipeline.generation_key`` (same size, steps and guidance), each group with its
UNet batch stacked (``Pipeline.replace_batch``).
A job whose client left or timed out before it ran is cancelled and skipped (``Future.cancel``
succeeds only while it waits). A failure inside a batch is retried job by job, so one bad
request never fails its neighbours, and each error is delivered to its own request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from trt_bgswap.api import Photo
from trt_bgswap.errors import BgSwapError
from trt_bgswap.runtime.color_management import ColorSpace
from trt_bgswap.runtime.compose import CompositeOptions
from trt_bgswap.runtime.mask_ops import MaskOptions
from trt_bgswap.runtime.pipeline import GenerationJob, GenerationOptions, Pipeline, Result
from trt_bgswap.server.metrics import Metrics

log = logging.getLogger(__name__)

MASK, REPLACE = "mask", "replace"
T = TypeVar("T")


class QueueFull(Exception):
    """The bounded queue is full; the request is answered 503 with Retry-After."""


class InternalError(Exception):
    """An unexpected failure, logged with its traceback on the server; the client gets one line, no traceback."""


@dataclass
class Job:
    kind: str  # MASK or REPLACE
    photo: Photo
    alpha: np.ndarray | None  # the subject's alpha when the client gave it (mask or the photo's transparency); None: RMBG
    from_masker: bool = False  # set when RMBG made ``alpha`` (the composite refines only the masker's alpha)
    options: GenerationOptions | None = None  # a generated background (seed set)
    color: tuple[int, int, int] | None = None  # a solid background
    mask_options: MaskOptions = MaskOptions()
    cutout: bool = False  # a mask job answers the RGBA cut-out
    composite_options: CompositeOptions = CompositeOptions()  # how a replace job's subject goes onto its background
    future: "Future[Any]" = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    batch_size: int = 1  # how many requests shared this job's largest engine batch
    drop_reason: str = "cancelled"

    @property
    def color_space(self) -> ColorSpace:
        return ColorSpace(self.photo.icc)


class Batcher:
    def __init__(self, pipe: Pipeline, metrics: Metrics, max_queue: int, max_batch: int, batch_wait_s: float) -> None:
        self.pipe = pipe
        self.metrics = metrics
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.batch_masks = True  # set from the warm-up's exactness check
        self.batch_generation = True
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bgswap-batcher", daemon=True)
        self._seconds_per_job = 1.0  # running estimate for Retry-After
        metrics.queue_capacity.set(max_queue)

    # --- the request side ---

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        self.metrics.queue_depth.set(self._queue.qsize())

    def full(self) -> bool:
        return self._queue.full()

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on by a batch (at least 1)."""
        waiting = self._queue.qsize() + self.max_batch
        return max(1, round(waiting * self._seconds_per_job / self.max_batch))

    # --- the worker ---

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued job, then end the worker."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(self._queue.get(timeout=max(remaining, 0.0)) if remaining > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            self.metrics.queue_depth.set(self._queue.qsize())
            started = time.monotonic()
            live = self._start(batch)
            if live:
                self.metrics.in_flight.set(len(live))
                try:
                    self.run(live)
                finally:
                    self.metrics.in_flight.set(0)
                per_job = (time.monotonic() - started) / len(live)
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * per_job

    def _start(self, batch: list[Job]) -> list[Job]:
        live = []
        now = time.monotonic()
        for job in batch:
            if job.future.set_running_or_notify_cancel():
                self.metrics.stage_seconds.labels("queue").observe(now - job.enqueued)
                live.append(job)
            else:  # counted in bgswap_dropped_jobs_total when it was cancelled
                log.info("skipped a queued %s job (%s)", job.kind, job.drop_reason)
        return live

    def run(self, jobs: Sequence[Job]) -> None:
        """Masks for every job that needs RMBG (one engine call), then each job's answer."""
        need = [j for j in jobs if j.alpha is None]
        if need:
            mask = self.pipe.mask_batch if self.batch_masks else lambda ims: [self.pipe.mask(im) for im in ims]
            alphas = self._stage("mask", need, lambda js: mask([j.color_space.to_srgb(j.photo.rgb) for j in js]))
            for job, alpha in zip(need, alphas):
                job.alpha, job.from_masker = alpha, True
        pending = [j for j in jobs if not j.future.done()]
        for job in pending:
            if job.kind == MASK:
                job.future.set_result(job.alpha)
        solid = [j for j in pending if j.kind == REPLACE and j.color is not None]
        for job in solid:
            self._stage("composite", [job], lambda js: [self._solid(js[0])])
        groups: dict[tuple[Any, ...], list[Job]] = {}
        for job in pending:
            if job.kind == REPLACE and job.options is not None:
                key = self._key(job)
                if key is not None:
                    groups.setdefault(key, []).append(job)
        for group in groups.values():
            step = len(group) if self.batch_generation else 1
            for i in range(0, len(group), step):
                part = group[i : i + step]
                self._stage("generate", part, lambda js: self.pipe.replace_batch([self._generation_job(j) for j in js]))

    def _key(self, job: Job) -> tuple[Any, ...] | None:
        try:
            assert job.options is not None
            return self.pipe.generation_key(job.photo.rgb.shape[1], job.photo.rgb.shape[0], job.options)
        except Exception as e:  # noqa: BLE001 - delivered to this job's request
            self._fail(job, e)
            return None

    def _generation_job(self, job: Job) -> GenerationJob:
        assert job.options is not None and job.alpha is not None
        return GenerationJob(
            job.photo.rgb, job.alpha, job.options, job.mask_options, job.color_space, composite_options=job.composite_options, from_masker=job.from_masker
        )


    def _solid(self, job: Job) -> Result:
        return self.pipe.replace(
            job.photo.rgb, None, job.mask_options, alpha=job.alpha, background_color=job.color, color_space=job.color_space,
            composite_options=job.composite_options, from_masker=job.from_masker,
        )  # fmt: skip

    def _stage(self, stage: str, jobs: Sequence[Job], work: Callable[[Sequence[Job]], list[T]]) -> list[T | None]:
        """Run ``work`` on the jobs as one batch; if it fails, once per job so each gets its own error.

        Replace stages set each job's result; the mask stage hands the alphas back.
        """
        t0 = time.monotonic()
        try:
            out: list[T | None] = list(work(jobs))
            self.metrics.batch_size.labels(stage).observe(len(jobs))
            for job in jobs:
                job.batch_size = max(job.batch_size, len(jobs))
        except Exception as e:  # noqa: BLE001 - attribute the failure to the job(s) that cause it
            if len(jobs) == 1:
                self._fail(jobs[0], e)
                return [None]
            log.warning("a %s batch of %d failed (%s); running its jobs one by one", stage, len(jobs), " ".join(str(e).split())[:200])
            out = [self._stage(stage, [job], work)[0] for job in jobs]
            return out
        finally:
            self.metrics.stage_seconds.labels(stage).observe(time.monotonic() - t0)
        if stage != "mask":
            for job, result in zip(jobs, out):
                if not job.future.done():
                    job.future.set_result(result)
        return out

    @staticmethod
    def _fail(job: Job, e: BaseException) -> None:
        if job.future.done():
            return
        if isinstance(e, BgSwapError):
            job.future.set_exception(e)
        else:
            log.error("unexpected failure in a %s job", job.kind, exc_info=e)
            job.future.set_exception(InternalError(f"internal error ({type(e).__name__}); the server log has the details"))


def batching_is_exact(pipe: Pipeline, photos: Sequence[np.ndarray], prompt: str, steps: int = 1) -> dict[str, bool]:
    """Whether a batch of these sRGB photos equals each run alone, bit for bit, per stage (``mask``, ``generate``).

    Run at warm-up on the loaded engines: a row of a batched engine call equals the same input
    alone only if the backend computes each sample independently (ONNX Runtime's CPU convolutions
    and GEMMs do; cuDNN, cuBLAS and TensorRT may pick another algorithm per batch size), so it is
    measured on this machine and backend rather than assumed.
    """
    exact: dict[str, bool] = {}
    if pipe.can_mask and len(photos) > 1:
        alone = [pipe.mask(p) for p in photos]
        exact["mask"] = all(np.array_equal(a, b) for a, b in zip(alone, pipe.mask_batch(photos)))
    generator = pipe.stages.generator
    if pipe.config is not None and generator is not None and generator.max_batch != 1 and len(photos) > 1:
        size = (pipe.config.size_multiple, pipe.config.size_multiple)
        same = True
        for guidance in (1.0, 1.5):  # the plain and the guided (2N UNet rows) batch
            jobs = [
                GenerationJob(p, np.zeros(p.shape[:2], np.float32), GenerationOptions(prompt=f"{prompt} {i}", steps=steps, guidance=guidance, seed=i, size=size))
                for i, p in enumerate(photos)
            ]
            batch = pipe.replace_batch(jobs)
            same &= all(np.array_equal(pipe.replace_batch([j])[0].image, r.image) for j, r in zip(jobs, batch))
        exact["generate"] = same
    return exact
