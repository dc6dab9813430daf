"""What a server process is told: the model folder, the limits and the queue; checked once, at the edge."""

from __future__ import annotations

import logging
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from trt_bgswap.errors import UsageError
from trt_bgswap.runtime.image_read import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 32 * 1024 * 1024  # a 50 MP JPEG is ~20 MB; PNG photos of that size exceed it (raise --max-bytes)


@dataclass(frozen=True)
class ServerConfig:
    models: Path
    provider: str = "auto"
    threads: int = 0
    max_queue: int = 16  # requests waiting for the engines; one more is answered 503 + Retry-After
    max_batch: int = 4  # requests run as one engine batch where their shapes agree
    batch_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES  # request body limit (413 above)
    timeout: float = 300.0  # seconds from arrival to answer (504 after)
    token_file: Path | None = None  # with it, every route but /healthz needs "Authorization: Bearer <token>"
    warmup: bool = True  # run each stage once (and check batch exactness) before /readyz says ready
    low_memory: bool = False  # each model's session open only while its stage runs (Pipeline.load(low_memory=))
    memory_budget: int | None = None  # bytes a generation may take (Pipeline.load(memory_budget=)); None: the env var, else what is free

    def validate(self) -> None:
        for name, value, lo in (("--max-queue", self.max_queue, 1), ("--max-batch", self.max_batch, 1), ("--max-pixels", self.max_pixels, 1), ("--max-bytes", self.max_bytes, 1024)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise UsageError(f"{name}={value!r}: give an integer >= {lo}")
        for name, value in (("--batch-wait-ms", self.batch_wait_ms), ("--timeout", self.timeout)):
            if not math.isfinite(value) or value < 0 or (name == "--timeout" and value == 0):
                raise UsageError(f"{name}={value!r}: give a positive number of {'milliseconds' if name.endswith('ms') else 'seconds'}")
        if self.memory_budget is not None and (isinstance(self.memory_budget, bool) or not isinstance(self.memory_budget, int) or self.memory_budget <= 0):
            raise UsageError(f"--memory-budget={self.memory_budget!r}: give a positive size such as 6G")
        if self.token_file is not None:
            read_token(self.token_file)


def read_token(path: Path) -> str:
    """The bearer token: the file's first line, stripped; an empty or unreadable file is refused."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--token-file {path}: cannot read it ({e.__class__.__name__}); give a readable UTF-8 file holding the token") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(token) < 16:
        raise UsageError(f"--token-file {path}: the token is {len(token)} characters; use at least 16 (e.g. `openssl rand -hex 32 > {path}`)")
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("--token-file %s is readable by other users; `chmod 600 %s`", path, path)
    return token
