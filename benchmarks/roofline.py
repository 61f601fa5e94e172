"""This machine's limits, measured: the roofline a CPU benchmark's achieved TFLOP/s is read against.

CPUs of one cloud machine type differ (one has AMX, the next only AVX-512), so a CPU timing
means something only beside the limits of the CPU it ran on, measured in the same run:

- matmul throughput per number format, an n × n × n product (2n³ operations), best of a few
  timed calls after a warm-up, by each library that runs fewstep's graphs or its baseline:
  torch (fp32, bf16; int8 through `torch._int_mm`) and OpenVINO (fp32, bf16, and int8: a
  MatMul between QuantizeLinear/DequantizeLinear pairs, which OpenVINO runs as an int8
  product). OpenVINO's compiled graph is checked to run the product in the format asked
  (bf16 on a CPU without it would run f32). `peak_tflops` is each format's best over the
  libraries.
- memory bandwidth: a copy of a 1 GiB array, a slice per core (bytes read plus bytes written
  per second).
- the CPU's model, core count and the instruction-set flags that decide those rates (AMX,
  AVX-512 bf16 / VNNI).

Every figure uses all the cores the process may use, as the benchmarks' sides do. A library
this machine lacks, or a format a library would run as another, is left out (recorded as
skipped). torch's bf16 and int8 products run on any CPU, slowly where it lacks them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.benchmarks.harness import cpu_name

FORMATS = ("fp32", "bf16", "int8")
# What decides CPU matmul rates: AMX tiles, AVX-512 bf16 and VNNI (int8 dot products).
CPU_FLAGS = (
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
)
MATMUL_SIZE = 4096
COPY_BYTES = 1 << 30


def best_seconds(call: Callable[[], Any], repeats: int = 5) -> float:
    """The fastest of `repeats` timed calls, after one untimed warm-up call."""
    call()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_flags() -> list[str]:
    """Which of CPU_FLAGS /proc/cpuinfo lists for this CPU."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FLAGS if f in present]
    return []


def torch_matmul_tflops(fmt: str, n: int = MATMUL_SIZE) -> float:
    """torch's n³ matmul rate in `fmt` (int8: `torch._int_mm`, int32 accumulation)."""
    import torch

    if fmt == "int8":
        a = torch.randint(-127, 128, (n, n), dtype=torch.int8)
        b = torch.randint(-127, 128, (n, n), dtype=torch.int8)
        return 2 * n**3 / best_seconds(lambda: torch._int_mm(a, b)) / 1e12
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[fmt]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    with torch.inference_mode():
        return 2 * n**3 / best_seconds(lambda: torch.mm(a, b)) / 1e12


def _matmul_graph(fmt: str, n: int) -> Any:
    """An ONNX graph x[n, n] @ W[n, n]; for int8, x and W each pass a Quantize/Dequantize pair
    (per-tensor scales), the form a post-training int8 graph takes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((n, n)).astype(np.float32)
    nodes, inits = [], []
    if fmt == "int8":
        inits += [
            numpy_helper.from_array(np.clip(np.rint(weight * 32), -127, 127).astype(np.int8), "wq"),
            numpy_helper.from_array(np.array(1 / 32, np.float32), "ws"),
            numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
            numpy_helper.from_array(np.array(0, np.int8), "zp"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "xs", "zp"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "xs", "zp"], ["xd"]),
            helper.make_node("DequantizeLinear", ["wq", "ws", "zp"], ["w"]),
            helper.make_node("MatMul", ["xd", "w"], ["y"]),
        ]
    else:
        inits.append(numpy_helper.from_array(weight, "w"))
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# Format -> the precisions OpenVINO's runtime graph may report for the product's layer.
_OPENVINO_PRECISIONS = {"fp32": ("f32",), "bf16": ("bf16",), "int8": ("i8", "u8")}
_MATMUL_LAYERS = ("FullyConnected", "MatMul")


def openvino_matmul(fmt: str, n: int = MATMUL_SIZE) -> Any:
    """The graph above compiled by OpenVINO for this CPU (int8: OpenVINO's int8 path; fp32 and
    bf16: its inference precision hint).

    A RuntimeError when the product would not run in `fmt` (a CPU without bf16, an int8 pattern
    OpenVINO does not fuse): a rate measured in another format must not be reported as this one.
    """
    import openvino as ov

    core = ov.Core()
    model = core.read_model(_matmul_graph(fmt, n).SerializeToString(), b"")
    hint = "bf16" if fmt == "bf16" else "f32"  # int8 layers run int8 whatever the hint
    compiled = core.compile_model(
        model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    )
    ran = matmul_runtime_precisions(compiled)
    if not ran or any(p not in _OPENVINO_PRECISIONS[fmt] for p in ran):
        raise RuntimeError(f"OpenVINO runs the {fmt} matmul in {ran or 'no matmul layer'}")
    return compiled


def matmul_runtime_precisions(compiled: Any) -> list[str]:
    """The precision each matmul layer of a compiled OpenVINO model runs in (e.g. "f32", "i8")."""
    precisions = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in _MATMUL_LAYERS:
            precisions.append(info["runtimePrecision"].astype(str))
    return precisions


def openvino_matmul_tflops(fmt: str, n: int = MATMUL_SIZE) -> float:
    """OpenVINO's n³ matmul rate in `fmt` on this CPU."""
    request = openvino_matmul(fmt, n).create_infer_request()
    x = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    return 2 * n**3 / best_seconds(lambda: request.infer({0: x})) / 1e12


def memory_bandwidth_gbs(nbytes: int = COPY_BYTES) -> float:
    """A copy of `nbytes` between two arrays, one slice per usable core (numpy releases the GIL
    while it copies): (bytes read + bytes written) per second, GB/s."""
    from concurrent.futures import ThreadPoolExecutor

    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    edges = np.linspace(0, src.size, len(os.sched_getaffinity(0)) + 1).astype(int)
    slices = [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    with ThreadPoolExecutor(len(slices)) as pool:

        def copy() -> None:
            list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))

        return 2 * src.nbytes / best_seconds(copy, repeats=3) / 1e9


LIBRARIES: dict[str, Callable[[str], float]] = {
    "torch": torch_matmul_tflops,
    "openvino": openvino_matmul_tflops,
}


def measure_roofline(
    formats: tuple[str, ...] = FORMATS, n: int = MATMUL_SIZE, copy_bytes: int = COPY_BYTES
) -> dict[str, Any]:
    """This machine's matmul rates (TFLOP/s; int8: tera-operations/s) per format and library,
    the best per format, and its memory bandwidth (GB/s, a copy of `copy_bytes`)."""
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"formats must be among {FORMATS}, got {fmt!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if copy_bytes < 8:
        raise ValueError(f"copy_bytes must be >= 8, got {copy_bytes}")
    rates: dict[str, dict[str, float]] = {fmt: {} for fmt in formats}
    skipped: dict[str, str] = {}
    for library, measure in LIBRARIES.items():
        for fmt in formats:
            try:
                rates[fmt][library] = measure(fmt, n)
            except (ImportError, RuntimeError) as e:  # library missing; format unsupported
                skipped[f"{library}/{fmt}"] = str(e).splitlines()[0][:200]
    result: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "matmul_size": n,
        "matmul_tflops": rates,
        "peak_tflops": {fmt: max(r.values()) for fmt, r in rates.items() if r},
        "copy_bytes": copy_bytes,
        "memory_bandwidth_gbs": memory_bandwidth_gbs(copy_bytes),
    }
    if skipped:
        result["skipped"] = skipped
    return result
