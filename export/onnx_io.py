"""torch module -> `model.onnx` (+ `model.onnx_data`): the export of one graph.

Exporter: torch.onnx's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`).
In torch 2.13 both exporters produce correct graphs for every SD component with dynamic batch,
height, width and sequence (outputs agree with torch to ~1e-6 relative at non-square sizes and
other batches than the traced one). We chose the TorchScript one because:

- it is faster where it matters for us: the tiny test U-Net exports several times faster
  than with the dynamo exporter (dynamo's cost is mostly `run_decompositions` reasoning about
  symbolic shapes, per node), so the export tests fit CI's minutes, and a real-size SD 1.5
  U-Net exports faster too (docs/reference.md#onnx-exporter);
- `dynamic_axes` gives the axis names we declare (`batch`, `height`, ...) to inputs and
  outputs alike; the dynamo exporter needs `Dim.AUTO` to get past guards diffusers' code adds
  (`batch <= 63` from Upsample2D's `>= 64` branch, even sizes), and then names the axes
  `s23`, `s59`, ...;
- it is what optimum-onnx's `export_pytorch` uses by default (`dynamo=False`), so our graphs
  have the structure of the optimum packages fewstep must interoperate with.
Its costs: memory, since it serialises the whole model in memory: exporting an SD 1.5 U-Net
peaks at about twice the resident memory of the dynamo exporter, and at SDXL's size that is
the point at which `dynamo=True` becomes the better trade (docs/reference.md#onnx-exporter).
It is deprecated (a DeprecationWarning since torch 2.9), and it traces Python control flow
for the traced shapes only: such specialisations are caught by the verification, which runs
every graph at another batch and a non-square size than the one traced. Switching is confined
to `export_graph` (`dynamic_shapes` with `Dim.AUTO`, `ONNXProgram.save`, then rename the
axes).

External data: graphs whose weights exceed 2 GiB (protobuf's limit; the SD fp32 U-Net is
3.4 GB, SDXL's 10 GB and its second text encoder 2.8 GB) keep their weights in one
`model.onnx_data` file beside `model.onnx`, optimum's convention. torch writes one file per
tensor for such graphs into a scratch folder; `write_graph` then streams those files into
`model.onnx_data` a chunk at a time and rewrites only the graph's references to them, so the
weights are never loaded as ONNX tensors (the torch module is the one copy in memory).
Graphs under the threshold are saved as one self-contained `model.onnx`.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

from fewstep.export.graphs import GraphSpec

MIN_OPSET = 17  # LayerNormalization as one op; what optimum and TensorRT's demo use
MAX_OPSET = 20  # the TorchScript exporter's newest (torch.onnx._constants)
EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3  # protobuf's hard limit on one message
EXTERNAL_DATA_NAME = "model.onnx_data"
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay in the graph (onnx's own default threshold)
DATA_ALIGNMENT = 4096  # tensor offsets in the data file, a page apart (memory-mappable)
COPY_CHUNK_BYTES = 64 << 20
MODEL_NAME = "model.onnx"

_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 11: "float64", 9: "bool"}


def export_graph(
    spec: GraphSpec,
    module: Any,
    args: tuple[Any, ...],
    out_dir: Path,
    opset: int,
) -> Path:
    """Trace `module` on `args` and write `out_dir/model.onnx` (+ external data if large)."""
    import onnx
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / ".torch-export"
    scratch.mkdir()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The deprecation notice is the choice made above; TracerWarnings flag Python
            # branches on traced values, which the verification at other shapes checks.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # Its notes on what it could not constant-fold and on negative gather indices
            # (CLIP's pooler gathers at argmax positions, never negative).
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            torch.onnx.export(
                module,
                args,
                str(scratch / MODEL_NAME),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        path = out_dir / MODEL_NAME
        write_graph(scratch / MODEL_NAME, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    onnx.checker.check_model(str(path))  # by path: works with external data too
    return path


def write_graph(src: Path, dst: Path) -> None:
    """Save the graph at `src` (weights embedded, or in files beside it) as `dst`: embedded when
    they come to at most EXTERNAL_DATA_THRESHOLD_BYTES, else in one EXTERNAL_DATA_NAME beside
    `dst`, streamed (module docstring)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    if weight_bytes(model, src.parent) <= EXTERNAL_DATA_THRESHOLD_BYTES:
        onnx.load_external_data_for_model(model, str(src.parent))  # under 2 GiB
        onnx.save_model(model, str(dst))
        return
    with open(dst.parent / EXTERNAL_DATA_NAME, "wb") as data:
        for tensor in model.graph.initializer:
            if _is_external(tensor) or len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                _move_to_data_file(tensor, src.parent, data)
    onnx.save_model(model, str(dst))


def _is_external(tensor: Any) -> bool:
    from onnx import TensorProto

    return bool(tensor.data_location == TensorProto.EXTERNAL)


def _external_info(tensor: Any, base: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor, the file checked to lie inside `base`."""
    from fewstep.package import package_path

    info = {entry.key: entry.value for entry in tensor.external_data}
    path = package_path(base, info.get("location"), f"tensor {tensor.name!r}: external data")
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else path.stat().st_size - offset
    return path, offset, length


def _move_to_data_file(tensor: Any, base: Path, data: Any) -> None:
    """Append the tensor's bytes to the open data file (at an aligned offset) and point the
    tensor there."""
    from onnx import TensorProto

    data.write(b"\0" * (-data.tell() % DATA_ALIGNMENT))
    offset = data.tell()
    if _is_external(tensor):
        path, start, length = _external_info(tensor, base)
        with open(path, "rb") as f:
            f.seek(start)
            _copy_bytes(f, data, length)
    else:
        data.write(tensor.raw_data)
        tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (
        ("location", EXTERNAL_DATA_NAME),
        ("offset", str(offset)),
        ("length", str(data.tell() - offset)),
    ):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def _copy_bytes(src: Any, dst: Any, length: int) -> None:
    while length > 0:
        chunk = src.read(min(length, COPY_CHUNK_BYTES))
        if not chunk:
            raise ValueError(f"external data ends {length} bytes early")
        dst.write(chunk)
        length -= len(chunk)


def weight_bytes(model: Any, base: Path) -> int:
    """Bytes of a graph's initializers: embedded, or in external files under `base`."""
    from onnx import numpy_helper

    total = 0
    for tensor in model.graph.initializer:
        if _is_external(tensor):
            total += _external_info(tensor, base)[2]
        elif tensor.raw_data:
            total += len(tensor.raw_data)
        else:
            total += numpy_helper.to_array(tensor).nbytes
    return total


def graph_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The inputs and outputs a graph declares: name, dtype and shape (axis names or ints)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(value: Any) -> dict[str, Any]:
        tensor_type = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor_type.shape.dim]
        dtype = _ONNX_DTYPES.get(tensor_type.elem_type, str(tensor_type.elem_type))
        return {"name": value.name, "dtype": dtype, "shape": shape}

    initializers = {t.name for t in model.graph.initializer}
    return {
        "inputs": [describe(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [describe(v) for v in model.graph.output],
    }
