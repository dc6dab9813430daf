"""`trt-bgswap serve`: the models loaded once behind HTTP (uvicorn), or as a Ray Serve deployment with --ray.

Everything is checked before a model loads (options, the model folder, the token file); the
server binds loopback unless told otherwise. SIGTERM (or Ctrl-C) stops accepting connections,
finishes the requests in flight and exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
from pathlib import Path
from types import FrameType

from trt_bgswap.cli.options import byte_size, float_range, int_range
from trt_bgswap.errors import BackendUnavailable, UsageError

log = logging.getLogger("trt_bgswap")

NAME = "serve"
HELP = "serve the models over HTTP (uvicorn, or Ray Serve with --ray)"
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt", "trt")
INSTALL_HINT = "pip install 'trt-bgswap[serve]'"


def add_arguments(s: argparse.ArgumentParser) -> None:
    from trt_bgswap.runtime.image_read import DEFAULT_MAX_PIXELS
    from trt_bgswap.server.config import DEFAULT_MAX_BYTES

    s.add_argument("--models", help="exported model folder (default: the per-user cache)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the server to the network (use --token-file)")
    s.add_argument("--port", type=int_range("--port", 0, 65535), default=8000, help="TCP port (0: any free port, logged)")
    s.add_argument("--max-queue", type=int_range("--max-queue", 1, 100_000), default=16, help="requests that may wait; more are answered 503 with Retry-After")
    s.add_argument("--max-batch", type=int_range("--max-batch", 1, 64), default=4, help="requests run as one engine batch where their shapes agree")
    s.add_argument("--batch-wait-ms", type=float_range("--batch-wait-ms", 0.0, 10_000.0), default=10.0, help="how long a request waits for others to batch with")
    s.add_argument("--max-pixels", type=int_range("--max-pixels", 1, 2**40), default=DEFAULT_MAX_PIXELS, help="refuse larger images with 413 (decompression-bomb guard)")
    s.add_argument("--max-bytes", type=int_range("--max-bytes", 1024, 2**40), default=DEFAULT_MAX_BYTES, help="refuse larger request bodies with 413")
    s.add_argument("--timeout", type=float_range("--timeout", 0.001, 86_400.0), default=300.0, help="seconds from arrival to answer; 504 after")
    s.add_argument("--token-file", type=Path, help="require 'Authorization: Bearer <token>' (the file's first line) on every route but /healthz")
    s.add_argument("--provider", choices=PROVIDERS, default="auto", help="auto (TensorRT engines, then ONNX Runtime CUDA, then CPU), trt, tensorrt/cuda or cpu")
    s.add_argument("--threads", type=int_range("--threads", 0, 256), default=0, help="intra-op threads (0: all cores)")
    s.add_argument("--low-memory", action="store_true", help="open each model only while its stage runs: far less memory, same results, slower")
    s.add_argument(
        "--memory-budget",
        type=byte_size,
        help="the most memory one generation (a batch) may take, e.g. 6G (default: TRT_BGSWAP_MEMORY_BUDGET, else what is free); larger sizes get 400",
    )
    s.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up (and the batch exactness check: no batching)")
    ray = s.add_argument_group("Ray Serve (pip install 'trt-bgswap[ray]')")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment instead of one uvicorn process")
    ray.add_argument("--address", help="Ray cluster to join (e.g. auto, or ray://head:10001); default: start a local one")
    ray.add_argument("--replicas", type=int_range("--replicas", 1, 10_000), default=1, help="fixed number of replicas (without --max-replicas)")
    ray.add_argument("--min-replicas", type=int_range("--min-replicas", 0, 10_000), help="autoscaling: fewest replicas (with --max-replicas)")
    ray.add_argument("--max-replicas", type=int_range("--max-replicas", 1, 10_000), help="autoscaling: most replicas; turns autoscaling on")
    ray.add_argument("--target-ongoing-requests", type=float_range("--target-ongoing-requests", 0.1, 10_000.0), default=2.0, help="autoscaling: requests per replica to aim for")
    ray.add_argument("--gpus-per-replica", type=float_range("--gpus-per-replica", 0.0, 64.0), default=0.0, help="GPUs each replica reserves (1: one replica per GPU)")
    ray.add_argument("--cpus-per-replica", type=float_range("--cpus-per-replica", 0.0, 1024.0), default=1.0, help="CPUs each replica reserves")


def _check_host(host: str, has_token: bool) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise UsageError(f"--host {host!r}: give an IP address to bind (127.0.0.1 for this machine only, 0.0.0.0 for every interface)") from None
    if not loopback and not has_token:
        log.warning("binding %s without --token-file: anyone who can reach this address can use the server", host)


def run(args: argparse.Namespace) -> int:
    from trt_bgswap.manifest import Manifest
    from trt_bgswap.paths import default_export_dir

    try:
        import uvicorn

        from trt_bgswap.server.config import ServerConfig
    except ImportError as e:
        raise BackendUnavailable(f"the server needs {e.name}; {INSTALL_HINT}") from None
    folder = Path(args.models).expanduser() if args.models else default_export_dir()
    Manifest.load(folder)  # a missing or broken export is one line now, not a failed server later
    config = ServerConfig(
        models=folder.resolve(), provider=args.provider, threads=args.threads, max_queue=args.max_queue, max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms, max_pixels=args.max_pixels, max_bytes=args.max_bytes, timeout=args.timeout,
        token_file=args.token_file.resolve() if args.token_file else None, warmup=args.warmup, low_memory=args.low_memory,
        memory_budget=args.memory_budget,
    )
    config.validate()
    _check_host(args.host, args.token_file is not None)
    if args.ray:
        from trt_bgswap.server.ray_app import RayOptions, serve_on_ray

        if args.min_replicas is not None and args.max_replicas is None:
            raise UsageError("--min-replicas needs --max-replicas (autoscaling); for a fixed count use --replicas")
        options = RayOptions(
            address=args.address, host=args.host, port=args.port, replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
            target_ongoing_requests=args.target_ongoing_requests, gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
        )
        return serve_on_ray(config, options)
    from trt_bgswap.server.app import create_app

    def stopped(sig: int, frame: FrameType | None) -> None:
        # uvicorn drains on SIGTERM/SIGINT, restores this handler and re-raises the signal: ending here
        # (instead of the default handler's kill) makes a requested stop exit 0
        log.info("stopped by %s after the requests in flight finished", signal.Signals(sig).name)

    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    log.info("serving %s on http://%s:%d (page /, API docs /docs)", folder, args.host, args.port)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="info" if log.level <= logging.INFO else "warning", timeout_graceful_shutdown=None, access_log=False)
    return 0
