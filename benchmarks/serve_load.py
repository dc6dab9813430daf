"""Load test of `trt-bgswap serve` (uvicorn) and of the Ray Serve deployment, on this machine only.

    python benchmarks/serve_load.py --models DIR [--target uvicorn|ray|both] [--clients 4] [--duration 60]
                                    [--soak-minutes 10] [--out benchmarks/results/serve_load.json]

For each target: the server starts on 127.0.0.1 with ``--max-queue Q --max-batch B``; a pool of
seeded requests (real photos from scikit-image, several prompts and aspect ratios, a quarter of
them masks) gets its reference answers one at a time; then

1. **load**: ``--clients`` clients for ``--duration`` seconds (at most ``--max-requests``):
   throughput of verified answers, latency p50/p95/p99, every answer checked against its own
   request's reference bytes;
2. **twice capacity**: 2 x (Q + B) clients (what the server can hold: the queue and a running
   batch) for the same time: the share answered 503 + Retry-After (a rejected client waits the
   Retry-After seconds before its next request, as a well-behaved client does), and that the
   admitted ones are still right;
3. **soak** (uvicorn only, ``--soak-minutes``): the load of 1. for that long with the server's
   RSS sampled every 5 s; growth = median RSS of the last minute over the first minute's
   (after one minute of warm-up traffic, so allocator pools and caches have settled).

Bounded: loopback only, request counts and durations capped, servers stopped at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from trt_bgswap.benchmarking.serve_load import Client, ServerProcess, reference_answers, run_load, seeded_requests

log = logging.getLogger("serve_load")


def photos() -> list[bytes]:
    from skimage import data

    out = []
    for name, size in (("astronaut", (160, 120)), ("chelsea", (120, 160)), ("coffee", (150, 150)), ("rocket", (110, 150))):
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").resize(size, Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def load_phases(client: Client, args: argparse.Namespace, capacity: int) -> dict[str, object]:
    pool = seeded_requests(photos(), args.pool, steps=args.steps)
    t0 = time.monotonic()
    expected = reference_answers(client, pool)
    alone = (time.monotonic() - t0) / len(pool)
    load = run_load(client, pool, expected, args.clients, args.duration, args.max_requests).summary()
    log.info("load: %s", load)
    over = run_load(client, pool, expected, 2 * capacity, args.duration, args.max_requests, backoff=True).summary()
    log.info("twice capacity: %s", over)
    return {"sequential_s_per_request": round(alone, 4), "load": load, "twice_capacity": over}


def server_args(args: argparse.Namespace) -> list[str]:
    return [
        "--models", str(args.models), "--provider", args.provider, "--threads", str(args.threads), "--max-queue", str(args.max_queue),
        "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms), "--timeout", "600",
    ]


def bench_uvicorn(args: argparse.Namespace) -> dict[str, object]:
    server = ServerProcess(server_args(args))
    client_box: list[Client] = []

    def ready() -> bool:
        if not server.port:
            return False
        client_box[:] = [Client("127.0.0.1", server.port, timeout=600)]
        try:
            import urllib.request

            return urllib.request.urlopen(f"http://127.0.0.1:{server.port}/readyz", timeout=5).status == 200
        except OSError:
            return False

    t0 = time.monotonic()
    server.start(ready=ready)
    out: dict[str, object] = {"ready_s": round(time.monotonic() - t0, 2)}
    client = client_box[0]
    try:
        out.update(load_phases(client, args, args.max_queue + args.max_batch))
        if args.soak_minutes > 0:
            out["soak"] = soak(server, client, args)
    finally:
        out["exit_code"] = server.stop()
    return out


def soak(server: ServerProcess, client: Client, args: argparse.Namespace) -> dict[str, object]:
    pool = seeded_requests(photos(), args.pool, steps=args.steps)
    expected = reference_answers(client, pool)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - t0, server.rss_bytes()))
            stop.wait(5.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds = args.soak_minutes * 60.0
    report = run_load(client, pool, expected, args.clients, seconds, max_requests=10**7).summary()
    stop.set()
    sampler.join()
    first = [r for t, r in samples if 60.0 <= t < 120.0]
    last = [r for t, r in samples if t >= seconds - 60.0]
    growth = (statistics.median(last) / statistics.median(first) - 1.0) if first and last else None
    log.info("soak: %s; RSS growth %s", report, growth)
    return {
        "minutes": args.soak_minutes,
        "load": report,
        "rss_mib_first_minute_after_warmup": round(statistics.median(first) / 2**20, 1) if first else None,
        "rss_mib_last_minute": round(statistics.median(last) / 2**20, 1) if last else None,
        "rss_growth": round(growth, 4) if growth is not None else None,
        "rss_mib_samples": [(round(t), round(r / 2**20, 1)) for t, r in samples],
    }


def bench_ray(args: argparse.Namespace) -> dict[str, object]:
    import ray
    from ray import serve

    from trt_bgswap.server.config import ServerConfig
    from trt_bgswap.server.ray_app import RayOptions, start

    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    port = args.ray_port
    config = ServerConfig(models=args.models.resolve(), provider=args.provider, threads=args.threads, max_queue=args.max_queue, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, timeout=600)
    try:
        start(config, RayOptions(port=port, replicas=args.replicas, cpus_per_replica=2.0 / args.replicas))
        out: dict[str, object] = {"ready_s": round(time.monotonic() - t0, 2), "replicas": args.replicas}
        out.update(load_phases(Client("127.0.0.1", port, timeout=600), args, args.replicas * (args.max_queue + args.max_batch)))
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, required=True, help="exported model folder")
    p.add_argument("--target", choices=["uvicorn", "ray", "both"], default="both")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=60.0, help="seconds per load phase")
    p.add_argument("--max-requests", type=int, default=2000, help="cap per load phase")
    p.add_argument("--pool", type=int, default=12, help="distinct seeded requests")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--max-queue", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--ray-port", type=int, default=8766)
    p.add_argument("--soak-minutes", type=float, default=0.0)
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results: dict[str, object] = {
        "command": " ".join(["python", "benchmarks/serve_load.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_before": os.getloadavg()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if args.target in ("uvicorn", "both"):
        results["uvicorn"] = bench_uvicorn(args)
    if args.target in ("ray", "both"):
        results["ray"] = bench_ray(args)
    results["machine"]["load_after"] = os.getloadavg()  # type: ignore[index]
    text = json.dumps(results, indent=2, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
