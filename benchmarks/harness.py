"""What every benchmark of fewstep shares: where it ran, how it is timed, how it is written.

- where: `cpu_name()`, `cuda_card(device)`, `library_versions(names)`, `git_commit()`
  (FEWSTEP_COMMIT, where set, names the commit: a copy of the tree sent to another machine may
  carry an older .git);
- statistics: `percentiles(values)`: p50, p90 and the count;
- timing, in milliseconds: `wall_ms` (host clock, per call), `time_ms` (the first call apart,
  then CUDA events on a GPU), `time_ms_and_memory` (that and the peak memory on a GPU),
  `graphed_ms` and `device_ms` (device time inside a CUDA graph, what the runtime's graphs
  see), `profile_by_kernel` (where a call's time goes, kernel by kernel);
- memory: `free_memory()` between cases, so one case's tensors do not crowd the next;
- output: `write_json(path, results)`.

Limits: numpy and the standard library at import; torch only inside the helpers that time a
device, so a worker process that measures a side's own memory and start-up loads nothing more.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

# -- the checkout's training/ ----------------------------------------------------------------


def import_training(repo: Path) -> ModuleType:
    """The checkout's `training` package (the scenes dataset and analyzer; not installed),
    imported by its path. Putting the checkout's root on sys.path instead would also make its
    kernels/, export/ and benchmarks/ folders importable as top-level packages, shadowing
    names other libraries probe for (transformers looks for a `kernels` package)."""
    if "training" in sys.modules:
        return sys.modules["training"]
    folder = Path(repo) / "training"
    spec = importlib.util.spec_from_file_location(
        "training", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None, folder
    module = importlib.util.module_from_spec(spec)
    sys.modules["training"] = module
    spec.loader.exec_module(module)
    return module


# -- where it ran ----------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model and core count, e.g. "AMD EPYC 7B13 (2 cores)"."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def cuda_card(device: Any) -> dict[str, Any]:
    """Name, compute capability, multiprocessors, memory and driver of a CUDA device."""
    import torch

    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gb": round(props.total_memory / 2**30, 1),
        "driver": _nvidia_driver(),
    }


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def library_versions(names: Iterable[str], cuda: bool = False) -> dict[str, str]:
    """Python's version and each installed distribution of `names` (missing ones left out);
    `cuda`: also the CUDA version torch was built with."""
    out = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    if cuda:
        import torch

        out["cuda"] = str(torch.version.cuda)
    return out


def git_commit(cwd: Path | None = None) -> str | None:
    """FEWSTEP_COMMIT where set, else the short HEAD of the checkout at `cwd` (default: the
    working directory); None outside a checkout."""
    if os.environ.get("FEWSTEP_COMMIT"):
        return os.environ["FEWSTEP_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=cwd,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# -- statistics and timing -------------------------------------------------------------------


def percentiles(values: Iterable[float]) -> dict[str, float]:
    """p50 and p90 (linear interpolation) and the number of values."""
    arr = np.asarray(list(values), dtype=np.float64)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "n": len(arr),
    }


def wall_ms(
    fn: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None
) -> dict[str, float]:
    """Host wall-clock ms per call of `fn`, percentiles over `repeats` calls; `setup` runs
    before each call, untimed."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return percentiles(times)


def time_ms(fn: Callable[[], Any], warmup: int, repeats: int, device: Any) -> dict:
    """First-call time (Triton compiles then), then p50/p90 of `repeats` calls after `warmup`
    more, in ms: CUDA events on a CUDA `device` (a torch.device), the host clock elsewhere."""
    cuda = device.type == "cuda"
    if cuda:
        import torch

        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        fn()
    if not cuda:
        return {"first_call_ms": first_ms, **wall_ms(fn, repeats)}
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(repeats)
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return {"first_call_ms": first_ms, **percentiles(s.elapsed_time(e) for s, e in events)}


def graphed_ms(fn: Callable[[], Any], device: Any, repeats: int, calls: int = 20) -> float:
    """Device time per call: `calls` calls captured in one CUDA graph, p50 of `repeats` replays.

    Eager timings of a small kernel measure its host-side launch (Python, the custom op's
    dispatch, Triton's launcher) as much as the kernel; inside the runtime's CUDA graphs
    only the device time is left, and this measures that."""
    import torch

    from fewstep.cuda_graphs import capture

    with torch.cuda.device(device):
        # two warm-ups: compiles, autotunes, picks algorithms; nothing of that in a capture
        graph = capture(fn, calls=calls, warmup=2).graph
        t = time_ms(graph.replay, 3, repeats, device)
        del graph
    return t["p50"] / calls


def device_ms(fn: Callable[[], Any], device: Any, warmup: int, repeats: int) -> float:
    """A call's time as the runtime sees it: device time in a CUDA graph on a GPU; on the
    CPU, p50 of eager calls (interpreted kernels: the code path only)."""
    if device.type == "cuda":
        return graphed_ms(fn, device, repeats)
    return time_ms(fn, warmup, repeats, device)["p50"]


def time_ms_and_memory(fn: Callable[[], Any], warmup: int, repeats: int, device: Any) -> dict:
    """time_ms (first call, then p50/p90 over `repeats` after `warmup` calls) and, on a
    GPU, the peak memory allocated meanwhile."""
    if device.type != "cuda":
        return time_ms(fn, warmup, repeats, device)
    import torch

    torch.cuda.reset_peak_memory_stats(device)
    result = time_ms(fn, warmup, repeats, device)
    result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def profile_by_kernel(fn: Callable[[], Any], device: Any, calls: int = 3, n: int = 20) -> dict:
    """Device time per call by kernel (CPU time by op without a GPU), the largest first."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind and getattr(e, attr) > 0]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total_us = sum(getattr(e, attr) for e in events)
    top = [
        {
            "name": e.key[:160],
            "ms_per_call": getattr(e, attr) / 1e3 / calls,
            "share": getattr(e, attr) / total_us,
            "launches_per_call": e.count / calls,
        }
        for e in events[:n]
    ]
    return {"time": "device" if cuda else "cpu", "ms_per_call": total_us / 1e3 / calls, "top": top}


# -- memory ----------------------------------------------------------------------------------


def free_memory() -> None:
    """Collect garbage and return torch's cached GPU memory (where torch is loaded)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- output ----------------------------------------------------------------------------------


def write_json(path: Path, results: dict[str, Any]) -> Path:
    """`results` as indented JSON at `path` (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
