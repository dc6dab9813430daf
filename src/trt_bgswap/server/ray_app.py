"""Scale-out on Ray Serve: the same ASGI app as a deployment, one replica per GPU or CPU share.

``serve.ingress`` is late-bound: Ray calls the deployment's ``__serve_build_asgi_app__`` on each replica, so
every replica loads its own models (at ASGI startup, before Ray routes to it) and holds its own
queue and batcher; Ray's proxy spreads requests over the replicas, restarts a replica that dies
and, with ``--max-replicas``, scales between ``--min-replicas`` and ``--max-replicas`` on the
number of ongoing requests per replica (Ray Serve's ``autoscaling_config``).

Reference: Ray Serve's ``serve.deployment`` / ``serve.ingress`` / ``serve.run`` API (ray 2.x docs,
"Set Up FastAPI and HTTP" and "Advanced Ray Serve Autoscaling").
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

from trt_bgswap.errors import BackendUnavailable
from trt_bgswap.server.config import ServerConfig

log = logging.getLogger(__name__)

APP_NAME = "trt-bgswap"
DEPLOYMENT_NAME = "BgSwap"
INSTALL_HINT = "pip install 'trt-bgswap[ray]'"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: a local Ray on this machine (bound to loopback)
    host: str = "127.0.0.1"  # where Ray's HTTP proxy listens
    port: int = 8000
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None  # set: autoscaling between min and max
    target_ongoing_requests: float = 2.0
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int | None = None  # per replica; default: the server's queue + one batch

    def autoscaling_config(self) -> dict[str, Any] | None:
        if self.max_replicas is None:
            return None
        return {
            "min_replicas": self.min_replicas if self.min_replicas is not None else 1,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }


def _ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise BackendUnavailable(f"Ray Serve is not installed ({e.name}); {INSTALL_HINT}") from None
    return ray, serve


def deployment(config: ServerConfig, options: RayOptions) -> Any:
    """The bound Ray Serve application (pass to ``serve.run``)."""
    _, serve = _ray()

    class BgSwap:
        """One replica; Ray builds its ASGI app on the replica, after this constructor (late-bound ingress)."""

        def __init__(self, config: ServerConfig) -> None:
            self.config = config

        def __serve_build_asgi_app__(self) -> Any:
            from trt_bgswap.server.app import create_app

            from ray import serve

            replica = serve.get_replica_context().replica_id.unique_id  # X-Replica names the Ray replica (as in Ray's logs)
            return create_app(self.config, load_in_background=False, replica=replica)  # models load at ASGI startup, before Ray routes here

    settings: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
        "max_ongoing_requests": options.max_ongoing_requests or config.max_queue + config.max_batch,
        # requests Ray's proxy holds for busy replicas; beyond, Ray answers 503 itself (the queue stays bounded)
        "max_queued_requests": config.max_queue,
        "health_check_period_s": 2.0,
        "graceful_shutdown_timeout_s": config.timeout,
    }
    autoscaling = options.autoscaling_config()
    if autoscaling is not None:
        settings["autoscaling_config"] = autoscaling
    else:
        settings["num_replicas"] = options.replicas
    return serve.deployment(**settings)(serve.ingress()(BgSwap)).bind(config)


def start(config: ServerConfig, options: RayOptions) -> None:
    """Connect to (or start) Ray, start Serve's proxy on host:port, deploy and wait until every replica is up."""
    ray, serve = _ray()
    if not ray.is_initialized():
        if options.address:
            ray.init(address=options.address, include_dashboard=False)
        else:  # a local cluster on loopback only
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(deployment(config, options), name=APP_NAME, route_prefix="/", blocking=False)


def serve_on_ray(config: ServerConfig, options: RayOptions) -> int:
    """`trt-bgswap serve --ray`: deploy, then keep the driver alive until SIGTERM/Ctrl-C, then tear down."""
    ray, serve = _ray()
    start(config, options)
    log.info("Ray Serve: %s on http://%s:%d (%s)", APP_NAME, options.host, options.port, options.autoscaling_config() or f"{options.replicas} replica(s)")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stop.set())
    stop.wait()
    log.info("stopping: Ray Serve drains each replica (graceful_shutdown_timeout_s = --timeout)")
    serve.delete(APP_NAME)
    if not options.address:
        serve.shutdown()
        ray.shutdown()
    return 0
