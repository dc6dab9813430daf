"""Load on a running trt-bgswap server: N clients for T seconds, every answer checked against its own request.

Bounded by design: a request count and a duration cap, loopback addresses only, and the run
stops by itself. Requests are seeded, so each has exactly one right answer; the reference
answers are taken first, one request at a time, and every 200 under load must carry its own
request's bytes (a batch that mixed up rows, or a proxy that crossed responses, fails it). The
server answers batched requests bit-identically to requests alone, so equality is exact.

Reports throughput (verified answers per second), latency p50/p95/p99 of the answered requests,
the share of 503 rejections, errors (other statuses, wrong answers, broken connections) and
which replica (``X-Replica``) answered.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import ipaddress
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from trt_bgswap.errors import UsageError

RETRYABLE = frozenset({500, 502, 503})  # a dead replica (Ray's proxy answers 500/502) or a full queue


@dataclass(frozen=True)
class LoadRequest:
    route: str
    fields: tuple[tuple[str, "str | bytes"], ...]

    @property
    def name(self) -> str:
        return ",".join(f"{k}={v if isinstance(v, str) else hashlib.sha256(v).hexdigest()[:8]}" for k, v in self.fields)


@dataclass
class Outcome:
    request: int  # index into the request pool
    status: int  # 0: no HTTP answer (connection error)
    seconds: float
    attempts: int
    replica: str | None = None
    digest: str | None = None
    error: str | None = None
    retry_causes: tuple[str, ...] = ()  # what each failed attempt got ("500: <body>"), before a retry
    retry_after: float | None = None  # the server's Retry-After on a 503


@dataclass
class LoadReport:
    clients: int
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)
    wrong: int = 0  # 200 answers whose bytes are not their own request's

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    def summary(self) -> dict[str, object]:
        lat = np.asarray([o.seconds for o in self.ok], dtype=np.float64)
        statuses = Counter(o.status for o in self.outcomes)
        n = len(self.outcomes)
        pct = (lambda q: round(float(np.percentile(lat, q)), 4)) if len(lat) else (lambda q: None)
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "requests": n,
            "answered_200": len(self.ok),
            "throughput_per_s": round(len(self.ok) / self.seconds, 3) if self.seconds else 0.0,
            "latency_p50_s": pct(50),
            "latency_p95_s": pct(95),
            "latency_p99_s": pct(99),
            "rejected_503": statuses.get(503, 0),
            "rejection_rate": round(statuses.get(503, 0) / n, 4) if n else 0.0,
            "wrong_answers": self.wrong,
            "connection_errors": statuses.get(0, 0),
            "other_statuses": {str(k): v for k, v in statuses.items() if k not in (200, 503, 0)},
            "retried": sum(1 for o in self.outcomes if o.attempts > 1),
            "retry_causes": dict(Counter(c for o in self.outcomes for c in o.retry_causes)),
            "replicas": dict(Counter(o.replica for o in self.ok if o.replica)),
        }


def check_loopback(host: str) -> None:
    """Load is only ever sent to this machine."""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise UsageError(f"host {host!r}: the load test only targets loopback (127.0.0.1, ::1, localhost)")


def encode_multipart(fields: Sequence[tuple[str, "str | bytes"]]) -> tuple[bytes, str]:
    """multipart/form-data as browsers and curl send it: bytes values as file parts."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{name}"' if isinstance(value, bytes) else "")
        out.write(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode())
        out.write(value if isinstance(value, bytes) else value.encode())
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


class Client:
    def __init__(self, host: str, port: int, token: str | None = None, timeout: float = 600.0) -> None:
        check_loopback(host)
        self.host, self.port, self.timeout = host, port, timeout
        self.token = token
        self.answered: list[int] = []  # statuses in order of arrival (progress for whoever watches a run)
        self.replicas: list[str] = []  # X-Replica of each 200, in order of arrival

    def send(self, req: LoadRequest) -> tuple[int, dict[str, str], bytes]:
        body, ctype = encode_multipart(req.fields)
        headers = {"Content-Type": ctype}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("POST", req.route, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def attempt(self, index: int, req: LoadRequest, retries: int) -> Outcome:
        """One request, retried on 500/502/503 and broken connections up to ``retries`` times."""
        t0 = time.perf_counter()
        attempts = 0
        causes: list[str] = []
        while True:
            attempts += 1
            try:
                status, headers, body = self.send(req)
            except (OSError, http.client.HTTPException) as e:
                status, headers, body = 0, {}, f"{type(e).__name__}: {e}".encode()
            if status == 200 or status not in RETRYABLE | {0} or attempts > retries:
                break
            causes.append(f"{status}: {body[:120].decode('utf-8', 'replace')}")
            time.sleep(min(float(headers.get("retry-after", "0.2") or 0.2), 2.0))
        self.answered.append(status)
        if status == 200 and "x-replica" in headers:
            self.replicas.append(headers["x-replica"])
        out = Outcome(index, status, time.perf_counter() - t0, attempts, headers.get("x-replica"), retry_causes=tuple(causes))
        if status == 200:
            out.digest = hashlib.sha256(body).hexdigest()
        else:
            out.error = body[:300].decode("utf-8", "replace")
            retry_after = headers.get("retry-after", "")
            out.retry_after = float(retry_after) if retry_after.isdigit() else None
        return out


def seeded_requests(photos: Sequence[bytes], count: int, steps: int = 2, size: str | None = None, mask_share: float = 0.25) -> list[LoadRequest]:
    """``count`` distinct requests: replace with seed i and one of a few prompts, and some masks."""
    prompts = ("a sunny beach, photograph", "a forest at night", "a snowy mountain", "a city street")
    every = round(1 / mask_share) if mask_share > 0 else 0  # every n-th request is a mask
    out = []
    for i in range(count):
        image = photos[i % len(photos)]
        if every and i % every == every - 1:
            out.append(LoadRequest("/v1/mask", (("image", image),)))
            continue
        fields: list[tuple[str, str | bytes]] = [("image", image), ("prompt", prompts[i % len(prompts)]), ("seed", str(1000 + i)), ("steps", str(steps))]
        if size:
            fields.append(("size", size))
        out.append(LoadRequest("/v1/replace", tuple(fields)))
    return out


def reference_answers(client: Client, requests: Sequence[LoadRequest]) -> list[str]:
    """Each request's answer alone (sha256), the truth the load run is checked against."""
    digests = []
    for i, req in enumerate(requests):
        o = client.attempt(i, req, retries=5)
        if o.status != 200 or o.digest is None:
            raise UsageError(f"reference request {req.name} failed with {o.status}: {o.error}")
        digests.append(o.digest)
    return digests


def run_load(
    client: Client,
    requests: Sequence[LoadRequest],
    expected: Sequence[str] | None,
    clients: int,
    duration_s: float,
    max_requests: int,
    retries: int = 0,
    backoff: bool = False,
) -> LoadReport:
    """``clients`` threads send requests (round robin over the pool) until ``duration_s`` or ``max_requests``.

    ``backoff``: a client answered 503 waits the Retry-After seconds (at most 5) before its next
    request, as a well-behaved client does; without it, rejected clients hammer the server.
    """
    if clients < 1 or duration_s <= 0 or max_requests < 1:
        raise UsageError(f"clients={clients}, duration={duration_s}, max_requests={max_requests}: give positive values")
    report = LoadReport(clients, 0.0)
    lock = threading.Lock()
    counter = iter(range(max_requests))
    stop_at = time.monotonic() + duration_s

    def worker() -> None:
        while time.monotonic() < stop_at:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            index = n % len(requests)
            outcome = client.attempt(index, requests[index], retries)
            with lock:
                report.outcomes.append(outcome)
                if outcome.status == 200 and expected is not None and outcome.digest != expected[index]:
                    report.wrong += 1
            if backoff and outcome.status == 503:
                time.sleep(min(outcome.retry_after or 1.0, 5.0, max(stop_at - time.monotonic(), 0.0)))

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.seconds = time.monotonic() - t0
    return report


class ServerProcess:
    """`trt-bgswap serve` in a child process on 127.0.0.1 and a free port (read from uvicorn's "running on" line)."""

    RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")

    def __init__(self, args: Sequence[str]) -> None:
        self.args = list(args)
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.lines: list[str] = []

    def start(self, ready_timeout: float = 300.0, ready: Callable[[], bool] | None = None) -> "ServerProcess":
        """Start it and wait until ``ready()`` (default: the port is known)."""
        launcher = "import sys; from trt_bgswap.cli import main; sys.exit(main(sys.argv[1:]))"  # the console script, without relying on PATH
        cmd = [sys.executable, "-c", launcher, "serve", "--host", "127.0.0.1", "--port", "0", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + ready_timeout
        while not self.port or (ready is not None and not ready()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                if self.proc.poll() is None:  # never leave a half-started server behind
                    self.proc.kill()
                    self.proc.wait()
                raise UsageError(f"the server did not start (exit {self.proc.poll()}):\n{self.log}")
            time.sleep(0.1)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = self.RUNNING.search(line)
            if m:
                self.port = int(m.group(1))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def rss_bytes(self) -> int:
        """The server's resident set size now (Linux /proc)."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)
