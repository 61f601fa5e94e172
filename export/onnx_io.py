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
3.4 GB) keep their weights in one `model.onnx_data` file beside `model.onnx`, optimum's
convention. torch writes one file per tensor for such graphs; we export into a scratch folder
and re-save with onnx, which also gives smaller graphs one self-contained `model.onnx`.
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
        model = onnx.load(str(scratch / MODEL_NAME))  # pulls in torch's per-tensor files
        path = out_dir / MODEL_NAME
        if initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES:
            onnx.save_model(
                model,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=EXTERNAL_DATA_NAME,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(path))
        del model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    onnx.checker.check_model(str(path))  # by path: works with external data too
    return path


def initializer_bytes(model: Any) -> int:
    """Bytes of a graph's weights (embedded or already-loaded external data)."""
    from onnx import numpy_helper

    total = 0
    for tensor in model.graph.initializer:
        if tensor.raw_data:
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
