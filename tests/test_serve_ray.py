"""fewstep's service on Ray Serve (fewstep.serve.ray_app), through Ray's HTTP proxy on 127.0.0.1.

One local Ray cluster (2 CPUs) for the module, with two replicas of the bundled default model
behind an API key. The images come through the real `openai` client and A1111's txt2img and
must equal the pipeline's own and those of `fewstep serve` in this process; the other
endpoints, the key and the limits are the same app's. The fault test kills one replica's
process during a bounded load: every request is answered (an image equal to the pipeline's
for its seed, or a clean 5xx that the client retries) and Ray replaces the replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

ray = pytest.importorskip(
    "ray", reason="the ray extra is not installed: pip install 'fewstep[ray]'"
)
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serving import decode_png, error_of, live_server  # noqa: E402

from fewstep.benchmarks.http_load import post_each_at_once  # noqa: E402
from fewstep.benchmarks.serve_bench import run_ray_bench, served_on_ray  # noqa: E402
from fewstep.image_files import a1111_parameters  # noqa: E402
from fewstep.package import default_model, read_manifest  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402
from fewstep.serve import MAX_BODY_BYTES, create_app  # noqa: E402
from fewstep.serve.ray_app import (  # noqa: E402
    APP_NAME,
    DEPLOYMENT_NAME,
    ServeSettings,
    StartedWhenReady,
    application,
    build_app,
    proxy_port,
    serve_on_ray,
    settings_from_args,
)
from fewstep.serve.service import WARM_UP_PROMPT  # noqa: E402

PROMPT = "a red circle on a blue background"
KEY = "sk-ray-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
GENERATIONS = "/v1/images/generations"
REPLICA_TITLE = f"ray::ServeReplica:{APP_NAME}:{DEPLOYMENT_NAME}".encode()


@dataclasses.dataclass(frozen=True)
class RayService:
    base: str  # Ray's HTTP proxy
    metrics_port: int  # Ray's own metrics (this node's)


@pytest.fixture(scope="module")
def ray_service() -> Iterator[RayService]:
    # Ports from the OS, none picked in advance: Ray's own processes bind ports as they start.
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        with proxy_port("127.0.0.1", 0) as http_port:
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
            settings = ServeSettings(api_key=KEY, max_batch=8, max_wait_ms=50)
            # Ray sends each replica at most a batch at once: 16 requests at once use both.
            app = application(
                settings, num_replicas=2, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8
            )
            serve.run(app, name=APP_NAME, route_prefix="/")
        [node] = ray.nodes()
        yield RayService(f"http://127.0.0.1:{http_port}", int(node["MetricsExportPort"]))
    finally:
        serve.shutdown()
        ray.shutdown()


def post(base: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{base}{GENERATIONS}", json=body, headers=AUTH | (headers or {}), timeout=60)


def replica_states() -> dict[str, int]:
    status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    return dict(status.replica_states)


# -- the proxy's port --------------------------------------------------------------------------


def bindable(port: int) -> bool:
    """Whether a server other than Ray's proxy could bind `port` (as uvicorn does)."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            other.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def proxy_states(states: list[str], ports: list[int], seen: list) -> Any:
    """A serve.status() whose proxy is in `states` in turn (then stays in the last); each call
    appends (the state, whether the last of `ports` was bindable) to `seen`."""
    answers = iter(states)

    def status() -> Any:
        state = next(answers, states[-1])
        seen.append((state, bindable(ports[-1])))
        return types.SimpleNamespace(proxies={"node": state})

    return status


def test_a_held_proxy_port_is_for_rays_proxy_only_until_it_serves(monkeypatch):
    import fewstep.serve.ray_app as ray_app

    ports: list[int] = []
    seen: list = []
    states = ["STARTING", "STARTING", "HEALTHY"]
    monkeypatch.setattr(ray_app.serve, "status", proxy_states(states, ports, seen))
    with proxy_port("127.0.0.1", 0) as port:
        ports.append(port)
        assert port > 0 and not bindable(port)
        asked = [socket.socket() for _ in range(200)]  # what the OS gives other processes
        try:
            for sock in asked:
                sock.bind(("127.0.0.1", 0))
            assert port not in {sock.getsockname()[1] for sock in asked}
        finally:
            for sock in asked:
                sock.close()
        with socket.socket() as proxy:  # as Ray's proxy binds (SO_REUSEPORT)
            proxy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            proxy.bind(("127.0.0.1", port))
            proxy.listen()
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                proxy.settimeout(5)
                answering, _ = proxy.accept()
                client.close()
                answering.close()
        assert seen == []  # asked only once the block (which starts Serve) ends
    assert seen == [("STARTING", False), ("STARTING", False), ("HEALTHY", False)]
    assert bindable(port)  # let go once the proxy serves


def test_a_proxy_that_never_serves_fails_the_start_naming_its_state(monkeypatch):
    import fewstep.serve.ray_app as ray_app

    ports: list[int] = []
    monkeypatch.setattr(ray_app.serve, "status", proxy_states(["UNHEALTHY"], ports, []))
    with (
        pytest.raises(RuntimeError, match=r"not serving within 0.3 s: \{'UNHEALTHY'\}"),
        proxy_port("127.0.0.1", 0, timeout_s=0.3) as port,
    ):
        ports.append(port)
    assert bindable(port)


def test_an_explicit_proxy_port_is_used_as_given():
    with proxy_port("127.0.0.1", 8123) as port:
        assert port == 8123


def test_port_0_on_a_running_cluster_is_refused_naming_it(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(ValueError, match="port 0 .* needs the local Ray cluster.*head:10001"):
        serve_on_ray(ServeSettings(), port=0)


# -- `fewstep serve --ray` in a process of its own ---------------------------------------------
# These start Ray clusters of their own, so they come before the tests that use `ray_service`
# (whose cluster lives until the module ends): one cluster at a time on a small machine.


def assert_the_only_server_on_its_port(base: str, server: subprocess.Popen, log: Path) -> None:
    """Started with --port 0 (no port picked in advance), the server names the port the OS gave
    it in its log, where the launcher read it; only the proxy of the server's own Ray cluster
    listens on it (no process of Ray's shares it through SO_REUSEPORT)."""
    import psutil  # a dependency of ray's

    assert server.args[server.args.index("--port") + 1] == "0"
    port = urlsplit(base).port
    assert f"serving 2 replica(s) on http://127.0.0.1:{port}/" in log.read_text()
    listening = [
        c
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert len(listening) == 1, listening
    assert listening[0].pid is not None and descends_from(listening[0].pid, server.pid)


def test_fewstep_serve_ray_answers_and_drains_on_sigterm(tmp_path):
    log = tmp_path / "server.log"
    bodies = [
        {"prompt": f"a circle {i}", "seed": i, "n": 2, "num_inference_steps": 40} for i in range(6)
    ]
    in_flight: list = []
    with served_on_ray(["--replicas", "2", "--max-batch", "4"], log) as (base, server):
        assert_the_only_server_on_its_port(base, server, log)
        load = threading.Thread(
            target=lambda: in_flight.extend(
                asyncio.run(post_each_at_once(base, GENERATIONS, bodies))
            )
        )
        load.start()
        time.sleep(1.0)  # every request queued or running in a replica
        server.send_signal(signal.SIGTERM)
        load.join(120)
        assert server.wait(120) == 0
    assert [answer.status for answer in in_flight] == [200] * len(bodies)
    assert all(len(answer.json()["data"]) == 2 for answer in in_flight)
    assert "drained in" in log.read_text()
    assert not replica_pids_of_any_parent(), "replicas left running"


def test_serve_bench_against_one_and_two_replicas(tmp_path):
    results = run_ray_bench(None, [2], max_batch=4, requests=6, time_limit_s=60, workdir=tmp_path)
    assert [(c["replicas"], c["concurrency"]) for c in results["cases"]] == [(1, 2), (2, 2)]
    for case in results["cases"]:
        assert case["statuses"] == {"200": 6} and case["requests"] == 6
        histogram = {int(k): v for k, v in case["batch_images_histogram"].items()}
        assert sum(size * calls for size, calls in histogram.items()) == 6  # every replica's
        assert max(histogram) <= 4
    scaling = results["replica_scaling_images_per_s"]["2"]
    assert scaling["1"] == 1.0 and scaling["2"] > 0


# -- images ----------------------------------------------------------------------------------


def test_openai_client_through_rays_proxy_gets_the_images_of_fewstep_serve(ray_service, pipe):
    client = openai.OpenAI(base_url=f"{ray_service.base}/v1", api_key=KEY, max_retries=0)
    request = dict(model="default", prompt=PROMPT, n=2, size="64x64", extra_body={"seed": 3})
    result = client.images.generate(response_format="b64_json", **request)
    reference = pipe(PROMPT, seed=[3, 4], num_images_per_prompt=2)
    unet_hash = (read_manifest(pipe.path) or {}).get("files", {}).get("unet/model.onnx")
    for i, (item, expected) in enumerate(zip(result.data, reference.images, strict=True)):
        image = decode_png(item.b64_json)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
        settings = {**reference.settings, "seed": 3 + i}
        assert image.text["parameters"] == a1111_parameters(
            PROMPT, "", settings, "default", unet_hash
        )
    with live_server(create_app({"default": pipe})) as local:  # `fewstep serve`, same bytes
        served = openai.OpenAI(base_url=f"{local}/v1", api_key="-", max_retries=0)
        expected_pngs = served.images.generate(response_format="b64_json", **request).data
    assert [d.b64_json for d in result.data] == [d.b64_json for d in expected_pngs]


def test_a1111_txt2img_through_rays_proxy(ray_service, pipe):
    body = {"prompt": PROMPT, "seed": 7, "batch_size": 2, "sampler_name": "Euler", "steps": 3}
    response = httpx.post(
        f"{ray_service.base}/sdapi/v1/txt2img", json=body, headers=AUTH, timeout=60
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    reference = pipe(
        PROMPT, seed=[7, 8], num_images_per_prompt=2, scheduler="euler", num_inference_steps=3
    )
    for b64, expected in zip(answer["images"], reference.images, strict=True):
        np.testing.assert_array_equal(
            np.asarray(decode_png(b64).convert("RGB")), np.asarray(expected)
        )
    assert answer["parameters"]["seed"] == 7 and '"all_seeds": [7, 8]' in answer["info"]


def test_concurrent_requests_spread_over_both_replicas_and_batch_in_each(ray_service, pipe):
    bodies = [{"prompt": f"a circle {i}", "seed": 100 + i} for i in range(16)]
    answers = asyncio.run(post_each_at_once(ray_service.base, GENERATIONS, bodies, AUTH))
    for body, answer in zip(bodies, answers, strict=True):
        assert answer.status == 200, answer.body[:200]
        served = np.asarray(decode_png(answer.json()["data"][0]["b64_json"]))
        np.testing.assert_array_equal(served, np.asarray(pipe(**body).images[0]))
    replicas = {answer.headers["x-fewstep-replica"] for answer in answers}
    assert len(replicas) == 2, replicas
    # Each replica's own /metrics (the proxy picks one per request): some call held more
    # than one request, so batching happens inside the replicas.
    batched: dict[str, bool] = {}
    for _ in range(40):
        metrics = httpx.get(f"{ray_service.base}/metrics", headers=AUTH, timeout=10)
        samples = {
            s.name: s.value
            for family in text_string_to_metric_families(metrics.text)
            for s in family.samples
            if s.name.startswith("fewstep_batch_requests_") and "le" not in s.labels
        }
        calls = samples.get("fewstep_batch_requests_count", 0)
        batched[metrics.headers["x-fewstep-replica"]] = calls < samples.get(
            "fewstep_batch_requests_sum", 0
        )
        if len(batched) == 2:
            break
    assert set(batched) == replicas and any(batched.values()), batched


# -- the rest of the app ---------------------------------------------------------------------


def test_health_ready_models_key_and_limits_are_the_apps(ray_service):
    base = ray_service.base
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}  # no key needed
    for path in ("/ready", "/v1/models", "/metrics", "/sdapi/v1/sd-models"):
        response = httpx.get(f"{base}{path}")
        assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
        assert httpx.get(f"{base}{path}", headers=AUTH).status_code == 200, path
    assert httpx.get(f"{base}/ready", headers=AUTH).json()["models"] == ["default"]
    assert post(base, {"prompt": "x" * (MAX_BODY_BYTES + 1)}).status_code == 413
    unknown = post(base, {"prompt": PROMPT, "colour": "red"})
    assert unknown.status_code == 400 and error_of(unknown)["param"] == "colour"
    missing = post(base, {"prompt": PROMPT, "model": "dall-e-3"})
    assert missing.status_code == 404 and error_of(missing)["code"] == "model_not_found"
    assert httpx.get(f"{base}/nope", headers=AUTH).status_code == 404


def test_rays_own_metrics_are_exported_beside_fewsteps(ray_service):
    assert post(ray_service.base, {"prompt": PROMPT, "seed": 1}).status_code == 200
    names: set[str] = set()
    deadline = time.monotonic() + 60  # Ray exports its metrics every few seconds
    while "ray_serve_num_http_requests_total" not in names:
        assert time.monotonic() < deadline, sorted(n for n in names if "serve" in n)
        time.sleep(1)
        text = httpx.get(f"http://127.0.0.1:{ray_service.metrics_port}/metrics", timeout=10).text
        names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    fewstep = httpx.get(f"{ray_service.base}/metrics", headers=AUTH, timeout=10).text
    assert "fewstep_requests_total" in fewstep and "ray_serve" not in fewstep


# -- faults ----------------------------------------------------------------------------------


def replica_pids() -> list[int]:
    """The processes of this module's replicas: descendants of this process (Ray's workers
    are its raylet's children) titled as Ray titles a replica of the app."""
    return [pid for pid in replica_pids_of_any_parent() if descends_from(pid, os.getpid())]


def replica_pids_of_any_parent() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(REPLICA_TITLE):
            pids.append(int(entry.name))
    return pids


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent, after the command's name
        if pid == ancestor:
            return True
    return False


@dataclasses.dataclass
class Load:
    sent: int = 0
    succeeded: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)  # 5xx or dropped: retried
    lost: int = 0  # no answer within the client's timeout
    wrong: int = 0  # a 200 whose image is not its seed's
    replicas: set[str] = dataclasses.field(default_factory=set)


async def load_with_retries(
    base: str, seeds: list[int], expected: dict[int, np.ndarray], on_success, attempts: int = 5
) -> Load:
    """Each seed's request sent by 4 clients until it succeeds (up to `attempts` each)."""
    load, queue = Load(), list(reversed(seeds))

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            seed = queue.pop()
            for _ in range(attempts):
                load.sent += 1
                try:
                    response = await http.post(GENERATIONS, json={"prompt": PROMPT, "seed": seed})
                except httpx.TimeoutException:
                    load.lost += 1
                    continue
                except httpx.TransportError as e:
                    response = None
                    load.failed.append(type(e).__name__)
                if response is not None and response.status_code == 200:
                    image = decode_png(response.json()["data"][0]["b64_json"])
                    load.wrong += not np.array_equal(np.asarray(image), expected[seed])
                    load.succeeded += 1
                    load.replicas.add(response.headers["x-fewstep-replica"])
                    on_success(load)
                    break
                if response is not None:
                    assert response.status_code >= 500, response.text
                    load.failed.append(f"{response.status_code} {response.text[:80]!r}")
                await asyncio.sleep(0.2)

    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=20) as http:
        await asyncio.gather(*(client(http) for _ in range(4)))
    return load


def test_killing_a_replica_during_load_loses_no_request_and_ray_replaces_it(ray_service, pipe):
    seeds = list(range(500, 540))
    expected = {s: np.asarray(pipe(PROMPT, seed=s).images[0]) for s in seeds}
    before = replica_pids()
    assert len(before) == 2 and replica_states() == {"RUNNING": 2}
    killed: dict = {}

    def kill_one_after_eight(load: Load) -> None:
        if load.succeeded == 8 and not killed:
            os.kill(before[0], signal.SIGKILL)
            killed.update(at=time.monotonic(), seen=set(load.replicas))

    load = asyncio.run(load_with_retries(ray_service.base, seeds, expected, kill_one_after_eight))
    deadline = time.monotonic() + 60
    while replica_states() != {"RUNNING": 2} or len(set(replica_pids()) - set(before)) != 1:
        assert time.monotonic() < deadline, replica_states()
        time.sleep(0.1)
    recovered_s = time.monotonic() - killed["at"]
    print(
        f"\nreplica killed: {load.sent} requests sent for {len(seeds)} images, "
        f"{load.succeeded} succeeded, {len(load.failed)} failed and were retried "
        f"{load.failed}, {load.lost} lost, {load.wrong} wrong images; "
        f"replaced in {recovered_s:.1f} s"
    )
    assert killed and load.succeeded == len(seeds)
    assert load.wrong == 0 and load.lost == 0
    after = [post(ray_service.base, {"prompt": PROMPT, "seed": s}) for s in range(20)]
    assert all(response.status_code == 200 for response in after)
    serving = {response.headers["x-fewstep-replica"] for response in after}
    assert len(serving) == 2 and serving - killed["seen"]  # the replacement answers too


# -- the application builder -----------------------------------------------------------------


def test_build_app_takes_settings_and_limits_and_refuses_unknown_args():
    settings = settings_from_args(
        {"models": {"scenes": "/m"}, "max_batch": 4, "max_steps": 9, "api_key": "k"}
    )
    assert settings.models == {"scenes": "/m"} and settings.max_batch == 4
    assert settings.limits.max_steps == 9 and settings.api_key == "k"
    with pytest.raises(ValueError, match=r"unknown args \['replicas'\]; accepted: \["):
        build_app({"replicas": 2})
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1, got 0"):
        build_app({"max_batch": 0})
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1, got 0"):
        build_app({"max_steps": 0})
    deployment = build_app({"max_batch": 4, "max_queue": 6})._bound_deployment
    assert deployment.name == DEPLOYMENT_NAME
    assert deployment._deployment_config.max_ongoing_requests == 10  # what the batcher holds


# -- a replica's start-up --------------------------------------------------------------------


class SlowWarmUp(Pipeline):
    """The default model, whose service warm-up takes `seconds` (a large model's would)."""

    def __init__(self, pipe: Pipeline, seconds: float):
        super().__init__(pipe.info, pipe.tokenizer, pipe.backend, pipe.path, pipe.limits)
        self.seconds = seconds

    def __call__(self, *args, **kwargs):
        if args == (WARM_UP_PROMPT,):
            time.sleep(self.seconds)
        return super().__call__(*args, **kwargs)


def test_a_replica_starts_only_once_its_service_is_ready_and_names_itself(pipe):
    from starlette.testclient import TestClient

    app = StartedWhenReady(create_app({"default": SlowWarmUp(pipe, 1.0)}), replica="r1")
    with TestClient(app) as client:  # returns when the ASGI start-up has completed
        ready = client.get("/ready")  # at once: what Ray does with a started replica
        assert ready.status_code == 200, ready.text
        assert ready.headers["x-fewstep-replica"] == "r1"
        assert client.get("/nope").headers["x-fewstep-replica"] == "r1"


def test_a_replica_whose_service_is_not_ready_in_time_fails_its_start_up(pipe):
    from starlette.testclient import TestClient

    app = StartedWhenReady(create_app({"default": SlowWarmUp(pipe, 1.0)}), "r1", timeout_s=0.1)
    with pytest.raises(RuntimeError, match="not ready within 0.1 s"), TestClient(app):
        pass


# -- the command -----------------------------------------------------------------------------


def test_cli_serve_ray_passes_its_flags_to_the_replicas(monkeypatch):
    import fewstep.serve.ray_app as ray_app
    from fewstep.cli import main

    served = {}
    monkeypatch.setattr(ray_app, "serve_on_ray", lambda *a, **k: served.update(args=a, kw=k))
    monkeypatch.setenv("FEWSTEP_API_KEY", "from-env")
    argv = ["serve", "--ray", "--replicas", "3", "--model", f"scenes={default_model()}"]
    argv += ["--max-batch", "4", "--max-queue", "5", "--max-steps", "12", "--port", "8123"]
    argv += ["--drain-timeout", "7", "--max-wait-ms", "20", "--request-timeout", "9"]
    argv += ["--backend", "openvino", "--precision", "bf16"]
    assert main(argv) == 0
    settings, replicas = served["args"]
    assert replicas == 3 and served["kw"] == {
        "host": "127.0.0.1",
        "port": 8123,
        "drain_timeout": 7.0,
    }
    assert settings.models == {"scenes": str(default_model())}
    assert settings.api_key == "from-env" and settings.limits.max_steps == 12
    assert (settings.max_batch, settings.max_queue, settings.max_wait_ms) == (4, 5, 20.0)
    assert settings.request_timeout == 9.0 and settings.backend == "openvino"
    assert settings.backend_options == {"precision": "bf16"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--replicas", "2"], "--replicas needs --ray, got --replicas 2 alone"),
        (["--ray", "--replicas", "0"], "--replicas must be an integer >= 1, got 0"),
    ],
)
def test_cli_serve_refuses_bad_replica_flags(argv, message, capsys):
    from fewstep.cli import main

    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_serve_ray_without_the_extra_names_it(monkeypatch, capsys):
    import sys

    from fewstep.cli import main

    monkeypatch.setitem(sys.modules, "fewstep.serve.ray_app", None)  # as if ray were missing
    assert main(["serve", "--ray"]) == 2
    assert "pip install 'fewstep[ray]'" in capsys.readouterr().err


def test_the_documented_serve_config_is_rays_schema_and_builds():
    yaml = pytest.importorskip("yaml")
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[1] / "docs" / "serve-ray.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    [app] = config.applications
    assert app.import_path == "fewstep.serve.ray_app:build_app"
    [deployment] = app.deployments
    assert deployment.name == DEPLOYMENT_NAME  # the name its options override
    assert build_app(app.args)._bound_deployment.name == DEPLOYMENT_NAME
    settings = settings_from_args(app.args)
    assert deployment.max_ongoing_requests == settings.max_batch + settings.max_queue


# -- LoRA variants, multiplexed ----------------------------------------------------------------


def write_lora(path: Path) -> Path:
    """A kohya LoRA on the default model's first four 2-D U-Net weights."""
    from safetensors.numpy import save_file

    from fewstep.lora.onnx_package import package_graph_weights

    shapes = package_graph_weights(default_model())["unet"].shapes()
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in [(n, s) for n, s in shapes.items() if len(s) == 2][:4]:
        module = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
        down = rng.standard_normal((2, shape[1])).astype(np.float32) * 0.1
        tensors[f"{module}.lora_down.weight"] = down
        tensors[f"{module}.lora_up.weight"] = rng.standard_normal((shape[0], 2)).astype(np.float32)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def lora_app(ray_service, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "style.safetensors")
    settings = ServeSettings(lora_dir=str(folder), max_variants=1)
    app = application(settings, num_replicas=1, ray_actor_options={"num_cpus": 0})
    serve.run(app, name="fewstep-lora", route_prefix="/lora")
    try:
        yield f"{ray_service.base}/lora", folder
    finally:
        serve.delete("fewstep-lora")


def image_of(response: httpx.Response, key: str = "b64_json") -> np.ndarray:
    assert response.status_code == 200, response.text
    answer = response.json()
    b64 = answer["data"][0][key] if "data" in answer else answer["images"][0]
    return np.asarray(decode_png(b64).convert("RGB"))


def stage_seconds(base: str) -> dict[tuple[str, str], tuple[float, float]]:
    """fewstep_stage_seconds as {(model, stage): (count, sum)}."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    found: dict[tuple[str, str], list[float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("fewstep_stage_seconds_count", "fewstep_stage_seconds_sum"):
                key = (s.labels["model"], s.labels["stage"])
                found.setdefault(key, [0.0, 0.0])[s.name.endswith("_sum")] = s.value
    return {key: (count, total) for key, (count, total) in found.items()}


def test_loras_in_the_prompt_or_the_field_are_served_by_a_folded_variant(lora_app, pipe):
    base, folder = lora_app
    style = str(folder / "style.safetensors")
    folded = Pipeline.from_pretrained(default_model(), loras=[(style, 0.8)])
    expected = np.asarray(folded(PROMPT, seed=5).images[0])
    assert not np.array_equal(expected, np.asarray(pipe(PROMPT, seed=5).images[0]))
    tagged = post(base, {"prompt": f"{PROMPT}<lora:style:0.8>", "seed": 5})
    np.testing.assert_array_equal(image_of(tagged), expected)
    assert tagged.headers["x-fewstep-variant"] == "default+style:0.8"
    field = post(base, {"prompt": PROMPT, "loras": {"style": 0.8}, "seed": 5})
    np.testing.assert_array_equal(image_of(field), expected)
    a1111 = httpx.post(
        f"{base}/sdapi/v1/txt2img", json={"prompt": f"<lora:style:0.8>{PROMPT}", "seed": 5}
    )
    np.testing.assert_array_equal(image_of(a1111), expected)
    plain = post(base, {"prompt": PROMPT, "seed": 5})  # no LoRA: the model itself
    np.testing.assert_array_equal(image_of(plain), np.asarray(pipe(PROMPT, seed=5).images[0]))
    assert "x-fewstep-variant" not in plain.headers
    models = [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
    assert models == ["default", "default+style:0.8"]


def test_at_most_max_variants_stay_folded_and_the_costs_are_measured(lora_app):
    base, _ = lora_app
    for scale in (0.8, 0.5, 0.8):  # max_variants=1: each one unloads the one before
        answer = post(base, {"prompt": PROMPT, "loras": {"style": scale}, "seed": 1})
        assert answer.headers["x-fewstep-variant"] == f"default+style:{scale:g}"
        models = [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
        assert models == ["default", f"default+style:{scale:g}"]
    stages = stage_seconds(base)
    fold, unfold = stages[("default+style:0.5", "fold")], stages[("default+style:0.5", "unfold")]
    assert fold[0] == 1 and unfold[0] == 1
    print(f"\nLoRA variant of the default model: fold {fold[1]:.3f} s, unfold {unfold[1]:.3f} s")


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ({"prompt": "<lora:nope:1>"}, 404, "prompt", "LoRA 'nope' is not served"),
        ({"prompt": "x", "loras": {"nope": 1}}, 404, "loras", "LoRA 'nope' is not served"),
        ({"prompt": "<lora:style:x>"}, 400, "prompt", "the scale must be a number"),
        ({"prompt": "<lora:style:0.5:1>"}, 400, "prompt", "takes one scale"),
        ({"prompt": "<lora:../style:1>"}, 400, "prompt", "no path"),
        ({"prompt": "<lora:style:99>"}, 400, "prompt", "within ±10"),
        ({"prompt": "<lora:style><lora:style:2>"}, 400, "prompt", "['style'] twice"),
        ({"prompt": "x", "loras": ["style"]}, 400, "loras", "loras must be"),
        ({"prompt": "<lora:style>", "model": "other"}, 404, "model", "is not served"),
    ],
)
def test_bad_lora_requests_are_refused_naming_the_field(lora_app, body, status, param, words):
    response = post(lora_app[0], body)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["param"] == param and words in error["message"], error
