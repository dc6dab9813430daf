"""A real `trt-bgswap serve` process on 127.0.0.1 (a free port) and a plain HTTP client for tests.

The server is started as users start it (the CLI, uvicorn), its port read from uvicorn's own
"running on" line, and every request goes over loopback with ``http.client``: no test client,
no mocked server.
"""

from __future__ import annotations

import http.client
import io
import json
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from trt_bgswap.benchmarking.serve_load import ServerProcess as LoadServer
from trt_bgswap.benchmarking.serve_load import encode_multipart


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)

    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.body))


class ServerProcess(LoadServer):
    """The benchmark's server process, with a bearer token and an HTTP client for the tests."""

    def __init__(self, args: list[str], token: str | None = None) -> None:
        super().__init__(args)
        self.token = token
        self.readyz: list[Reply] = []  # every /readyz answer while starting

    def start(self, ready_timeout: float = 180.0) -> "ServerProcess":  # type: ignore[override]
        def ready() -> bool:
            self.readyz.append(self.get("/readyz"))
            return self.readyz[-1].status == 200

        super().start(ready_timeout, ready=lambda: bool(self.port) and ready())
        return self

    # --- HTTP ---

    def connection(self, timeout: float = 120.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None, auth: bool = True, timeout: float = 120.0) -> Reply:
        h = dict(headers or {})
        if auth and self.token:
            h["Authorization"] = f"Bearer {self.token}"
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def get(self, path: str, auth: bool = True) -> Reply:
        return self.request("GET", path, auth=auth)

    def post_form(self, path: str, fields: dict[str, str | bytes], **kw: object) -> Reply:
        body, ctype = multipart(fields)
        return self.request("POST", path, body, {"Content-Type": ctype}, **kw)  # type: ignore[arg-type]

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics, e.g. metric("bgswap_batch_size_count", 'stage="generate"'); 0 when absent."""
        text = self.get("/metrics").body.decode()
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0


def multipart(fields: dict[str, str | bytes]) -> tuple[bytes, str]:
    return encode_multipart(list(fields.items()))


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
