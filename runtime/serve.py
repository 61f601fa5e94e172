"""`fewstep serve`: an HTTP service with OpenAI's image generation API over fewstep pipelines.

Built on Starlette and uvicorn (the `serve` extra) rather than a larger framework: the lean
runtime stays lean, with two small dependencies and no pydantic; requests are checked by
fewstep's own argument checks, so the errors name the argument as the Python API's do.

Endpoints:
- `GET /health`: 200 {"status": "ok"} while the process answers (never needs a key).
- `GET /ready`: 200 once every model's `Batcher` runs, 503 before start-up and at shutdown.
- `GET /v1/models`: the served models in OpenAI's list shape.
- `POST /v1/images/generations`: OpenAI's fields `prompt`, `model`, `n`, `size` ("WxH"),
  `response_format` ("b64_json" only); fewstep's own `seed` (image i uses seed + i, as A1111
  does), `num_inference_steps`, `guidance_scale`, `negative_prompt`, `scheduler` (the openai
  client sends these with `extra_body`). OpenAI fields without a meaning here (`quality`,
  `style`, `user`, ...) are accepted and ignored; any other field is refused, naming it.
  Each image comes back as a base64 PNG carrying A1111's `parameters` text chunk.

Each served model has one `Batcher`, so concurrent requests share pipeline calls; the handler
awaits the batcher's future without blocking the event loop. Errors use OpenAI's shape
{"error": {"message", "type", "param", "code"}}: 400 bad values, 401 missing or wrong key
(when one is set), 404 unknown model, 413 body over `MAX_BODY_BYTES`, 429 (with
`Retry-After`) when a model's queue is full, 503 when not ready, 500 with a logged id
otherwise.

Limits: no streaming, no URLs for images, no image edits or variations; one process, one
batcher per model; the key is a single shared bearer token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fewstep.batching import Batcher, Closed, GenerationRequest, QueueFull, RequestImages
from fewstep.image_files import a1111_parameters, encode_image
from fewstep.inputs import check_integer, check_number
from fewstep.package import read_manifest
from fewstep.pipeline import Pipeline

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
# fewstep's fields of a generation request, besides OpenAI's prompt/model/n/size/response_format
FEWSTEP_FIELDS = ("seed", "num_inference_steps", "guidance_scale", "negative_prompt", "scheduler")
OPENAI_FIELDS = ("prompt", "model", "n", "size", "response_format")
# OpenAI's fields that change nothing here (quality, style, output options, moderation...)
IGNORED_OPENAI_FIELDS = (
    "quality",
    "style",
    "user",
    "background",
    "output_format",
    "output_compression",
    "moderation",
    "safety_identifier",
    "partial_images",
    "stream",
)
KNOWN_FIELDS = frozenset(OPENAI_FIELDS + FEWSTEP_FIELDS + IGNORED_OPENAI_FIELDS)
SIZE_PATTERN = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")
STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered in OpenAI's shape with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_response(error: APIError) -> JSONResponse:
    body = {
        "error": {
            "message": error.message,
            "type": STATUS_TYPES.get(error.status, "invalid_request_error"),
            "param": error.param,
            "code": error.code,
        }
    }
    return JSONResponse(body, status_code=error.status, headers=error.headers)


class Service:
    """The app's state: one batcher per model, made at start-up and closed at shutdown."""

    def __init__(
        self,
        models: dict[str, Pipeline],
        api_key: str | None,
        batcher_options: dict[str, Any],
    ):
        self.models = dict(models)
        self.api_key = api_key
        self.batcher_options = batcher_options
        self.batchers: dict[str, Batcher] = {}
        self.ready = False
        self.created = int(time.time())
        self.model_hashes = {name: _unet_hash(pipe) for name, pipe in self.models.items()}

    def start(self) -> None:
        for name, pipe in self.models.items():
            self.batchers[name] = Batcher(pipe, output_type="pil", **self.batcher_options)
        self.ready = True

    def close(self) -> None:
        self.ready = False
        for batcher in self.batchers.values():
            batcher.close(drain=True, timeout=60)

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.api_key.encode()
        )
        if not ok:
            raise APIError(
                401,
                "missing or wrong API key (Authorization: Bearer <key>)",
                code="invalid_api_key",
            )


def _unet_hash(pipe: Pipeline) -> str | None:
    path = getattr(pipe, "path", None)
    manifest = read_manifest(path) if path is not None else None
    return (manifest or {}).get("files", {}).get("unet/model.onnx")


def _check_models(models: Any) -> dict[str, Pipeline]:
    if not isinstance(models, dict) or not models:
        raise ValueError(f"models must be a non-empty dict of name → Pipeline, got {models!r:.80}")
    for name, pipe in models.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"models must have non-empty string names, got {name!r}")
        if not isinstance(pipe, Pipeline):
            raise ValueError(f"models[{name!r}] must be a fewstep Pipeline, got {pipe!r:.80}")
    return models


# -- request parsing ----------------------------------------------------------------------


async def read_json_body(request: Request, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The body as a JSON object, read at most `limit` bytes far (413 beyond)."""
    too_big = APIError(413, f"the request body must be at most {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_size(value: Any) -> tuple[int | None, int | None]:
    """ "WxH" → (height, width); None or "auto" → the model's default size."""
    if value is None or value == "auto":
        return None, None
    match = SIZE_PATTERN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise APIError(400, f'size must be "WIDTHxHEIGHT" such as "512x512", got {value!r}', "size")
    width, height = int(match.group(1)), int(match.group(2))
    return height, width


def param_of(message: str) -> str | None:
    """The request field a fewstep check's message names (it starts with the argument)."""
    name = re.split(r"[\s\[]", message, maxsplit=1)[0]
    if name in ("height", "width"):
        return "size"
    return name if name in KNOWN_FIELDS else None


def generation_request(body: dict[str, Any]) -> GenerationRequest:
    """A checked GenerationRequest from the body's fields (400 for any bad one)."""
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise APIError(
            400, f"unknown fields {unknown}; accepted: {sorted(KNOWN_FIELDS)}", unknown[0]
        )
    if "prompt" not in body:
        raise APIError(400, "prompt is required", "prompt")
    response_format = body.get("response_format")
    if response_format not in (None, "b64_json"):
        raise APIError(
            400,
            f'response_format must be "b64_json" (fewstep serves no image URLs), '
            f"got {response_format!r}",
            "response_format",
        )
    if body.get("stream") not in (None, False):
        raise APIError(400, "stream is not supported; leave it out or false", "stream")
    height, width = parse_size(body.get("size"))
    seed = body.get("seed")
    n = body.get("n")
    fields = {k: body[k] for k in FEWSTEP_FIELDS if body.get(k) is not None}
    try:
        return GenerationRequest(
            **{
                **fields,
                "prompt": body["prompt"],
                "n": 1 if n is None else n,
                "seed": secrets.randbelow(2**63) if seed is None else seed,
                "height": height,
                "width": width,
            }
        )
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), param_of(str(e))) from e


# -- images ---------------------------------------------------------------------------------


def encode_images(
    images: RequestImages, request: GenerationRequest, model: str, model_hash: Any
) -> list[dict[str, str]]:
    """Base64 PNGs with A1111's `parameters` chunk, from what the pipeline resolved."""
    settings = images.settings
    guidance = settings["guidance_scale"]
    settings = {
        **settings,
        "guidance_scale": guidance[0] if isinstance(guidance, list) else guidance,
    }
    data = []
    for image, seed in zip(images, request.seeds, strict=True):
        text = a1111_parameters(
            request.prompt, request.negative_prompt, {**settings, "seed": seed}, model, model_hash
        )
        buffer = io.BytesIO()
        encode_image(image, "PNG", text, buffer)
        data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii")})
    return data


# -- endpoints ------------------------------------------------------------------------------


def service_of(request: Request) -> Service:
    service: Service = request.app.state.fewstep
    return service


def guarded(
    endpoint: Callable[[Request, Service], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint behind the key check, with errors answered in OpenAI's shape."""

    async def handle(request: Request) -> Response:
        service = service_of(request)
        try:
            service.check_key(request)
            return await endpoint(request, service)
        except APIError as e:
            return error_response(e)
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            logger.exception("internal error %s on %s %s", error_id, request.method, request.url)
            return error_response(APIError(500, f"internal error (id {error_id})"))

    return handle


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request, service: Service) -> Response:
    if not service.ready:
        raise APIError(503, "not ready")
    return JSONResponse({"status": "ready", "models": list(service.models)})


async def list_models(request: Request, service: Service) -> Response:
    data = [
        {"id": name, "object": "model", "created": service.created, "owned_by": "fewstep"}
        for name in service.models
    ]
    return JSONResponse({"object": "list", "data": data})


async def generate_images(request: Request, service: Service) -> Response:
    body = await read_json_body(request)
    model = body.get("model")
    model = next(iter(service.models)) if model is None else model
    if not isinstance(model, str) or model not in service.models:
        raise APIError(
            404,
            f"model {model!r} is not served; served: {list(service.models)}",
            "model",
            "model_not_found",
        )
    gen = generation_request(body)
    batcher = service.batchers.get(model)
    if not service.ready or batcher is None:
        raise APIError(503, "the service is not ready or is shutting down")
    try:
        future = batcher.submit(gen)
    except QueueFull as e:
        raise APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from e
    except Closed as e:
        raise APIError(503, "the service is shutting down") from e
    except ValueError as e:
        raise APIError(400, str(e), param_of(str(e))) from e
    try:
        images = await asyncio.wrap_future(future)
    except ValueError as e:  # the pipeline refused a setting the checks let through
        raise APIError(400, str(e), param_of(str(e))) from e
    except asyncio.CancelledError:
        if future.cancelled():  # cancelled by a closing batcher, not by this request's task
            raise APIError(503, "the service is shutting down") from None
        raise
    data = await asyncio.to_thread(encode_images, images, gen, model, service.model_hashes[model])
    return JSONResponse({"created": int(time.time()), "data": data})


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown path, wrong method) in OpenAI's shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return error_response(APIError(status, f"{detail}: {request.method} {request.url.path}"))


def create_app(
    models: dict[str, Pipeline],
    api_key: str | None = None,
    max_batch: int = 8,
    max_wait_ms: float = 10,
    max_queue: int = 64,
) -> Starlette:
    """A Starlette app serving `models` by name (the first is the default); module docstring.

    The batchers start with the app (its lifespan) and are closed, finishing queued
    requests, when it stops. With `api_key`, every endpoint but /health needs
    `Authorization: Bearer <api_key>`.
    """
    models = _check_models(models)
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    # Checked now, not at start-up, so a bad option fails where the app is made.
    options = {
        "max_batch": check_integer("max_batch", max_batch, 1),
        "max_wait_ms": check_number("max_wait_ms", max_wait_ms, 0.0, 60_000.0),
        "max_queue": check_integer("max_queue", max_queue, 1),
    }
    service = Service(models, api_key, options)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.close)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", guarded(ready), methods=["GET"]),
        Route("/v1/models", guarded(list_models), methods=["GET"]),
        Route("/v1/images/generations", guarded(generate_images), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}
    )
    app.state.fewstep = service
    return app


def run(app: Starlette, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `app` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = ["MAX_BODY_BYTES", "APIError", "create_app", "run"]
