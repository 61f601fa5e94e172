"""Where one OpenVINO call of a package graph spends its time, by the kind of layer.

    python -m fewstep.benchmarks.openvino_profile PACKAGE --graph unet --precision bf16 \\
        --shape sample=2,4,64,64 --shape timestep= --shape encoder_hidden_states=2,77,768 \\
        [--config SNIPPETS_MODE=DISABLE] --output benchmarks/results/cpu-sd15-profile.json

The graph is compiled as the openvino backend compiles it (static shapes, the precision hint,
latency mode) with OpenVINO's per-layer counters on (`PERF_COUNT`), run `repeats` times after a
warm-up, and each executed layer's time is summed by its type (Convolution, MatMul, MVN,
Softmax, Eltwise, Reorder, ...) and by the kernel OpenVINO picked (`exec_type`, e.g.
`brgconv_avx512_amx_I8`). The result says which share of a call the matrix products take (the
part a matmul roofline bounds) and which share goes to everything else (normalization,
element-wise work, layout changes), which no faster matmul shortens.

Layers are grouped by what they compute: `MATRIX_TYPES` are the products (convolutions and
linear layers); `Subgraph` layers are what OpenVINO fused itself (attention's products with
its softmax, chains of element-wise work), reported apart because they mix both kinds of work;
every other executed type is "other". Time is OpenVINO's own per-layer wall time, so the sum
can differ a little from the call's time measured outside.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.benchmarks.harness import cpu_name, git_commit, library_versions, write_json

MATRIX_TYPES = (
    "Convolution",
    "MatMul",
    "FullyConnected",
    "FullyConnectedQuantizedLegacy",  # an int8 linear layer
    "GroupConvolution",
    "Deconvolution",
)
FUSED_TYPE = "Subgraph"
HINTS = {"fp32": "f32", "bf16": "bf16"}


def profile_graph(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    precision: str,
    repeats: int = 3,
    config: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Per-layer-type milliseconds of one call of the graph at `path` (ONNX or OpenVINO IR);
    `config`: further OpenVINO compile properties (e.g. SNIPPETS_MODE=DISABLE)."""
    import openvino as ov

    if precision not in HINTS:
        raise ValueError(f"precision must be one of {tuple(HINTS)}, got {precision!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({name: list(shape) for name, shape in shapes.items()})
    properties = {
        "INFERENCE_PRECISION_HINT": HINTS[precision],
        "PERFORMANCE_HINT": "LATENCY",
        "PERF_COUNT": True,
        **(config or {}),
    }
    request = core.compile_model(model, "CPU", properties).create_infer_request()
    rng = np.random.default_rng(0)
    feed = {}
    for port in model.inputs:
        dtype = np.dtype(port.get_element_type().to_dtype())
        feed[port.get_any_name()] = rng.standard_normal(shapes[port.get_any_name()]).astype(dtype)
    request.infer(feed)  # warm-up: first-call allocations are not the steady state
    by_type: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, float] = defaultdict(float)
    for _ in range(repeats):
        request.infer(feed)
        for layer in request.get_profiling_info():
            if layer.status != layer.Status.EXECUTED:
                continue
            ms = layer.real_time.total_seconds() * 1e3 / repeats
            by_type[layer.node_type] += ms
            by_kernel[f"{layer.node_type}: {layer.exec_type}"] += ms
    total = sum(by_type.values())
    matrix = sum(ms for t, ms in by_type.items() if t in MATRIX_TYPES)
    fused = by_type.get(FUSED_TYPE, 0.0)
    return {
        "graph": str(path),
        "precision": precision,
        "compile_properties": {k: str(v) for k, v in properties.items()},
        "input_shapes": {k: list(v) for k, v in shapes.items()},
        "call_ms": total,
        "matrix_ms": matrix,
        "matrix_share": matrix / total if total else 0.0,
        "fused_subgraph_share": fused / total if total else 0.0,
        "other_share": (total - matrix - fused) / total if total else 0.0,
        "by_type_ms": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "by_kernel_ms": dict(sorted(by_kernel.items(), key=lambda kv: -kv[1])[:20]),
    }


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`name=2,4,64,64` (or `name=` for a scalar) -> (name, shape)."""
    name, sep, dims = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--shape must be NAME=D1,D2,... (NAME= for a scalar), got {text!r}")
    try:
        return name, tuple(int(d) for d in dims.split(",") if d)
    except ValueError:
        raise ValueError(f"--shape {text!r}: dimensions must be integers") from None


def parse_property(text: str) -> tuple[str, str]:
    """`KEY=VALUE` -> (KEY, VALUE): an OpenVINO compile property."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise ValueError(f"--config must be KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from fewstep.package import graph_file

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("package")
    p.add_argument("--graph", default="unet")
    p.add_argument("--precision", choices=tuple(HINTS), default="bf16")
    p.add_argument("--shape", action="append", required=True, help="NAME=D1,D2,...")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--config", action="append", default=[], help="KEY=VALUE compile property")
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    path = graph_file(a.package, a.graph)
    if path is None:
        raise SystemExit(f"{a.package} has no graph {a.graph!r}")
    shapes = dict(parse_shape(s) for s in a.shape)
    config = dict(parse_property(c) for c in a.config)
    result = {
        "what": "OpenVINO per-layer profile of one call",
        "device": cpu_name(),
        "versions": library_versions(("openvino",)),
        "commit": git_commit(),
        **profile_graph(path, shapes, a.precision, a.repeats, config),
    }
    shares = ("call_ms", "matrix_share", "fused_subgraph_share", "other_share")
    print(json.dumps({k: result[k] for k in shares}))
    for kind, ms in list(result["by_type_ms"].items())[:12]:
        print(f"{kind:>20} {ms:9.1f} ms  {ms / result['call_ms']:6.1%}")
    if a.output:
        print(f"wrote {write_json(Path(a.output), result)}")
    return result


if __name__ == "__main__":
    main()
