"""The ASGI application: routes, status codes, the model lifecycle.

FastAPI (on Starlette) rather than bare Starlette: it writes the OpenAPI document served at
``/docs`` from the routes themselves, and Ray Serve's ``serve.ingress`` takes its apps as they
are. The request bodies are parsed by :mod:`.forms` (in memory) instead of FastAPI's form
parameters, whose parser spools uploads to disk; their schemas are declared for the docs in
:mod:`.openapi`.

Statuses: 400 bad input or option (the CLI's one-line message, as JSON ``{"error": ...}``),
401 missing/wrong token, 413 too many bytes or pixels, 415 neither multipart nor JSON, 503 full
queue or models still loading (with ``Retry-After``), 504 over ``--timeout``. An unexpected
failure is logged with its traceback and answered 500 with one line; no traceback ever leaves
the process. Nothing of a request is written to disk.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from trt_bgswap import __version__
from trt_bgswap.api import BackgroundReplacer, Photo, alpha_to_u8
from trt_bgswap.errors import BgSwapError, ImageTooLargeError
from trt_bgswap.runtime.image_read import probe_image, read_image
from trt_bgswap.runtime.image_write import JPEG_MAX_SIDE, WEBP_MAX_SIDE, output_exif, save_options, to_pil
from trt_bgswap.runtime.pipeline import GenerationOptions, Pipeline
from trt_bgswap.server import forms
from trt_bgswap.server.auth import BearerAuth
from trt_bgswap.server.batching import MASK, REPLACE, Batcher, InternalError, Job, QueueFull, batching_is_exact
from trt_bgswap.server.config import ServerConfig, read_token
from trt_bgswap.server.metrics import Metrics
from trt_bgswap.server.openapi import IMAGE_RESPONSES, MASK_DOC, REPLACE_DOC, add_docs

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
JPEG_WEBP_QUALITY = 95  # the CLI's default --quality


class RequestTooLarge(Exception):
    pass


class NotReady(Exception):
    pass


class Timeout(Exception):
    pass


class ClientGone(Exception):
    pass


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


def encode_image(arr: np.ndarray, fmt: str, icc: bytes | None = None, exif: bytes | None = None) -> bytes:
    """PNG/JPEG/WebP bytes in memory, with the CLI's encoder settings and format limits."""
    h, w = arr.shape[:2]
    limit = {"webp": WEBP_MAX_SIDE, "jpeg": JPEG_MAX_SIDE}.get(fmt)
    if limit is not None and max(w, h) > limit:
        raise forms.UsageError(f"{w}x{h} exceeds the {fmt.upper()} limit of {limit} px a side; ask for format=png")
    buf = io.BytesIO()
    to_pil(arr).save(buf, format=fmt.upper(), **save_options(fmt.upper(), JPEG_WEBP_QUALITY, icc, exif))  # type: ignore[arg-type]
    return buf.getvalue()


def _photo(data: bytes, max_pixels: int) -> Photo:
    loaded = read_image(data, max_pixels=max_pixels, name="image")
    return Photo(loaded.rgb, loaded.alpha, loaded.icc, loaded.exif, True)


class Service:
    """One process's models, queue and metrics; the routes call into it."""

    def __init__(self, config: ServerConfig, load_in_background: bool = True, replica: str | None = None) -> None:
        config.validate()
        self.config = config
        self.metrics = Metrics()
        self.load_in_background = load_in_background
        self.batcher: Batcher | None = None
        self.replacer: BackgroundReplacer | None = None
        self.failure: str | None = None
        self.ready = False
        self.replica = replica or uuid.uuid4().hex[:8]  # X-Replica: which process (Ray: which replica) answered
        # decoded photos are large (a 67 MP photo is ~200 MB of RGB): decode a few at a time, not one per waiting client
        self._decoding = asyncio.Semaphore(max(2, os.cpu_count() or 2))

    # --- lifecycle ---

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        if self.load_in_background:  # /healthz answers while big models load; /readyz says when they are in
            threading.Thread(target=self.load, name="bgswap-load", daemon=True).start()
        else:  # Ray Serve: a replica counts as started only once it can serve
            await run_in_threadpool(self.load)
            if self.failure:
                raise RuntimeError(self.failure)
        yield
        # uvicorn has finished every in-flight request by now (SIGTERM drains); stop the worker
        if self.batcher is not None:
            await run_in_threadpool(self.batcher.stop)
        log.info("server stopped")

    def load(self) -> None:
        cfg = self.config
        try:
            t0 = time.monotonic()
            pipe = Pipeline.load(
                cfg.models, provider=cfg.provider, threads=cfg.threads, low_memory=cfg.low_memory, memory_budget=cfg.memory_budget
            )
            self.replacer = BackgroundReplacer(None, max_pixels=cfg.max_pixels, pipeline=pipe)
            batcher = Batcher(pipe, self.metrics, cfg.max_queue, cfg.max_batch, cfg.batch_wait_ms / 1000.0)
            if cfg.warmup:
                self._warm_up(batcher)
            batcher.start()
            self.batcher = batcher
            self.ready = True
            self.metrics.ready.set(1)
            log.info("ready in %.1f s: %s", time.monotonic() - t0, cfg.models)
        except BgSwapError as e:
            self.failure = " ".join(str(e).split())
            log.error("cannot serve: %s", self.failure)
        except Exception as e:  # noqa: BLE001 - reported by /readyz, logged with the traceback
            self.failure = f"model load failed ({type(e).__name__}); the server log has the details"
            log.exception("model load failed")

    def _warm_up(self, batcher: Batcher) -> None:
        """Each stage once on synthetic photos, and whether batches are bit-identical on these engines."""
        yy, xx = np.mgrid[0:96, 0:80]
        photos = [np.dstack([xx * 3, yy * 2, (xx + yy) % 256]).astype(np.uint8), np.dstack([yy * 2, xx, 255 - yy * 2]).astype(np.uint8)]
        exact = batching_is_exact(batcher.pipe, photos, "warm-up")
        for stage, ok in exact.items():
            self.metrics.batching_exact.labels(stage).set(1 if ok else 0)
            if not ok:
                log.warning("%s: a batch is not bit-identical to its requests run alone on this backend; running them one by one", stage)
        batcher.batch_masks = exact.get("mask", False)
        batcher.batch_generation = exact.get("generate", False)

    # --- requests ---

    async def handle(self, request: Request, kind: str) -> Response:
        route = f"/v1/{kind}"
        arrived = time.monotonic()
        response = await self._answer(request, kind, arrived)
        self.metrics.requests.labels(route, str(response.status_code)).inc()
        self.metrics.request_seconds.labels(route).observe(time.monotonic() - arrived)
        return response

    async def _answer(self, request: Request, kind: str, arrived: float) -> Response:
        job: Job | None = None
        try:
            if not self.ready or self.batcher is None:
                raise NotReady()
            if self.batcher.full():  # before the body is read and decoded: a full server sheds load cheaply
                raise QueueFull()
            body = await self._read_body(request)
            async with self._decoding:
                job, fmt = await run_in_threadpool(self._job, kind, body, request.headers.get("content-type", ""))
            self.batcher.submit(job)
            result = await self._wait(request, job, arrived)
            content, headers = await run_in_threadpool(self._encode, job, result, fmt)
            return Response(content, media_type=forms.MEDIA_TYPES[fmt], headers=headers)
        except NotReady:
            retry = "5"
            why = self.failure or "the models are still loading"
            return _error(503, f"not ready: {why}; retry later (GET /readyz)", {"Retry-After": retry})
        except QueueFull:
            assert self.batcher is not None
            return _error(503, f"the queue is full ({self.config.max_queue} waiting); retry after the Retry-After seconds", {"Retry-After": str(self.batcher.retry_after())})
        except (RequestTooLarge, ImageTooLargeError) as e:
            return _error(413, str(e))
        except _UnsupportedMediaType as e:
            return _error(415, str(e))
        except BgSwapError as e:
            return _error(400, str(e))
        except Timeout:
            return _error(504, f"no answer within --timeout {self.config.timeout:g} s; the server is overloaded, retry later or with fewer steps")
        except ClientGone:
            return Response(status_code=499)  # nginx's 'client closed request'; nobody reads it
        except InternalError as e:
            return _error(500, str(e))
        except asyncio.CancelledError:  # Ray Serve cancels the handler when its client disconnects
            if job is not None:
                self._drop(job, "disconnected")
            raise
        except Exception:  # noqa: BLE001 - the traceback goes to the log, never to the client
            log.exception("unexpected failure answering %s", kind)
            return _error(500, "internal error; the server log has the details")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"the request is {int(declared)} bytes, above --max-bytes {limit}; send a smaller (or JPEG) image")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise RequestTooLarge(f"the request is over --max-bytes {limit} bytes; send a smaller (or JPEG) image")
        return bytes(body)

    def _job(self, kind: str, body: bytes, content_type: str) -> tuple[Job, str]:
        """Parse, decode and check everything before the request takes a place in the queue."""
        t0 = time.monotonic()
        media = content_type.split(";", 1)[0].strip().lower()
        if media == "multipart/form-data":
            fields = forms.parse_multipart(body, content_type)
        elif media == "application/json":
            fields = forms.parse_json(body)
        else:
            raise _UnsupportedMediaType(f"Content-Type {media[:60] or '(none)'!r}: send multipart/form-data (curl -F image=@photo.jpg) or application/json with a base64 image")
        assert self.replacer is not None
        cfg = self.config
        if kind == MASK:
            req = forms.mask_request(fields)
            photo = _photo(req.image, cfg.max_pixels)
            job = Job(MASK, photo, photo.cutout_alpha, cutout=req.cutout)
            self._check_masker(job)
            self.metrics.stage_seconds.labels("decode").observe(time.monotonic() - t0)
            return job, req.format
        r = forms.replace_request(fields)
        options, color = self.replacer.check_options(
            r.prompt, negative_prompt=r.negative_prompt, steps=r.steps, guidance=r.guidance, seed=r.seed, size=r.size, bg_color=r.bg_color, has_mask=True
        )
        if options is not None and options.seed is None:  # drawn here so the answer can carry it
            options = GenerationOptions(options.prompt, options.negative_prompt, options.steps, options.guidance, int(np.random.SeedSequence().entropy % 2**63), options.size)
        photo = _photo(r.image, cfg.max_pixels)
        alpha = photo.cutout_alpha
        if r.mask is not None:
            probe_image(r.mask, cfg.max_pixels, name="mask")  # the header checks first: a mask bomb never decodes
            from PIL import Image

            alpha = self.replacer.source_alpha(photo, mask=Image.open(io.BytesIO(r.mask)))
        job = Job(REPLACE, photo, alpha, options=options, color=color, composite_options=r.composite)
        self._check_masker(job)
        if options is not None:
            assert self.batcher is not None
            self.batcher.pipe.generation_size_for(photo.rgb.shape[1], photo.rgb.shape[0], options)  # a bad size is a 400 now
        self.metrics.stage_seconds.labels("decode").observe(time.monotonic() - t0)
        return job, r.format

    def _check_masker(self, job: Job) -> None:
        if job.alpha is None and (self.batcher is None or not self.batcher.pipe.can_mask):
            raise forms.UsageError("this server's model folder has no RMBG model; send your own mask (field 'mask') or a photo with transparency")

    async def _wait(self, request: Request, job: Job, arrived: float) -> Any:
        remaining = self.config.timeout - (time.monotonic() - arrived)
        answer = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({answer, gone}, timeout=max(remaining, 0.0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if answer in done:
            return answer.result()
        self._drop(job, "disconnected" if gone in done else "timeout")
        raise ClientGone() if gone in done else Timeout()

    def _drop(self, job: Job, reason: str) -> None:
        """Cancel a job whose answer nobody will read: a queued one never runs (Future.cancel), a running one finishes unread."""
        job.drop_reason = reason
        if job.future.cancel():
            self.metrics.dropped.labels(reason).inc()
        else:
            log.info("a running %s job finishes for a client that %s; its answer is dropped", job.kind, "left" if reason == "disconnected" else "timed out")

    def _encode(self, job: Job, result: Any, fmt: str) -> tuple[bytes, dict[str, str]]:
        t0 = time.monotonic()
        photo = job.photo
        headers = {"X-Batch-Size": str(job.batch_size), "X-Replica": self.replica, "Cache-Control": "no-store"}
        if job.kind == MASK:
            a8 = alpha_to_u8(result)
            if job.cutout:
                content = encode_image(np.dstack([photo.rgb, a8]), fmt, icc=photo.icc, exif=output_exif(photo.exif))
            else:
                content = encode_image(a8, fmt)
        else:
            content = encode_image(result.image, fmt, icc=photo.icc, exif=output_exif(photo.exif))
            if result.seed is not None:
                headers["X-Seed"] = str(result.seed)
            if result.generation_size is not None:
                headers["X-Generation-Size"] = f"{result.generation_size[0]}x{result.generation_size[1]}"
        self.metrics.stage_seconds.labels("encode").observe(time.monotonic() - t0)
        self.metrics.image_done()
        return content, headers


class _UnsupportedMediaType(BgSwapError):
    pass


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(config: ServerConfig, load_in_background: bool = True, replica: str | None = None) -> Any:
    """The ASGI app for one process (uvicorn) or one Ray Serve replica (``replica``: its id); models load at startup."""
    service = Service(config, load_in_background, replica)
    app = FastAPI(
        title="trt-bgswap",
        version=__version__,
        description="AI background replacement: RMBG mask, LCM inpainting, composite. The page at / tries it.",
        docs_url=None,
        redoc_url=None,
        lifespan=service.lifespan,
    )
    app.state.service = service
    _add_routes(app, service)
    token = read_token(config.token_file) if config.token_file is not None else None
    return BearerAuth(app, token) if token is not None else app


def _add_routes(app: FastAPI, service: Service) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, f"bad request: {exc.errors()[:1]}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected failure on %s", request.url.path, exc_info=exc)
        return _error(500, "internal error; the server log has the details")

    @app.post("/v1/replace", openapi_extra=REPLACE_DOC, responses=IMAGE_RESPONSES, response_class=Response, summary="replace the background")
    async def replace(request: Request) -> Response:
        """A generated (prompt) or solid (bg_color) background behind the photo's subject."""
        return await service.handle(request, REPLACE)

    @app.post("/v1/mask", openapi_extra=MASK_DOC, responses=IMAGE_RESPONSES, response_class=Response, summary="the subject's alpha mask")
    async def mask(request: Request) -> Response:
        """RMBG's alpha as an 8-bit grey image, or with cutout=true the RGBA cut-out."""
        return await service.handle(request, MASK)

    @app.get("/healthz", summary="the process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="200 once every model is loaded and warmed", responses={503: {"description": "loading, or failed"}})
    async def readyz() -> Response:
        if service.ready:
            return JSONResponse({"status": "ready"})
        state = "failed" if service.failure else "loading"
        body: dict[str, str] = {"status": state}
        if service.failure:
            body["error"] = service.failure
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_docs(app)
