"""The HTTP service under load: dynamic batching against one image per call, and the service's
overhead per request against calling `Pipeline` directly.

Each case starts a fresh `fewstep serve` (the bundled default model unless `--model`) in its
own process, warms it with one request per client, then runs a closed loop on loopback:
`concurrency` clients, each sending its next request when its last is answered, until
`--requests` are answered or `--time-limit` seconds have passed. Cases: every concurrency with
`--max-batch` (batching) and with `--max-batch 1`, in the same run. Reported per case: images/s
over the loop's wall time, latency p50/p99, the statuses, and the batch-size histogram (images
per pipeline call, from the service's /metrics, warm-up calls excluded).

Overhead: at concurrency 1, the served p50 minus the p50 of the same request as a direct
`Pipeline` call in this process (measured before any server starts, so nothing competes for
the cores). The served path also encodes a PNG and base64s it; `png_encode_ms` says how much of
the overhead that is.

On Ray Serve (`--ray`, the ray extra): the same closed loop against `fewstep serve --ray` with
one and with two replicas (each given its share of the machine's cores), batching on, in the
same run; the batch histogram sums every replica's /metrics. `replica_scaling_images_per_s`
is two replicas' images/s over one's, per concurrency.

Limits: one machine, so the load client shares the CPU with the service (it is a lean asyncio
client, fewstep.benchmarks.http_load, to keep its share small); loopback only. Ray's
processes (its controller, proxy and agents) share the same cores as the replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.benchmarks.harness import cpu_name, git_commit, library_versions, write_json
from fewstep.benchmarks.http_load import Connection, post_closed_loop
from fewstep.benchmarks.served import served_process

GENERATIONS = "/v1/images/generations"
LIBRARIES = ("onnxruntime", "starlette", "uvicorn", "numpy")
PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow star")


def bodies(count: int, first_seed: int) -> list[dict[str, Any]]:
    return [
        {"prompt": PROMPTS[i % len(PROMPTS)], "seed": first_seed + i, "n": 1} for i in range(count)
    ]


def latency_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


async def _metrics_text(base: str) -> str:
    return (await _metrics_answer(base)).body.decode()


async def _metrics_answer(base: str) -> Any:
    connection = await Connection.open(base)
    try:
        return await connection.request("GET", "/metrics")
    finally:
        await connection.close()


def replicas_histogram(base: str, replicas: int, tries: int = 200) -> dict[int, int]:
    """`batch_histogram` summed over `replicas` replicas behind Ray's proxy: /metrics is
    asked until each replica (its `X-Fewstep-Replica`) has answered once."""
    histograms: dict[str, dict[int, int]] = {}
    for _ in range(tries):
        answer = asyncio.run(_metrics_answer(base))
        histograms[answer.headers["x-fewstep-replica"]] = batch_histogram(answer.body.decode())
        if len(histograms) == replicas:
            break
    if len(histograms) != replicas:
        raise RuntimeError(f"/metrics reached {len(histograms)} of {replicas} replicas")
    total: dict[int, int] = {}
    for histogram in histograms.values():
        for size, calls in histogram.items():
            total[size] = total.get(size, 0) + calls
    return total


@contextlib.contextmanager
def served_on_ray(args: list[str], log: Path) -> Iterator[tuple[str, Any]]:
    """`fewstep serve --ray <args>`, stopped with SIGTERM at the end, so that it stops the
    Ray cluster it started (a killed one would leave Ray's processes behind). Its proxy's port
    is one the OS found free, held until the proxy binds it (ray_app.proxy_port), and read
    from the server's log (served.py): Ray's own processes bind ports as the cluster starts."""
    with served_process(["--ray", *args], log, ready_timeout_s=300) as (base, server):
        try:
            yield base, server
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(180)


def batch_histogram(metrics_text: str) -> dict[int, int]:
    """Pipeline calls by images per call, from fewstep_batch_images' cumulative buckets (one
    bucket per size up to 16; beyond, a size stands for the sizes down to the bucket below)."""
    from prometheus_client.parser import text_string_to_metric_families

    cumulative = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "fewstep_batch_images_bucket" and sample.labels["le"] != "+Inf":
                cumulative[int(float(sample.labels["le"]))] = int(sample.value)
    counts, below = {}, 0
    for size in sorted(cumulative):
        counts[size], below = cumulative[size] - below, cumulative[size]
    return counts


def run_case(
    model_args: list[str],
    max_batch: int,
    concurrency: int,
    requests: int,
    time_limit_s: float,
    log: Path,
    ray_replicas: int | None = None,
) -> dict[str, Any]:
    """One case; with `ray_replicas`, on that many replicas of `fewstep serve --ray`."""
    args = [*model_args, "--max-batch", str(max_batch), "--max-queue", str(4 * concurrency + 4)]
    if ray_replicas is None:
        served, histogram_of = served_process(args, log), batch_histogram_of
    else:
        served = served_on_ray([*args, "--replicas", str(ray_replicas)], log)

        def histogram_of(base: str) -> dict[int, int]:
            return replicas_histogram(base, ray_replicas)

    with served as (base, _):
        warm = asyncio.run(
            post_closed_loop(base, GENERATIONS, bodies(concurrency, 10**6), concurrency, 60)
        )
        before = histogram_of(base)
        started = time.perf_counter()
        answers = asyncio.run(
            post_closed_loop(base, GENERATIONS, bodies(requests, 0), concurrency, time_limit_s)
        )
        wall = time.perf_counter() - started
        after = histogram_of(base)
    statuses: dict[str, int] = {}
    for answer in answers:
        statuses[str(answer.status)] = statuses.get(str(answer.status), 0) + 1
    images = sum(len(a.json()["data"]) for a in answers if a.status == 200)
    histogram = {str(k): after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0)}
    return {
        **({} if ray_replicas is None else {"replicas": ray_replicas}),
        "max_batch": max_batch,
        "concurrency": concurrency,
        "requests": len(answers),
        "warm_up_requests": len(warm),
        "statuses": statuses,
        "wall_s": wall,
        "images_per_s": images / wall,
        "latency_ms": latency_ms([a.seconds for a in answers]),
        "batch_images_histogram": histogram,
    }


def batch_histogram_of(base: str) -> dict[int, int]:
    return batch_histogram(asyncio.run(_metrics_text(base)))


def direct_ms(model: Path | None, repeats: int) -> dict[str, float]:
    """p50 of the same request as a direct Pipeline call, and of its PNG encoding."""
    from fewstep.image_files import encode_image
    from fewstep.package import default_model
    from fewstep.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model or default_model())
    pipe(PROMPTS[0], seed=0, output_type="pil")  # warm-up, as the service's
    calls, encodes = [], []
    for i in range(repeats):
        started = time.perf_counter()
        image = pipe(PROMPTS[i % len(PROMPTS)], seed=i, output_type="pil").images[0]
        calls.append(time.perf_counter() - started)
        started = time.perf_counter()
        buffer = io.BytesIO()
        encode_image(image, "PNG", "parameters", buffer)
        base64.b64encode(buffer.getvalue())
        encodes.append(time.perf_counter() - started)
    return {
        "pipeline_p50": float(np.median(calls) * 1e3),
        "png_encode_p50": float(np.median(encodes) * 1e3),
    }


def run_bench(
    model: Path | None,
    concurrencies: list[int],
    max_batch: int,
    requests: int,
    time_limit_s: float,
    workdir: Path,
) -> dict[str, Any]:
    model_args = ["--model", f"default={model}"] if model else []
    direct = direct_ms(model, repeats=max(8, requests // 2))
    cases = [
        run_case(model_args, batch, c, requests, time_limit_s, workdir / f"serve-{batch}-{c}.log")
        for c in concurrencies
        for batch in (max_batch, 1)
    ]

    def case(batch: int, c: int) -> dict[str, Any]:
        return next(x for x in cases if x["max_batch"] == batch and x["concurrency"] == c)

    speedup = {
        str(c): case(max_batch, c)["images_per_s"] / case(1, c)["images_per_s"]
        for c in concurrencies
    }
    overhead = None
    if 1 in concurrencies:
        overhead = {
            f"max_batch_{batch}": case(batch, 1)["latency_ms"]["p50"] - direct["pipeline_p50"]
            for batch in (max_batch, 1)
        }
    return {
        "what": (
            "fewstep serve under a closed loop of n=1 requests on loopback: batching "
            f"(--max-batch {max_batch}) vs --max-batch 1; images/s over the loop's wall time, "
            "latency from request to last byte"
        ),
        "where": {
            "device": cpu_name(),
            "versions": library_versions(LIBRARIES),
            "commit": git_commit(),
        },
        "model": str(model) if model else "the bundled default model",
        "requests_per_case": requests,
        "time_limit_s": time_limit_s,
        "direct_ms": direct,
        "overhead_ms_at_concurrency_1": overhead,
        "batching_speedup_images_per_s": speedup,
        "cases": cases,
    }


def run_ray_bench(
    model: Path | None,
    concurrencies: list[int],
    max_batch: int,
    requests: int,
    time_limit_s: float,
    workdir: Path,
    replicas: tuple[int, ...] = (1, 2),
) -> dict[str, Any]:
    """The closed loop against `fewstep serve --ray` with each count of `replicas`."""
    model_args = ["--model", f"default={model}"] if model else []
    cases = [
        run_case(
            model_args,
            max_batch,
            c,
            requests,
            time_limit_s,
            workdir / f"serve-ray-{r}-{c}.log",
            ray_replicas=r,
        )
        for c in concurrencies
        for r in replicas
    ]

    def images_per_s(r: int, c: int) -> float:
        return float(
            next(x for x in cases if x["replicas"] == r and x["concurrency"] == c)["images_per_s"]
        )

    scaling = {
        str(c): {str(r): images_per_s(r, c) / images_per_s(replicas[0], c) for r in replicas}
        for c in concurrencies
    }
    return {
        "what": (
            "fewstep serve --ray under a closed loop of n=1 requests on loopback, through Ray's "
            f"HTTP proxy: {', '.join(map(str, replicas))} replicas, --max-batch {max_batch}; "
            "images/s over the loop's wall time, latency from request to last byte"
        ),
        "where": {
            "device": cpu_name(),
            "cpus": os.cpu_count(),
            "versions": library_versions((*LIBRARIES, "ray")),
            "commit": git_commit(),
        },
        "model": str(model) if model else "the bundled default model",
        "requests_per_case": requests,
        "time_limit_s": time_limit_s,
        "replica_scaling_images_per_s": scaling,
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model package (default: the bundled one)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64, help="per case")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--output", default=None, help="JSON file for the results")
    parser.add_argument(
        "--ray",
        action="store_true",
        help="instead: fewstep serve --ray with 1 and 2 replicas (--replicas to change)",
    )
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="with --ray")
    args = parser.parse_args(argv)
    bench_args = (
        Path(args.model) if args.model else None,
        args.concurrency,
        args.max_batch,
        args.requests,
        args.time_limit,
    )
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as workdir:
        if args.ray:
            results = run_ray_bench(*bench_args, Path(workdir), replicas=tuple(args.replicas))
        else:
            results = run_bench(*bench_args, Path(workdir))
    print(json.dumps(results, indent=2))
    if args.output:
        write_json(Path(args.output), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
