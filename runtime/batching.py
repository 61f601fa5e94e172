"""Dynamic batching: requests that can share U-Net calls are gathered into one pipeline call.

A `Batcher` owns one worker thread and one pipeline. `submit` queues a `GenerationRequest`
and returns a `concurrent.futures.Future` of that request's images; the worker takes the
oldest queued request, gathers the queued requests with the same `batch_key` (everything that
must be equal to share a call: size, steps, sampler, eta, guidance rescale, guided or not) for
up to `max_wait_ms` after the oldest one arrived, runs them as ONE `Pipeline` call with a
prompt, negative prompt, seed and guidance scale per image, and splits the images back.

img2img: a request may carry an input `image` (decoded, e.g. a PIL image or a uint8 array;
one image for all its n images) and a `strength`. Its key then holds the strength and the
size the pipeline resizes the image to (the given height/width, else the image's size rounded
down to the model's size multiple), so only requests whose images make latents of one size
and run one schedule share a call; the call gets one image per generated image.

Seeds follow A1111's convention: a request with seed s and n images uses seeds s, s+1, …,
s+n-1, one per image, so each request gets the same images alone or batched with others (the
pipeline draws each image's noise from its own seed; see `Pipeline.__call__`). A request of n
images therefore equals `pipeline(prompt, seed=[s, …, s+n-1], num_images_per_prompt=n)`, and
for n = 1 `pipeline(prompt, seed=s)`.

`batch_sizes` pads each call up to the smallest of a few sizes (1, 2, 4, 8, …) that holds it,
with copies of its last image whose results are dropped: a backend that captures a CUDA graph
per batch size then reuses a few graphs instead of capturing one per size. The padding
images change no other image, since each image draws its own noise.

Limits: one worker, so one call runs at a time (a GPU runs one batch best anyway); requests
are gathered only with others of the same key, never reordered across keys; a batch holds
at most `max_batch` images and at most the pipeline's `Limits.max_images`; a failing call
fails every request of its batch. Requests are checked against a fewstep
`Pipeline`'s model and limits at `submit`, so one bad request is refused before it can share
a batch with others.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from fewstep.inputs import (
    MAX_SEED,
    check_inputs,
    check_integer,
    check_number,
    check_strength,
    check_text,
)
from fewstep.pipeline import Pipeline
from fewstep.samplers import SAMPLERS, create_sampler

logger = logging.getLogger(__name__)

# batch sizes a CUDA-graph backend is padded to (see `batch_sizes`)
CUDA_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
OUTPUT_TYPES = ("pil", "np")


class QueueFull(RuntimeError):
    """The batcher's queue holds `max_queue` requests; try again later (HTTP 503/429)."""


class Closed(RuntimeError):
    """The batcher is closed and takes no more requests."""


class RequestImages(list[Any]):
    """One request's images (a list), and `settings`: what the pipeline resolved for them,
    its batch's `PipelineOutput.settings` with the per-image entries (prompts, seeds,
    guidance scales) cut to this request's images."""

    def __init__(
        self, images: list[Any], settings: dict[str, Any], start: int, stop: int, total: int
    ):
        super().__init__(images)
        self.settings: dict[str, Any] = {
            key: value[start:stop] if isinstance(value, list) and len(value) == total else value
            for key, value in settings.items()
        }


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One client's request: `n` images of one prompt. None takes the model's default.

    `seed` is required (a server draws one when the client gives none) so that the images
    are reproducible; image i uses seed + i. `image` (img2img): the input image, a PIL
    image or an [H, W, 3] array as `Pipeline.__call__(image=...)` takes it, used for all n
    images; `strength` goes with it (None: the model's default, fewstep.inputs.default_strength).
    """

    prompt: str
    seed: int
    n: int = 1
    negative_prompt: str = ""
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    eta: float = 0.0
    guidance_rescale: float = 0.0
    # not compared: arrays have no truth value, and a request is no dict key
    image: Any = dataclasses.field(default=None, compare=False, repr=False)
    strength: float | None = None

    def __post_init__(self) -> None:
        # Types and ranges here; the model's sizes and limits at Batcher.submit.
        check_text("prompt", self.prompt, max_chars=2**62)
        check_text("negative_prompt", self.negative_prompt, max_chars=2**62)
        n = check_integer("n", self.n, 1)
        check_integer("seed", self.seed, 0, MAX_SEED - (n - 1))  # seed + n - 1 is a seed too
        if self.guidance_scale is not None:
            check_number("guidance_scale", self.guidance_scale, 0.0, 100.0)
        check_number("eta", self.eta, 0.0, 1.0)
        check_number("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        if self.image is not None:
            image_size(self.image)  # a PIL image or an [H, W, 3] array
        if self.strength is not None:
            if self.image is None:
                raise ValueError(
                    f"strength is for img2img: pass it with an image, got {self.strength!r} alone"
                )
            check_strength(self.strength)

    @property
    def img2img_strength(self) -> float | None:
        """The strength the request asks for; None without an image (not img2img) or for the
        model's default (fewstep.inputs.default_strength, its own batch group)."""
        if self.image is None or self.strength is None:
            return None
        return float(self.strength)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """`key_for` a model of any size multiple (the image's own size, unrounded)."""
        return self.key_for(1)

    def key_for(self, size_multiple: int) -> tuple[Any, ...]:
        """Requests with equal keys can share one pipeline call on a model whose sizes are
        multiples of `size_multiple`. Prompts, negative prompts, seeds, guidance scales and
        input images go per image; guided-or-not decides whether the U-Net runs on a doubled
        batch, so it must agree (None, the model's default, is its own group); img2img's
        strength and the size its images are resized to must agree too."""
        guided = None if self.guidance_scale is None else self.guidance_scale > 1.0
        img2img = None
        if self.image is not None:
            height, width = image_size(self.image)
            img2img = (
                self.img2img_strength,
                self.height if self.height is not None else height - height % size_multiple,
                self.width if self.width is not None else width - width % size_multiple,
            )
        return (
            self.height,
            self.width,
            self.num_inference_steps,
            self.scheduler,
            self.eta,
            self.guidance_rescale,
            guided,
            img2img,
        )


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a request's input image: a PIL image or an [H, W, 3] array."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return int(image.height), int(image.width)
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3:
        return int(image.shape[0]), int(image.shape[1])
    raise ValueError(
        "image must be a PIL image or a numpy array [height, width, 3], got "
        f"{type(image).__name__} {getattr(image, 'shape', '')}"
    )


@dataclasses.dataclass(frozen=True)
class BatchRecord:
    """What one pipeline call did: `wait_ms` is how long its oldest request was queued."""

    requests: int
    images: int
    wait_ms: float
    run_ms: float
    ok: bool


@dataclasses.dataclass
class _Queued:
    request: GenerationRequest
    future: Future[RequestImages]
    submitted: float  # time.monotonic()
    key: tuple[Any, ...]  # the request's batch key for this batcher's model


class Batcher:
    """Queue of requests and one worker thread that runs them in batches (module docstring).

    `output_type` "pil" gives each future a list of PIL images, "np" a list of float32
    [H, W, 3] arrays in 0..1. `on_batch` is called with each `BatchRecord` on the worker
    thread; `stats()` returns the last `keep_stats` records.
    """

    def __init__(
        self,
        pipeline: Callable[..., Any],
        max_batch: int = 8,
        max_wait_ms: float = 2.0,
        max_queue: int = 64,
        output_type: str = "pil",
        on_batch: Callable[[BatchRecord], None] | None = None,
        keep_stats: int = 1000,
        batch_sizes: Sequence[int] | None = None,
    ):
        self.pipeline = pipeline
        self.max_batch = check_integer("max_batch", max_batch, 1)
        if isinstance(pipeline, Pipeline):
            self.max_batch = min(self.max_batch, pipeline.limits.max_images)
        self.batch_sizes: tuple[int, ...] = ()
        if batch_sizes is not None:
            limit = pipeline.limits.max_images if isinstance(pipeline, Pipeline) else None
            sizes = {check_integer("batch_sizes[]", s, 1) for s in batch_sizes}
            self.batch_sizes = tuple(sorted(s for s in sizes if limit is None or s <= limit))
        self.max_wait_s = check_number("max_wait_ms", max_wait_ms, 0.0, 60_000.0) / 1e3
        self.max_queue = check_integer("max_queue", max_queue, 1)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        self.output_type = output_type
        self.on_batch = on_batch
        self._records: collections.deque[BatchRecord] = collections.deque(
            maxlen=check_integer("keep_stats", keep_stats, 1)
        )
        self._queue: collections.deque[_Queued] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="fewstep-batcher", daemon=True)
        self._thread.start()

    # -- client side ----------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Future[RequestImages]:
        """Queue `request`; never blocks. Raises ValueError for a request the model refuses,
        QueueFull when `max_queue` requests wait, Closed after `close`."""
        if not isinstance(request, GenerationRequest):
            raise ValueError(f"request must be a GenerationRequest, got {type(request).__name__}")
        self._check_against_model(request)
        key = self._key(request)
        future: Future[RequestImages] = Future()
        with self._cond:
            if self._closed:
                raise Closed("the batcher is closed")
            if len(self._queue) >= self.max_queue:
                self._drop_cancelled()
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue holds its maximum of {self.max_queue} requests")
            self._queue.append(_Queued(request, future, time.monotonic(), key))
            self._cond.notify()
        future.add_done_callback(self._forget_if_cancelled)
        return future

    def _forget_if_cancelled(self, future: Future[RequestImages]) -> None:
        """A request cancelled while queued leaves the queue at once (its place is free)."""
        if future.cancelled():
            with self._cond:
                self._drop_cancelled()

    def _key(self, request: GenerationRequest) -> tuple[Any, ...]:
        pipe = self.pipeline
        multiple = pipe.info.size_multiple if isinstance(pipe, Pipeline) else 1
        return request.key_for(multiple)

    def _check_against_model(self, request: GenerationRequest) -> None:
        """Check the request alone as the pipeline would (sizes, steps, sampler, limits; for
        img2img the VAE encoder, the image and the steps that strength keeps)."""
        pipe = self.pipeline
        if not isinstance(pipe, Pipeline):
            return
        if request.n > pipe.limits.max_images:  # before the call's n-long lists are built
            raise ValueError(
                f"n must be at most {pipe.limits.max_images} images per call, got {request.n}"
            )
        arguments = self._call_arguments([request])
        if request.image is not None:
            pipe.check_image_encoder()
            arguments["image"] = request.image  # one decode here, not one per image
        checked = check_inputs(
            info=pipe.info,
            limits=pipe.limits,
            samplers=SAMPLERS,
            latents=None,
            generator=None,
            output_type=self.output_type,
            **arguments,
        )
        if checked.strength is not None:  # the steps that strength keeps (none: refused)
            name = checked.scheduler or pipe.info.scheduler_class
            sampler = create_sampler(name, pipe.info.scheduler_config)
            sampler.set_img2img_timesteps(checked.num_inference_steps, checked.strength)

    def stats(self) -> list[BatchRecord]:
        with self._cond:
            return list(self._records)

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Take no more requests; with `drain` finish the queued ones, else cancel them; wait
        up to `timeout` seconds for the running batch. True when the worker has finished."""
        with self._cond:
            self._closed = True
            if not drain:
                for item in self._queue:
                    item.future.cancel()
                self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker side ----------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        self._queue = collections.deque(q for q in self._queue if not q.future.cancelled())

    def _work(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            # A future cancelled while queued is dropped here; the others can't be cancelled now.
            batch = [q for q in batch if q.future.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)

    def _gather(self) -> list[_Queued] | None:
        """Wait for the oldest request, then gather compatible ones until the batch is full,
        `max_wait_ms` after the oldest arrived has passed, or the batcher closes. None when
        closed and empty."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            head = self._queue.popleft()
            batch = [head]
            images = head.request.n
            key = head.key
            deadline = head.submitted + self.max_wait_s
            while images < self.max_batch:
                for item in list(self._queue):
                    n = item.request.n
                    if item.key == key and images + n <= self.max_batch:
                        self._queue.remove(item)
                        batch.append(item)
                        images += n
                left = deadline - time.monotonic()
                if images >= self.max_batch or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            return batch

    def _call_arguments(
        self, requests: Sequence[GenerationRequest], pad_to: int = 0
    ) -> dict[str, Any]:
        """One call for all `requests`: each prompt repeated for its images, a seed and a
        guidance scale per image (img2img: an input image per image); the shared settings
        from the first (their keys agree). With `pad_to`, the last image is repeated until
        the call holds that many."""
        first = requests[0]
        images = [(r, seed) for r in requests for seed in r.seeds]
        images += images[-1:] * max(0, pad_to - len(images))
        img2img: dict[str, Any] = {}
        if first.image is not None:
            img2img = dict(image=[r.image for r, _ in images], strength=first.img2img_strength)
        return dict(
            prompt=[r.prompt for r, _ in images],
            negative_prompt=[r.negative_prompt for r, _ in images],
            seed=[seed for _, seed in images],
            guidance_scale=None
            if first.guidance_scale is None
            else [r.guidance_scale for r, _ in images],
            num_images_per_prompt=1,
            num_inference_steps=first.num_inference_steps,
            height=first.height,
            width=first.width,
            scheduler=first.scheduler,
            eta=first.eta,
            guidance_rescale=first.guidance_rescale,
            **img2img,
        )

    def _run(self, batch: list[_Queued]) -> None:
        requests = [q.request for q in batch]
        images = sum(r.n for r in requests)
        started = time.monotonic()
        size = min((s for s in self.batch_sizes if s >= images), default=images)
        try:
            arguments = self._call_arguments(requests, pad_to=size)
            output = self.pipeline(output_type=self.output_type, **arguments)
            results = list(output.images)
            if len(results) != size:
                raise RuntimeError(f"the pipeline returned {len(results)} images for {size}")
        except Exception as e:  # the batch's requests fail; the worker goes on
            logger.warning("batch of %d requests failed: %r", len(batch), e)
            self._record(batch, images, started, ok=False)
            for item in batch:
                item.future.set_exception(e)
            return
        # Recorded before any request sees its images, so its client reads stats with it.
        self._record(batch, images, started, ok=True)
        call_settings = getattr(output, "settings", {})
        start = 0
        for item in batch:
            stop = start + item.request.n
            item.future.set_result(
                RequestImages(results[start:stop], call_settings, start, stop, size)
            )
            start = stop

    def _record(self, batch: list[_Queued], images: int, started: float, ok: bool) -> None:
        now = time.monotonic()
        record = BatchRecord(
            requests=len(batch),
            images=images,
            wait_ms=(started - min(q.submitted for q in batch)) * 1e3,
            run_ms=(now - started) * 1e3,
            ok=ok,
        )
        with self._cond:
            self._records.append(record)
        if self.on_batch is not None:
            try:
                self.on_batch(record)
            except Exception:
                logger.exception("on_batch callback failed")


__all__ = [
    "BatchRecord",
    "Batcher",
    "Closed",
    "GenerationRequest",
    "QueueFull",
    "RequestImages",
]
