"""benchmarks/serve_bench.py at a small size: every case answers every request, and its
batch histogram accounts for exactly its timed requests (warm-up excluded). And the launcher
of its servers (benchmarks/served.py): the address served is the one the server reports."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from fewstep.benchmarks.serve_bench import run_bench  # noqa: E402
from fewstep.benchmarks.served import served_address, served_process, status_of  # noqa: E402


@pytest.mark.parametrize(
    "log, address",
    [
        (
            "INFO:     Started server process [7]\n"
            "INFO:     Uvicorn running on http://127.0.0.1:41237 (Press CTRL+C to quit)\n",
            "http://127.0.0.1:41237",
        ),
        (
            "Started a local Ray instance. View the dashboard at http://127.0.0.1:8265\n"
            "serving 2 replica(s) on http://127.0.0.1:40111/\n",
            "http://127.0.0.1:40111",
        ),
        (
            "INFO:     Uvicorn running on http://[::1]:8000 (Press CTRL+C to quit)",
            "http://[::1]:8000",
        ),
        ("View the dashboard at http://127.0.0.1:8265\nWaiting for application startup.", None),
        ("", None),
    ],
)
def test_the_served_address_is_the_one_the_servers_log_names(log, address):
    assert served_address(log) == address


def test_served_process_serves_the_port_the_server_bound_and_named(tmp_path):
    log = tmp_path / "server.log"
    with served_process(["--max-batch", "1"], log) as (base, server):
        assert server.args[server.args.index("--port") + 1] == "0"  # no port picked in advance
        port = urlsplit(base).port
        assert port and f"Uvicorn running on http://127.0.0.1:{port} " in log.read_text()
        probe = uuid.uuid4().hex  # the server that answers is the one started: it logs the probe
        assert status_of(f"{base}/ready?probe={probe}") == 200
        server.terminate()
        server.wait(60)
    assert f"/ready?probe={probe} HTTP/1.1" in log.read_text()


def test_serve_bench_small(tmp_path):
    results = run_bench(None, [1, 3], max_batch=4, requests=6, time_limit_s=60, workdir=tmp_path)
    assert [(c["max_batch"], c["concurrency"]) for c in results["cases"]] == [
        (4, 1),
        (1, 1),
        (4, 3),
        (1, 3),
    ]
    for case in results["cases"]:
        assert case["statuses"] == {"200": 6} and case["requests"] == 6
        histogram = {int(k): v for k, v in case["batch_images_histogram"].items()}
        assert sum(size * calls for size, calls in histogram.items()) == 6  # n=1 each
        assert max(histogram) <= case["max_batch"]
        assert case["images_per_s"] > 0 and case["latency_ms"]["p99"] >= case["latency_ms"]["p50"]
    assert set(results["batching_speedup_images_per_s"]) == {"1", "3"}
    assert set(results["overhead_ms_at_concurrency_1"]) == {"max_batch_4", "max_batch_1"}
    assert results["direct_ms"]["pipeline_p50"] > 0
