"""The ASGI app: routes, start-up and shutdown, and `run` with a draining shutdown.

Endpoints (errors in OpenAI's shape, see errors.py):
- `GET /health`: 200 while the process answers (never needs a key).
- `GET /ready`: 200 once every model is warmed up and its batcher runs; 503 before (the
  warm-up runs after the server starts listening), and while draining.
- `GET /metrics`: Prometheus text (metrics.py).
- `GET /`: the web page (no key needed); `GET /page/settings`: what it offers (page.py).
- `GET /v1/models`, `POST /v1/images/generations`, `POST /v1/images/edits`: OpenAI's Images
  API (openai_api.py).
- `POST /sdapi/v1/txt2img`, `POST /sdapi/v1/img2img`, `GET /sdapi/v1/samplers`,
  `GET /sdapi/v1/sd-models`: A1111's API (a1111_api.py).

With an API key, every endpoint but /health needs `Authorization: Bearer <key>`. A request
body is read at most `MAX_BODY_BYTES` far, or `MAX_IMAGE_BODY_BYTES` where it carries an
input image (413 beyond). No CORS headers are sent unless
`cors_origins` names the origins whose pages may call the service.

Shutdown (`run`): the first SIGTERM or SIGINT starts a drain: /ready and new generations
answer 503 while the queued and running requests finish (up to `drain_timeout` seconds);
then uvicorn stops, sends the finished responses and the process exits 0. A second signal
stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fewstep.inputs import check_integer, check_number
from fewstep.pipeline import Pipeline
from fewstep.serve import a1111_api, openai_api, openapi, page
from fewstep.serve.errors import APIError, answered_in_error_shape, http_error
from fewstep.serve.metrics import Metrics, RequestMetrics
from fewstep.serve.service import Service

logger = logging.getLogger("fewstep.serve")

ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?")

Endpoint = Callable[[Request, Service], Awaitable[Response]]


def service_of(request: Request) -> Service:
    service: Service = request.app.state.fewstep
    return service


def keyed(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    """`endpoint` behind the key check, with its errors in OpenAI's shape."""

    async def handle(request: Request) -> Response:
        service = service_of(request)
        service.check_key(request)
        return await endpoint(request, service)

    return answered_in_error_shape(handle)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request, service: Service) -> Response:
    if not service.ready:
        raise APIError(503, "shutting down" if service.draining else "not ready")
    return JSONResponse({"status": "ready", "models": list(service.models)})


async def metrics(request: Request, service: Service) -> Response:
    metrics: Metrics = request.app.state.metrics
    return metrics.text()


def _log_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("start-up failed; the service stays not ready", exc_info=task.exception())


def _check_origins(origins: Any) -> list[str]:
    """Each origin is scheme://host[:port] as browsers send it; "*" is refused (the key
    would then work from any page)."""
    if origins is None:
        return []
    if not isinstance(origins, (list, tuple)):
        raise ValueError(f"cors_origins must be a list of origins, got {origins!r:.80}")
    for origin in origins:
        if not isinstance(origin, str) or not ORIGIN.fullmatch(origin):
            raise ValueError(
                f'cors_origins entries must be origins such as "https://app.example.com" '
                f"(scheme://host[:port]), got {origin!r:.80}"
            )
    return list(origins)


def _check_models(models: Any) -> dict[str, Pipeline]:
    if not isinstance(models, dict) or not models:
        raise ValueError(f"models must be a non-empty dict of name → Pipeline, got {models!r:.80}")
    for name, pipe in models.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"models must have non-empty string names, got {name!r}")
        if not isinstance(pipe, Pipeline):
            raise ValueError(f"models[{name!r}] must be a fewstep Pipeline, got {pipe!r:.80}")
    return models


def create_app(
    models: dict[str, Pipeline],
    api_key: str | None = None,
    max_batch: int = 8,
    max_wait_ms: float = 2.0,
    max_queue: int = 64,
    request_timeout: float = 300.0,
    cors_origins: list[str] | None = None,
) -> Starlette:
    """A Starlette app serving `models` by name (the first is the default); module docstring.

    The batchers start with the app (its lifespan) and are drained, finishing queued
    requests, when it stops. `request_timeout` (seconds) bounds one request's wait for its
    images (504 past it). `cors_origins`: the browser origins ("https://app.example") allowed
    to call the service from their pages; none by default.
    """
    models = _check_models(models)
    origins = _check_origins(cors_origins)
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    # Checked now, not at start-up, so a bad option fails where the app is made.
    options = {
        "max_batch": check_integer("max_batch", max_batch, 1),
        "max_wait_ms": check_number("max_wait_ms", max_wait_ms, 0.0, 60_000.0),
        "max_queue": check_integer("max_queue", max_queue, 1),
    }
    timeout = check_number("request_timeout", request_timeout, 0.001, 86_400.0)
    service = Service(models, api_key, options, timeout)
    metrics_ = Metrics(service.queue_depths)
    service.on_batch, service.on_stage = metrics_.observe_batch, metrics_.observe_stage

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Warm-up runs beside the server: /health answers at once, /ready once it is done.
        starting = asyncio.create_task(asyncio.to_thread(service.start))
        starting.add_done_callback(_log_start_failure)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await starting
            await asyncio.to_thread(service.close)

    routes = [
        Route("/", page.index, methods=["GET"]),
        Route("/page/settings", keyed(page.settings), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", keyed(ready), methods=["GET"]),
        Route("/metrics", keyed(metrics), methods=["GET"]),
        Route("/v1/models", keyed(openai_api.list_models), methods=["GET"]),
        Route("/v1/images/generations", keyed(openai_api.generate_images), methods=["POST"]),
        Route("/v1/images/edits", keyed(openai_api.edit_images), methods=["POST"]),
        Route("/sdapi/v1/txt2img", keyed(a1111_api.txt2img), methods=["POST"]),
        Route("/sdapi/v1/img2img", keyed(a1111_api.img2img), methods=["POST"]),
        Route("/sdapi/v1/samplers", keyed(a1111_api.samplers), methods=["GET"]),
        Route("/sdapi/v1/sd-models", keyed(a1111_api.sd_models), methods=["GET"]),
        Route("/openapi.json", keyed(openapi.openapi_json), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}
    )
    app.state.fewstep = service
    app.state.metrics = metrics_
    app.add_middleware(RequestMetrics, metrics=metrics_, routes=routes)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


def run(
    app: Starlette, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 60.0
) -> None:
    """Serve `app` with uvicorn until a signal; the first one drains (module docstring)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        # uvicorn's own handler re-raises the signal after shutdown (exit status 143); a
        # drained service exits 0 instead, so it sets the flags itself.
        def handle_exit(self, sig: int, frame: Any) -> None:
            if service.draining:  # a second signal: stop now
                self.should_exit = self.force_exit = True
                return
            logger.info("draining: finishing queued requests, refusing new ones")
            service.ready, service.draining = False, True  # before the thread starts
            threading.Thread(target=self.drain_then_exit, daemon=True).start()

        def drain_then_exit(self) -> None:
            started = time.monotonic()
            if not service.drain(timeout=drain_timeout):
                logger.warning("drain timeout of %g s passed; stopping", drain_timeout)
            logger.info("drained in %.1f s", time.monotonic() - started)
            self.should_exit = True

    service: Service = app.state.fewstep
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=math.ceil(drain_timeout),
    )
    DrainingServer(config).run()
