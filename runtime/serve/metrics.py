"""`GET /metrics`: the service's counters in Prometheus' text format (prometheus_client).

- `fewstep_requests_total{endpoint,status}` and `fewstep_request_seconds{endpoint}`: every
  HTTP request, by route (paths that match no route count as "other", so random paths cannot
  grow the label set);
- `fewstep_queue_depth{model}`: requests waiting, read when scraped;
- `fewstep_batch_images{model}`, `fewstep_batch_requests{model}`: what each pipeline call held;
- `fewstep_stage_seconds{model,stage}`: per stage, "queue" (the oldest request's wait),
  "pipeline" (the call) and "encode" (PNGs of one request).

Each app has its own registry, so several apps in one process do not share counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fewstep.batching import BatchRecord

# every size up to 16 its own bucket, so a histogram tells the batch sizes exactly there
BATCH_SIZES = (*range(1, 17), 24, 32, 48, 64)
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _QueueDepth(Collector):
    def __init__(self, depths: Callable[[], dict[str, int]]):
        self.depths = depths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "fewstep_queue_depth", "Requests waiting for a batch", labels=["model"]
        )
        for model, depth in self.depths().items():
            gauge.add_metric([model], depth)
        yield gauge


class Metrics:
    """The service's metrics in their own registry; `queue_depths` is read at each scrape."""

    def __init__(self, queue_depths: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fewstep_requests",
            "HTTP requests by route and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fewstep_request_seconds",
            "HTTP request latency by route",
            ["endpoint"],
            buckets=SECONDS,
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "fewstep_batch_images",
            "Images per pipeline call",
            ["model"],
            buckets=BATCH_SIZES,
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "fewstep_batch_requests",
            "Requests per pipeline call",
            ["model"],
            buckets=BATCH_SIZES,
            registry=self.registry,
        )
        self.stages = Histogram(
            "fewstep_stage_seconds",
            "Time per stage of a generation",
            ["model", "stage"],
            buckets=SECONDS,
            registry=self.registry,
        )
        self.registry.register(_QueueDepth(queue_depths))

    def observe_batch(self, model: str, record: BatchRecord) -> None:
        self.batch_images.labels(model).observe(record.images)
        self.batch_requests.labels(model).observe(record.requests)
        self.stages.labels(model, "queue").observe(record.wait_ms / 1e3)
        self.stages.labels(model, "pipeline").observe(record.run_ms / 1e3)

    def observe_stage(self, model: str, stage: str, seconds: float) -> None:
        self.stages.labels(model, stage).observe(seconds)

    def text(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
    """ASGI middleware counting every HTTP request by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[Any]):
        self.app, self.metrics, self.routes = app, metrics, routes

    def endpoint(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return str(route.path)
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # when the app fails before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = self.endpoint(scope)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
