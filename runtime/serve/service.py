"""The service's state and the path every generation request takes, whichever API it came by.

`Service` holds one `Batcher` per served model, the API key and the life-cycle flags
(ready, draining). `Service.generate` submits a `GenerationRequest` and waits for its images
without blocking the event loop, turning the batcher's outcomes into HTTP answers: 429 with
`Retry-After` when the queue is full (at once, without waiting on the model), 503 when not
ready or draining, 504 past the request timeout, and a dropped request when the client
disconnects. Work not yet started is dropped in the last two cases; a batch that has started
runs to its end (its other requests still want their images).

Request bodies are read streaming and bounded: `MAX_BODY_BYTES` (64 KiB) for JSON without
images, `MAX_IMAGE_BODY_BYTES` (16 MiB) for the endpoints that take an input image (A1111's
img2img, OpenAI's image edits); 413 beyond. Input images are decoded by fewstep.image_inputs'
loader (PNG, JPEG or WebP; the pixel limit checked from the header before any pixel is
decoded) on a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request

from fewstep.batching import (
    CUDA_GRAPH_BATCH_SIZES,
    Batcher,
    BatchRecord,
    Closed,
    GenerationRequest,
    QueueFull,
    RequestImages,
)
from fewstep.image_inputs import decoded_image
from fewstep.package import read_manifest, unet_hash
from fewstep.pipeline import Pipeline
from fewstep.serve.errors import APIError, ClientGone

MAX_BODY_BYTES = 64 * 1024  # JSON bodies without images
MAX_IMAGE_BODY_BYTES = 16 * 1024 * 1024  # bodies that carry an input image (img2img, edits)
# A1111 takes base64 images with or without a data URL's prefix
DATA_URL_PREFIX = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,")
T = TypeVar("T")
WARM_UP_PROMPT = "warm-up"


class Service:
    """One batcher per model, made at start-up (`start`) and drained at shutdown (`close`).

    `on_batch` sees each batch's record and `on_stage` (model, stage, seconds) the other
    timed stages (metrics); `request_timeout` is in seconds.
    """

    def __init__(
        self,
        models: dict[str, Pipeline],
        api_key: str | None,
        batcher_options: dict[str, Any],
        request_timeout: float,
        on_batch: Callable[[str, BatchRecord], None] | None = None,
        on_stage: Callable[[str, str, float], None] | None = None,
    ):
        self.models = dict(models)
        self.api_key = api_key
        self.batcher_options = batcher_options
        self.request_timeout = request_timeout
        self.on_batch = on_batch
        self.on_stage = on_stage
        self.batchers: dict[str, Batcher] = {}
        self.ready = False
        self.draining = False
        self.created = int(time.time())
        self.model_hashes = {name: _unet_hash(pipe) for name, pipe in self.models.items()}

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    def start(self) -> None:
        """Warm each model up (its first call at the default size loads and plans what a
        first request would otherwise wait for), then start the batchers; ready after."""
        for pipe in self.models.values():
            pipe(WARM_UP_PROMPT, seed=0, num_inference_steps=1, output_type="pil")
        for name, pipe in self.models.items():
            self.batchers[name] = Batcher(
                pipe,
                output_type="pil",
                on_batch=self._batch_callback(name),
                batch_sizes=padded_batch_sizes(pipe),
                **self.batcher_options,
            )
        self.ready = True

    def add_model(self, name: str, pipe: Pipeline) -> None:
        """Serve `pipe` as `name` from now on, with a batcher of its own (a running service:
        a model loaded on demand, such as a LoRA variant on Ray, fewstep.serve.ray_app)."""
        batcher = Batcher(
            pipe,
            output_type="pil",
            on_batch=self._batch_callback(name),
            batch_sizes=padded_batch_sizes(pipe),
            **self.batcher_options,
        )
        self.model_hashes[name] = _unet_hash(pipe)
        self.models[name] = pipe
        self.batchers[name] = batcher

    def remove_model(self, name: str, timeout: float | None = 60) -> bool:
        """Stop serving `name` (404 from now on) after its queued requests finish, waiting
        up to `timeout` seconds; True when they did."""
        self.models.pop(name, None)
        self.model_hashes.pop(name, None)
        batcher = self.batchers.pop(name, None)
        return batcher is None or batcher.close(drain=True, timeout=timeout)

    def _batch_callback(self, name: str) -> Callable[[BatchRecord], None] | None:
        on_batch = self.on_batch
        if on_batch is None:
            return None
        return lambda record: on_batch(name, record)

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests (503) and finish the queued and running ones, waiting up to
        `timeout` seconds for each model; True when all finished."""
        self.ready, self.draining = False, True
        return all([b.close(drain=True, timeout=timeout) for b in self.batchers.values()])

    def close(self) -> None:
        self.drain(timeout=60)

    def queue_depths(self) -> dict[str, int]:
        return {name: batcher.queued() for name, batcher in self.batchers.items()}

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

    def model_named(self, model: Any, param: str = "model") -> str:
        """The served model called `model` (None: the default); 404 for any other name."""
        model = self.default_model if model is None else model
        if not isinstance(model, str) or model not in self.models:
            raise APIError(
                404,
                f"model {model!r} is not served; served: {list(self.models)}",
                param,
                "model_not_found",
            )
        return model

    async def generate(
        self,
        model: str,
        gen: GenerationRequest,
        request: Request,
        param_of: Callable[[str], str | None],
    ) -> RequestImages:
        """The images of `gen` from `model`'s batcher. `param_of` maps a refusal's message
        to the request field it names (each API names its fields its own way)."""
        batcher = self.batchers.get(model)
        if self.draining:
            raise APIError(503, "the service is shutting down", code="shutting_down")
        if not self.ready or batcher is None:
            raise APIError(503, "the service is not ready", code="not_ready")
        try:
            if gen.image is None:
                future = batcher.submit(gen)
            else:  # its check decodes and resizes the image: off the event loop
                future = await asyncio.to_thread(batcher.submit, gen)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from e
        except Closed as e:
            raise APIError(503, "the service is shutting down", code="shutting_down") from e
        except ValueError as e:
            raise APIError(400, str(e), param_of(str(e))) from e
        images = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_disconnected(request))
        waiters: set[asyncio.Future[Any]] = {images, gone}
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=self.request_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            gone.cancel()
        if images not in done:
            future.cancel()  # dropped if its batch has not started
            if gone in done:
                raise ClientGone()
            raise APIError(
                504, f"no images within the request timeout of {self.request_timeout:g} s"
            )
        if future.cancelled():  # cancelled by a closing batcher
            raise APIError(503, "the service is shutting down", code="shutting_down")
        try:
            return images.result()
        except ValueError as e:  # the pipeline refused a setting the checks let through
            raise APIError(400, str(e), param_of(str(e))) from e

    async def encode(self, model: str, encode: Callable[..., T], *args: Any) -> T:
        """`encode(*args)` (PNG encoding) on a worker thread, timed as `model`'s "encode"
        stage; off the event loop, so other requests are answered meanwhile."""
        started = time.perf_counter()
        result = await asyncio.to_thread(encode, *args)
        if self.on_stage is not None:
            self.on_stage(model, "encode", time.perf_counter() - started)
        return result


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read, so the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def padded_batch_sizes(pipe: Pipeline) -> tuple[int, ...] | None:
    """The sizes batches are padded to: a backend replaying CUDA graphs captures one graph per
    batch size, so a few sizes are reused instead of one captured per size; None otherwise."""
    return CUDA_GRAPH_BATCH_SIZES if getattr(pipe.backend, "cuda_graphs", False) else None


def _unet_hash(pipe: Pipeline) -> str | None:
    path = getattr(pipe, "path", None)
    manifest = read_manifest(path) if path is not None else None
    return unet_hash(manifest)


def body_too_big(limit: int) -> APIError:
    return APIError(413, f"the request body must be at most {limit} bytes")


def check_declared_length(request: Request, limit: int) -> None:
    """413 at once when the Content-Length header says more than `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_big(limit)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, read at most `limit` bytes far (413 beyond)."""
    check_declared_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_big(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_body(request: Request, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The body as a JSON object, read at most `limit` bytes far (413 beyond)."""
    data = await read_body(request, limit)
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting too deep to parse
        raise APIError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def base64_image_bytes(value: Any, param: str) -> bytes:
    """The file bytes of a base64 image (a data URL's prefix allowed, as A1111 takes it);
    400 naming `param` for anything else."""
    if not isinstance(value, str):
        raise APIError(400, f"{param} must be a base64 image, got {type(value).__name__}", param)
    prefix = DATA_URL_PREFIX.match(value)
    text = value[prefix.end() :] if prefix else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{param} is not valid base64: {e}", param) from e


async def decode_image(data: bytes, param: str, pipe: Pipeline) -> Any:
    """An uploaded image file as an RGB PIL image, within `pipe`'s pixel limit: decoded by
    fewstep.image_inputs' loader (the loader `Pipeline(image=<file bytes>)` uses, so the
    image is the one a direct call decodes), on a worker thread; 400 naming `param`."""
    try:
        return await asyncio.to_thread(decoded_image, data, param, pipe.limits.max_pixels)
    except ValueError as e:
        raise APIError(400, str(e), param) from e
