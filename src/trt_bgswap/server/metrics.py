"""What the operator scrapes at /metrics (Prometheus text format, prometheus_client).

One registry per application (two apps in one process, as tests and Ray replicas may make, do not
collide). Names follow Prometheus' conventions: ``_total`` counters, ``_seconds`` histograms.
Images per second is the ``bgswap_images_total`` counter for ``rate()``, and a gauge over the last
minute for a glance without a Prometheus server. Device memory is reported where a CUDA device is
visible (through cuda-python, as the TensorRT backend uses it).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Engine and request latencies span ~1 ms (a tiny mask) to minutes (a full-size CPU generation).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 60.0


class _DeviceMemory(Collector):
    """Free and total memory of CUDA device 0, read at scrape time (nothing where there is no device)."""

    def __init__(self) -> None:
        from trt_bgswap.runtime.cuda_device import device_count_via_driver

        self.available = device_count_via_driver() > 0

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if not self.available:
            return []
        from trt_bgswap.errors import BackendUnavailable
        from trt_bgswap.runtime.cuda_device import check, cudart

        try:
            free, total = check(cudart().cudaMemGetInfo())
        except BackendUnavailable as e:  # no cuda-python: say so once and stop asking
            log.warning("device memory metrics off: %s", e)
            self.available = False
            return []
        g = GaugeMetricFamily("bgswap_device_memory_bytes", "CUDA device memory", labels=["device", "kind"])
        g.add_metric(["0", "free"], float(free))
        g.add_metric(["0", "total"], float(total))
        g.add_metric(["0", "used"], float(total - free))
        return [g]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bgswap_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.queue_depth = Gauge("bgswap_queue_depth", "requests waiting for the engines", registry=r)
        self.queue_capacity = Gauge("bgswap_queue_capacity", "--max-queue", registry=r)
        self.in_flight = Gauge("bgswap_jobs_running", "requests in the batch the engines are running", registry=r)
        self.batch_size = Histogram("bgswap_batch_size", "requests per engine batch", ["stage"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.stage_seconds = Histogram("bgswap_stage_seconds", "latency per stage (decode, queue, mask, generate, composite, encode)", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("bgswap_request_seconds", "arrival to answer, per route", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("bgswap_images", "images produced (results and masks)", registry=r)
        self.dropped = Counter("bgswap_dropped_jobs", "queued work dropped before it ran", ["reason"], registry=r)
        self.ready = Gauge("bgswap_ready", "1 when every model is loaded and warmed", registry=r)
        self.batching_exact = Gauge("bgswap_batching_exact", "1 where a batch was measured bit-identical to its requests alone (batching on)", ["stage"], registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds
        r.register(_DeviceMemory())
        self._done: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        Gauge("bgswap_images_per_second", f"images produced per second over the last {RATE_WINDOW_S:.0f} s", registry=r).set_function(self._rate)

    def image_done(self, n: int = 1) -> None:
        self.images.inc(n)
        now = time.monotonic()
        with self._lock:
            self._done.extend([now] * n)
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._done and self._done[0] < now - RATE_WINDOW_S:
            self._done.popleft()

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return len(self._done) / RATE_WINDOW_S
