"""The HTTP service under load and at its edges, on live servers on 127.0.0.1: concurrent
clients get their own images while batches form, a full queue answers 429 at once, requests
past their timeout or whose client left are dropped, and SIGTERM drains before exit 0.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serving import (  # noqa: E402
    GatedPipeline,
    decode_png,
    error_of,
    live_server,
)

from fewstep.benchmarks.http_load import post_each_at_once  # noqa: E402
from fewstep.benchmarks.served import served_process, status_of  # noqa: E402
from fewstep.pipeline import Pipeline  # noqa: E402
from fewstep.serve import create_app  # noqa: E402

GENERATIONS = "/v1/images/generations"


def metric_samples(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def post_all(base: str, bodies: list[dict]) -> list[tuple]:
    """Every body POSTed at once, each on its own connection; (status, json, seconds) each."""
    answers = asyncio.run(post_each_at_once(base, GENERATIONS, bodies))
    return [(a.status, a.json(), a.seconds) for a in answers]


def test_16_concurrent_clients_get_their_own_images_and_batches_form(pipe):
    bodies = [
        {"prompt": f"a {colour} circle on a white background", "seed": 1000 + 7 * i, "n": 1}
        for i, colour in enumerate(["red", "green", "blue", "yellow"] * 4)
    ]
    with live_server(create_app({"default": pipe}, max_batch=8, max_wait_ms=50)) as base:
        answers = post_all(base, bodies)
        samples = metric_samples(base)
    for body, (status, answer, _) in zip(bodies, answers, strict=True):
        assert status == 200, answer
        served = np.asarray(decode_png(answer["data"][0]["b64_json"]))
        alone = np.asarray(pipe(body["prompt"], seed=body["seed"]).images[0])
        np.testing.assert_array_equal(served, alone)  # bit-identical: measured so
    labels = (("le", "1.0"), ("model", "default"))
    single_calls = samples[("fewstep_batch_requests_bucket", labels)]
    calls = samples[("fewstep_batch_requests_count", (("model", "default"),))]
    assert samples[("fewstep_batch_requests_sum", (("model", "default"),))] == 16
    assert single_calls < calls  # some call held more than one request
    ok = (("endpoint", GENERATIONS), ("status", "200"))
    assert samples[("fewstep_requests_total", ok)] == 16
    for stage, count in (("queue", calls), ("pipeline", calls), ("encode", 16)):
        labels = (("model", "default"), ("stage", stage))
        assert samples[("fewstep_stage_seconds_count", labels)] == count


def test_a_full_queue_answers_429_at_once_and_every_accepted_request_completes(tmp_path):
    args = ["--max-batch", "4", "--max-wait-ms", "10", "--max-queue", "4"]
    bodies = [{"prompt": f"a circle {i}", "seed": i, "num_inference_steps": 8} for i in range(40)]
    with served_process(args, tmp_path / "server.log") as (base, _):
        answers = post_all(base, bodies)
        assert metric_samples(base)[("fewstep_queue_depth", (("model", "default"),))] == 0
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0
    for status, answer, seconds in answers:
        if status == 429:
            assert answer["error"]["code"] == "queue_full"
            assert seconds < 0.05, f"a 429 took {seconds * 1e3:.0f} ms"
        else:
            assert len(answer["data"]) == 1


def test_past_the_timeout_a_request_gets_504_and_queued_work_is_dropped(pipe):
    gated = GatedPipeline(pipe)
    app = create_app({"default": gated}, max_batch=1, max_wait_ms=0, request_timeout=0.5)
    with live_server(app) as base:
        results: dict[str, httpx.Response] = {}

        def send(name: str) -> None:
            results[name] = httpx.post(
                f"{base}{GENERATIONS}", json={"prompt": name, "seed": 1}, timeout=30
            )

        running = threading.Thread(target=send, args=("running",))
        running.start()
        assert gated.entered.wait(10)
        queued = threading.Thread(target=send, args=("queued",))
        queued.start()
        running.join(10)
        queued.join(10)
        gated.gate.set()
        for name in ("running", "queued"):
            assert results[name].status_code == 504
            assert "request timeout of 0.5 s" in error_of(results[name])["message"]
        # the running call finishes; the queued one never starts
        assert app.state.fewstep.drain(timeout=10)
        assert gated.calls == [["running"]]


def test_a_client_that_disconnects_has_its_queued_work_dropped(pipe):
    gated = GatedPipeline(pipe)
    app = create_app({"default": gated}, max_batch=1, max_wait_ms=0)
    with live_server(app) as base:
        running = threading.Thread(
            target=httpx.post,
            args=(f"{base}{GENERATIONS}",),
            kwargs={"json": {"prompt": "running", "seed": 1}, "timeout": 30},
        )
        running.start()
        assert gated.entered.wait(10)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{base}{GENERATIONS}", json={"prompt": "gone", "seed": 2}, timeout=0.5)
        batcher = app.state.fewstep.batchers["default"]
        deadline = time.monotonic() + 5
        while batcher.queued() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.queued() == 0  # dropped on disconnect, before the gate opens
        gated.gate.set()
        running.join(10)
        assert app.state.fewstep.drain(timeout=10)
        assert gated.calls == [["running"]]


def test_sigterm_finishes_the_requests_in_flight_refuses_new_ones_and_exits_0(tmp_path):
    log = tmp_path / "server.log"
    args = ["--max-batch", "4", "--drain-timeout", "60"]
    bodies = [
        {"prompt": f"a circle {i}", "seed": i, "n": 2, "num_inference_steps": 40} for i in range(6)
    ]
    in_flight: list = []
    with served_process(args, log) as (base, server):
        load = threading.Thread(target=lambda: in_flight.extend(post_all(base, bodies)))
        load.start()
        time.sleep(0.5)  # every request queued or running
        server.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert status_of(f"{base}/ready") == 503
        late = httpx.post(f"{base}{GENERATIONS}", json={"prompt": "late", "seed": 1}, timeout=10)
        assert late.status_code == 503 and error_of(late)["code"] == "shutting_down"
        load.join(120)
        assert [status for status, _, _ in in_flight] == [200] * len(bodies)
        assert all(len(answer["data"]) == 2 for _, answer, _ in in_flight)
        assert server.wait(60) == 0
    assert "drained in" in log.read_text()


def test_metrics_text_is_prometheus_and_unknown_paths_share_one_label(pipe):
    with live_server(create_app({"default": pipe})) as base:
        for path in ("/nope", "/nope/again", "/v1/images/generations/x"):
            assert httpx.get(f"{base}{path}", timeout=10).status_code == 404
        samples = metric_samples(base)
    other = (("endpoint", "other"), ("status", "404"))
    assert samples[("fewstep_requests_total", other)] == 3
    assert not any(("endpoint", "/nope") in labels for _, labels in samples)


class FailingPipeline(Pipeline):
    """The default model's pipeline, failing every call with a prompt containing "boom"."""

    def __init__(self, pipe: Pipeline):
        super().__init__(pipe.info, pipe.tokenizer, pipe.backend, pipe.path, pipe.limits)

    def __call__(self, *args, **kwargs):
        if any("boom" in p for p in kwargs.get("prompt", [])):
            raise RuntimeError("the U-Net fell over")
        return super().__call__(*args, **kwargs)


def test_a_failing_batch_answers_500_with_a_logged_id_and_the_next_batch_runs(pipe, caplog):
    app = create_app({"default": FailingPipeline(pipe)})
    with live_server(app) as base:
        failed = httpx.post(f"{base}{GENERATIONS}", json={"prompt": "boom", "seed": 1}, timeout=30)
        after = httpx.post(
            f"{base}{GENERATIONS}", json={"prompt": "a circle", "seed": 1}, timeout=30
        )
    assert failed.status_code == 500
    error = error_of(failed)
    assert error["type"] == "server_error" and "the U-Net fell over" not in error["message"]
    error_id = error["message"].removeprefix("internal error (id ").removesuffix(")")
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert len(logged) == 1 and "the U-Net fell over" in str(logged[0].exc_info[1])
    assert after.status_code == 200 and len(after.json()["data"]) == 1
