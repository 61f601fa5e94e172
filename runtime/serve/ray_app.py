"""fewstep's HTTP service on Ray Serve: replicas of the same app, each with its own batchers.

Each replica of the `fewstep` deployment loads the models, builds the app with
`fewstep.serve.create_app` (the same routes, checks, limits, key, batching and metrics as
`fewstep serve`) and serves it through Ray Serve's ASGI ingress. Ray's HTTP proxy (one per
node) spreads the requests over the replicas; dynamic batching happens inside each replica,
over the requests that replica got.

- `ServeSettings`: what every replica is built from (models, backend, limits, batching);
- `build_app(args)`: the application builder a Serve config names
  (`import_path: fewstep.serve.ray_app:build_app`, `args:` as in docs/serve-ray.yaml);
- `application(settings, ...)`: the bound application, with replicas or autoscaling;
- `serve_on_ray(...)`: `fewstep serve --ray`: the application on this machine's Ray
  (a local cluster started for it, or the one `RAY_ADDRESS` names) until a signal; port 0:
  a free port of the OS's choosing (`proxy_port`), named in the log once served;
- LoRAs (with `lora_dir`): a request asking for LoRAs (`<lora:NAME:SCALE>` in its prompt,
  or OpenAI's `loras` field; ray_loras.py) is served by a *variant*, its model with those
  LoRAs folded in, loaded through Ray's `serve.multiplexed` (at most `max_variants` per
  replica, the least recently used unloaded first) with a batcher of its own.

A replica takes requests only once its service is ready (models warmed up, batchers
running): its ASGI start-up completes only then (`StartedWhenReady`). Ray sends a replica at
most `max_ongoing_requests` at once (default: `max_batch + max_queue`, what its batcher
holds); the rest wait in Ray's router. `GET /metrics` is the metrics of the replica that
answered; Ray's own (per node, `ray_serve_*`) are on each node's metrics export port.

Limits: models are read from paths on each replica's node (the same path on every node);
the API key comes from the settings or the replica's `FEWSTEP_API_KEY`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from ray import serve
from starlette.types import Message, Receive, Scope, Send

from fewstep.inputs import Limits, check_integer, check_number
from fewstep.pipeline import Pipeline
from fewstep.serve.app import create_app
from fewstep.serve.metrics import Metrics
from fewstep.serve.ray_loras import LoraSet, LoraVariants
from fewstep.serve.service import WARM_UP_PROMPT, Service

logger = logging.getLogger("fewstep.serve")

APP_NAME = "fewstep"
DEPLOYMENT_NAME = "fewstep"
REPLICA_HEADER = b"x-fewstep-replica"
READY_TIMEOUT_S = 600.0  # a replica whose service is not ready by then fails its start-up
PROXY_TIMEOUT_S = 120.0  # how long a held port waits for Ray's HTTP proxy to serve on it


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What each replica builds its app from. `models`: name → package path on the
    replica's node (None: the bundled default model as "default"); `backend_options`: the
    backend's keywords (`precision` for openvino, `device` for torch, `providers` for
    onnxruntime, ...); the rest as `create_app` and `Pipeline.from_pretrained` take them."""

    models: dict[str, str] | None = None
    backend: str = "onnxruntime"
    backend_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    limits: Limits = dataclasses.field(default_factory=Limits)
    api_key: str | None = None
    max_batch: int = 8
    max_wait_ms: float = 2.0
    max_queue: int = 64
    request_timeout: float = 300.0
    lora_dir: str | None = None
    max_variants: int = 3
    cors_origins: list[str] | None = None

    def __post_init__(self) -> None:
        # Checked where the settings are made (the driver), not on each replica.
        if self.models is not None:
            if not isinstance(self.models, dict) or not self.models:
                raise ValueError(
                    f"models must be a non-empty dict of name → path, got {self.models!r:.80}"
                )
            for name, path in self.models.items():
                if not isinstance(name, str) or not name or not isinstance(path, str | Path):
                    raise ValueError(f"models must map names to paths, got {name!r}: {path!r}")
        if not isinstance(self.backend_options, dict):
            raise ValueError(f"backend_options must be a mapping, got {self.backend_options!r}")
        if not isinstance(self.limits, Limits):
            raise ValueError(f"limits must be a fewstep.Limits, got {self.limits!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string or None")
        check_integer("max_batch", self.max_batch, 1)
        check_number("max_wait_ms", self.max_wait_ms, 0.0, 60_000.0)
        check_integer("max_queue", self.max_queue, 1)
        check_number("request_timeout", self.request_timeout, 0.001, 86_400.0)
        check_integer("max_variants", self.max_variants, 1)
        if self.lora_dir is not None and not isinstance(self.lora_dir, str | Path):
            raise ValueError(f"lora_dir must be a folder's path or None, got {self.lora_dir!r}")

    def model_paths(self) -> dict[str, Path]:
        from fewstep.package import default_model

        if self.models is None:
            return {"default": default_model()}
        return {name: Path(path) for name, path in self.models.items()}

    def load_pipelines(self) -> dict[str, Pipeline]:
        """Every model loaded and warmed up, so that a failing model fails the replica's
        start-up here, with its error, rather than leaving it never ready."""
        pipelines = {
            name: Pipeline.from_pretrained(
                path, backend=self.backend, limits=self.limits, **self.backend_options
            )
            for name, path in self.model_paths().items()
        }
        for pipe in pipelines.values():
            pipe(WARM_UP_PROMPT, seed=0, num_inference_steps=1, output_type="pil")
        return pipelines

    def load_variant(self, model: str, loras: LoraSet) -> Pipeline:
        """`model` with `loras` (names in `lora_dir`) folded into a copy of its weights,
        warmed up as the models are."""
        assert self.lora_dir is not None
        files = [(str(Path(self.lora_dir) / f"{name}.safetensors"), scale) for name, scale in loras]
        options = {**self.backend_options}
        options["loras"] = [*options.get("loras", []), *files]
        path = self.model_paths()[model]
        pipe = Pipeline.from_pretrained(path, self.backend, limits=self.limits, **options)
        pipe(WARM_UP_PROMPT, seed=0, num_inference_steps=1, output_type="pil")
        return pipe

    def create_app(self, pipelines: dict[str, Pipeline]) -> Any:
        return create_app(
            pipelines,
            api_key=self.api_key or os.environ.get("FEWSTEP_API_KEY") or None,
            max_batch=self.max_batch,
            max_wait_ms=self.max_wait_ms,
            max_queue=self.max_queue,
            request_timeout=self.request_timeout,
            cors_origins=self.cors_origins,
        )


class StartedWhenReady:
    """An app made by `create_app`, whose ASGI start-up completes only once its service is
    ready: `create_app` warms up beside a running server, but Ray routes requests to a
    replica as soon as its start-up completes. Every answer names the replica that sent it
    in `X-Fewstep-Replica` (Ray's replica id, as its logs and `serve status` show it)."""

    def __init__(self, app: Any, replica: str, timeout_s: float = READY_TIMEOUT_S):
        self.app, self.timeout_s = app, timeout_s
        self.replica_header = (REPLICA_HEADER, replica.encode())
        self.service: Service = app.state.fewstep

    def add_exception_handler(self, *args: Any) -> None:
        self.app.add_exception_handler(*args)  # Ray adds its own for back-pressure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.app(scope, receive, self._naming_the_replica(send))
        elif scope["type"] == "lifespan":
            await self.app(scope, receive, self._once_ready(send))
        else:
            await self.app(scope, receive, send)

    def _naming_the_replica(self, send: Send) -> Send:
        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), self.replica_header]
                message = {**message, "headers": headers}
            await send(message)

        return send_named

    def _once_ready(self, send: Send) -> Send:

        async def send_once_ready(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                await self._wait_until_ready()
            await send(message)

        return send_once_ready

    async def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.service.ready:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service was not ready within {self.timeout_s:g} s")
            await asyncio.sleep(0.01)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class FewstepReplica:
    """One replica: the models loaded on its node and the app around them."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.service: Service | None = None

    async def __serve_build_asgi_app__(self) -> StartedWhenReady:
        pipelines = await asyncio.to_thread(self.settings.load_pipelines)
        replica = serve.get_replica_context().replica_id.unique_id
        app = self.settings.create_app(pipelines)
        if self.settings.lora_dir is not None:
            loader = self._variant_loader(app.state.fewstep, app.state.metrics)
            app = LoraVariants(app, app.state.fewstep, Path(self.settings.lora_dir), loader)
        started = StartedWhenReady(app, replica)
        self.service = started.service
        return started

    def _variant_loader(
        self, service: Service, metrics: Metrics
    ) -> Callable[[str, str, LoraSet], Awaitable[Variant]]:
        """`load(variant, model, loras)` through Ray's multiplexer: at most `max_variants`
        variants on this replica, the least recently used one unloaded first; Ray routes
        requests whose `serve_multiplexed_model_id` names a variant to replicas holding it."""
        wanted: collections.OrderedDict[str, tuple[str, LoraSet]] = collections.OrderedDict()

        async def fold(variant: str) -> Variant:
            model, loras = wanted[variant]
            started = time.perf_counter()
            pipe = await asyncio.to_thread(self.settings.load_variant, model, loras)
            service.add_model(variant, pipe)
            seconds = time.perf_counter() - started
            metrics.observe_stage(variant, "fold", seconds)
            logger.info("variant %s folded and warmed up in %.2f s", variant, seconds)
            return Variant(service, metrics, variant)

        multiplexed = serve.multiplexed(max_num_models_per_replica=self.settings.max_variants)
        load_variant = multiplexed(fold)

        async def load(variant: str, model: str, loras: LoraSet) -> Variant:
            wanted[variant] = (model, loras)
            wanted.move_to_end(variant)
            while len(wanted) > 1024:  # what `fold` may be asked for: recent requests'
                wanted.popitem(last=False)
            variant_served: Variant = await load_variant(variant)
            return variant_served

        return load


class Variant:
    """A LoRA variant served by a replica; Ray's multiplexer calls `__del__` to unload it:
    its queued requests finish, then its folded weights are dropped (the model's own
    weights were never changed, so nothing is unfolded by subtraction)."""

    def __init__(self, service: Service, metrics: Metrics, name: str):
        self.service, self.metrics, self.name = service, metrics, name
        self.served = True

    def __del__(self) -> None:
        if not getattr(self, "served", False):
            return
        self.served = False
        started = time.perf_counter()
        self.service.remove_model(self.name)
        self.metrics.observe_stage(self.name, "unfold", time.perf_counter() - started)


def deployment_options(
    settings: ServeSettings,
    num_replicas: int | str | None = 1,
    autoscaling_config: dict[str, Any] | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    max_ongoing_requests: int | None = None,
    graceful_shutdown_timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Ray's options of the deployment; a Serve config's `deployments:` entry overrides them."""
    options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing_requests or settings.max_batch + settings.max_queue,
        "graceful_shutdown_timeout_s": graceful_shutdown_timeout_s,
    }
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas
    if ray_actor_options is not None:
        options["ray_actor_options"] = ray_actor_options
    return options


def application(settings: ServeSettings, **options: Any) -> Any:
    """The Ray Serve application of `settings`; `options` as `deployment_options` takes."""
    deployment: Any = FewstepReplica  # a ray Deployment, which mypy sees as the class
    return deployment.options(**deployment_options(settings, **options)).bind(settings)


# `build_app` args: ServeSettings' fields, and Limits' fields at the top level
LIMIT_KEYS = tuple(f.name for f in dataclasses.fields(Limits))
SETTING_KEYS = tuple(f.name for f in dataclasses.fields(ServeSettings) if f.name != "limits")
APP_KEYS = frozenset(SETTING_KEYS + LIMIT_KEYS)


def settings_from_args(args: dict[str, Any]) -> ServeSettings:
    """`ServeSettings` from a Serve config's `args:` (unknown keys refused, naming them)."""
    if not isinstance(args, dict):
        raise ValueError(f"args must be a mapping, got {args!r:.80}")
    unknown = sorted(set(args) - APP_KEYS)
    if unknown:
        raise ValueError(f"unknown args {unknown}; accepted: {sorted(APP_KEYS)}")
    limits = Limits(**{k: args[k] for k in LIMIT_KEYS if k in args})
    return ServeSettings(**{k: args[k] for k in SETTING_KEYS if k in args}, limits=limits)


def build_app(args: dict[str, Any]) -> Any:
    """The application builder of a Serve config: `import_path:
    fewstep.serve.ray_app:build_app`; `args` are `ServeSettings`' fields plus Limits'
    (max_pixels, max_images, max_steps, max_prompt_chars). Replicas, autoscaling and
    resources go in the config's `deployments:` entry named "fewstep"."""
    return application(settings_from_args(args))


def serve_on_ray(
    settings: ServeSettings,
    replicas: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_timeout: float = 60.0,
) -> None:
    """`fewstep serve --ray`: `replicas` replicas served at http://host:port/ until SIGTERM or
    SIGINT, on a Ray cluster started for them on this machine (stopped at the end), or on the
    running one `RAY_ADDRESS` names (only this application is removed at the end). The first
    signal drains the replicas (up to `drain_timeout` seconds each); a second stops at once.
    `port` 0 (the local cluster only): a free port of the OS's choosing (`proxy_port`); the
    log line "serving N replica(s) on http://host:port/" names the port served."""
    import ray

    from fewstep.package import read_model_info

    check_integer("replicas", replicas, 1)
    address = os.environ.get("RAY_ADDRESS") or "local"
    if port == 0 and address != "local":
        raise ValueError(
            f"port 0 (a free port chosen at start) needs the local Ray cluster, but "
            f"RAY_ADDRESS={address!r} names a running one: give a port"
        )
    for path in settings.model_paths().values():
        read_model_info(path)  # a bad package fails here, not in every replica's retries
    ray.init(address=address, logging_level=logging.WARNING)
    stopping = _stop_on_signals()  # after ray.init, which sets handlers of its own
    try:
        with proxy_port(host, port) as served_port:
            serve.start(http_options={"host": host, "port": served_port})
            cpus = float(ray.cluster_resources().get("CPU", 1)) / replicas  # shares cores
            app = application(
                settings,
                num_replicas=replicas,
                ray_actor_options={"num_cpus": cpus},
                graceful_shutdown_timeout_s=drain_timeout,
            )
            serve.run(app, name=APP_NAME, route_prefix="/")
        logger.info("serving %d replica(s) on http://%s:%d/", replicas, host, served_port)
        while not stopping.wait(0.5):
            pass
        logger.info("draining: finishing the requests in flight, then stopping")
        started = time.monotonic()
        serve.delete(APP_NAME)  # each replica finishes its requests, then drains its batchers
        logger.info("drained in %.1f s", time.monotonic() - started)
    finally:
        if address == "local":
            serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def proxy_port(host: str, port: int, timeout_s: float = PROXY_TIMEOUT_S) -> Iterator[int]:
    """`port` for Ray Serve's HTTP proxy on `host`; with 0, a port the OS finds free, held
    until the block (which starts Serve) ends and the proxy serves on it.

    Why held: the proxy takes a port number, and given 0 it binds a port it reports nowhere.
    A free port let go before the proxy binds it can go meanwhile to one of Ray's processes
    starting with the cluster; a gRPC server of Ray's then shares it with the proxy (both bind
    with SO_REUSEPORT) and answers some of its connections. Bound here (not listening) with
    SO_REUSEPORT, the port is given by the OS to no other socket and cannot be bound without
    SO_REUSEPORT, while the proxy can still bind it. Where the proxy does not set SO_REUSEPORT
    (no such option, or SERVE_SOCKET_REUSE_PORT_ENABLED=0) it could not bind a held port: the
    port is let go before the block, as good as a port picked in advance."""
    if port != 0:
        yield port
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as held:
        shared = _proxy_binds_with_reuseport()
        if shared:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((host, 0))
        port = int(held.getsockname()[1])
        if not shared:
            held.close()
        yield port
        if shared:
            _wait_for_proxies(timeout_s)


def _proxy_binds_with_reuseport() -> bool:
    # The proxy's process inherits this environment when Ray is started from here.
    enabled = os.environ.get("SERVE_SOCKET_REUSE_PORT_ENABLED", "1") == "1"
    return enabled and hasattr(socket, "SO_REUSEPORT")


def _wait_for_proxies(timeout_s: float) -> None:
    """Until every Ray Serve HTTP proxy is HEALTHY (its port bound, its server running)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {str(getattr(s, "value", s)) for s in serve.status().proxies.values()}
        if states == {"HEALTHY"}:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"Ray Serve's HTTP proxy was not serving within {timeout_s:g} s: {states or 'none'}"
            )
        time.sleep(0.1)


def _stop_on_signals() -> threading.Event:
    """An event set by the first SIGTERM or SIGINT; a second one has its default effect."""
    stopping = threading.Event()

    def stop(sig: int, frame: Any) -> None:
        stopping.set()
        for each in (signal.SIGTERM, signal.SIGINT):
            signal.signal(each, signal.SIG_DFL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    return stopping
