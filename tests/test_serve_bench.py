"""benchmarks/serve_bench.py at a small size: every case answers every request, and its
batch histogram accounts for exactly its timed requests (warm-up excluded)."""

from __future__ import annotations

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from fewstep.benchmarks.serve_bench import run_bench  # noqa: E402


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
