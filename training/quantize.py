"""Weight-only int8 quantization of an exported graph's Conv and MatMul weights, for shipping.

Each weight W that feeds a Conv (input 1, [C_out, C_in, kh, kw]) or a MatMul (input 1: the
TorchScript exporter stores a Linear's W [C_out, C_in] transposed, as Wᵀ [C_in, C_out]) is
stored as int8 values q and one float32 scale per output channel c (axis 0 for Conv, axis 1 for
the transposed MatMul weight), symmetric, zero point 0:

    scale[c] = max |W[c]| / 127        q = round(W / scale[c]) in [-127, 127]

and the graph computes with DequantizeLinear(q, scale, axis) (float32; opset 13+), followed by a
Cast to W's own dtype where that is float16: the arithmetic stays float, only the stored bytes
shrink (by half from fp16). Every dequantized value lies within scale[c]/2 of the weight it
replaces. Activations are not quantized (no QuantizeLinear anywhere).

The quantized tensors are named after the source parameter they replace, found by its exact
bytes in the source weights (a safetensors file's tensors, as `shared_weights` matches them):
`<prefix><parameter>.int8` and `.scale`, with `.T` before the suffix for a transposed MatMul
weight. So anyone can rebuild the weights the graph computes with from the graph alone and
put them into the source model (tests/test_default_model.py does, for diffusers). A weight
that matches no parameter is refused (ValueError naming it): the graph would hold weights
nobody can trace back.

Limits: the main graph only; initializers only (weights folded into Constant nodes are left
alone); float16 or float32 weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

# op → (input index of its weight, the output-channel axis of the weight as the graph stores it)
WEIGHT_INPUTS = {"Conv": (1, 0), "MatMul": (1, 1)}
INT8_MAX = 127


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """One weight replaced by int8 values and per-channel scales."""

    parameter: str  # the source parameter's name
    transposed: bool  # the graph holds the parameter's transpose (a MatMul weight)
    shape: tuple[int, ...]  # as the graph holds it
    axis: int  # the output-channel axis of that shape
    max_error_in_scales: float  # max over the tensor of |dequantized − W| / scale[c]


def quantize_symmetric(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scales along `axis`): scale[c] = max |W[c]| / 127, zero point 0.
    An all-zero channel gets scale 1 (its values are 0 whatever the scale)."""
    w = np.moveaxis(weight.astype(np.float64), axis, 0)
    peak = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = np.where(peak > 0, peak / INT8_MAX, 1.0).astype(np.float32)
    # rounded against the stored float32 scale, so that |q·scale − W| ≤ scale/2 holds for it
    q = np.rint(w / _along(scale.astype(np.float64), 0, w.ndim))
    q = np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8)
    return np.moveaxis(q, 0, axis), scale


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """q · scale[c] along `axis`, in float64 (exact: 8 × 24 significant bits)."""
    return q.astype(np.float64) * _along(scale.astype(np.float64), axis, q.ndim)


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


def quantize_weights(
    model: Any, parameters: dict[str, np.ndarray], prefix: str = ""
) -> list[QuantizedWeight]:
    """Replace, in place, the Conv and MatMul weights of an onnx ModelProto by int8 values,
    scales and DequantizeLinear (+ Cast) nodes (module docstring); returns what it replaced.
    `parameters`: the source weights by name, to name the tensors after; `prefix` goes before
    those names (the exporter's module path, e.g. "vae.")."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    by_bytes = _parameters_by_bytes(parameters)
    done, new_nodes = [], []
    for name, axis in _weight_initializers(graph, initializers).items():
        weight = numpy_helper.to_array(initializers[name])
        if weight.dtype not in (np.float16, np.float32):
            raise ValueError(f"weight {name!r} must be float16 or float32, got {weight.dtype}")
        parameter, transposed = _source_parameter(name, weight, by_bytes)
        q, scale = quantize_symmetric(weight, axis)
        error = np.abs(dequantize(q, scale, axis) - weight.astype(np.float64))
        in_scales = float((error / _along(scale.astype(np.float64), axis, q.ndim)).max())
        done.append(QuantizedWeight(parameter, transposed, weight.shape, axis, in_scales))
        base = f"{prefix}{parameter}{'.T' if transposed else ''}"
        graph.initializer.remove(initializers[name])
        graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{base}.int8"),
                numpy_helper.from_array(scale, f"{base}.scale"),
            ]
        )
        nodes = _dequantize_nodes(base, axis, weight.dtype)
        new_nodes += nodes
        _rewire(graph, name, nodes[-1].output[0])
    # the new nodes read only initializers: first in the node list keeps it topologically sorted
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend([*new_nodes, *existing])
    onnx.checker.check_model(model)
    return done


def _dequantize_nodes(base: str, axis: int, dtype: np.dtype) -> list[Any]:
    """DequantizeLinear (float32 out, as opset 13–18 has it), then a Cast for fp16 weights."""
    import onnx
    from onnx import helper

    nodes = [
        helper.make_node(
            "DequantizeLinear",
            [f"{base}.int8", f"{base}.scale"],
            [f"{base}.dequantized"],
            name=f"{base}.DequantizeLinear",
            axis=axis,
        )
    ]
    if dtype == np.float16:
        to = onnx.TensorProto.FLOAT16
        nodes.append(
            helper.make_node("Cast", nodes[0].output, [f"{base}.fp16"], name=f"{base}.Cast", to=to)
        )
    return nodes


def _weight_initializers(graph: Any, initializers: dict[str, Any]) -> dict[str, int]:
    """Initializer name → output-channel axis, for each Conv/MatMul weight input that is one
    (in node order; a weight shared by several such inputs must agree on its axis)."""
    found: dict[str, int] = {}
    for node in graph.node:
        if node.op_type not in WEIGHT_INPUTS or len(node.input) <= WEIGHT_INPUTS[node.op_type][0]:
            continue
        index, axis = WEIGHT_INPUTS[node.op_type]
        name = node.input[index]
        if name not in initializers:
            continue
        if node.op_type == "MatMul" and len(initializers[name].dims) != 2:
            continue  # a batched constant, not a Linear's weight
        if found.setdefault(name, axis) != axis:
            raise ValueError(f"weight {name!r} feeds inputs with different channel axes")
    return found


def _parameters_by_bytes(parameters: dict[str, np.ndarray]) -> dict[tuple, str]:
    return {
        (p.dtype.str, p.shape, np.ascontiguousarray(p).tobytes()): name
        for name, p in parameters.items()
    }


def _source_parameter(
    name: str, weight: np.ndarray, by_bytes: dict[tuple, str]
) -> tuple[str, bool]:
    """(the parameter `weight` holds, whether transposed): its exact bytes, or its transpose's."""
    key = (weight.dtype.str, weight.shape, np.ascontiguousarray(weight).tobytes())
    if key in by_bytes:
        return by_bytes[key], False
    if weight.ndim == 2:
        t = np.ascontiguousarray(weight.T)
        key = (t.dtype.str, t.shape, t.tobytes())
        if key in by_bytes:
            return by_bytes[key], True
    raise ValueError(
        f"weight {name!r} {list(weight.shape)} {weight.dtype} matches no source parameter "
        "(nor its transpose) byte for byte; the quantized tensors are named after them"
    )


def _rewire(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for i, value in reversed(list(enumerate(graph.input))):
        if value.name == old:  # an old-style graph listing its initializers as inputs
            del graph.input[i]


def quantize_onnx_file(
    path: Path, parameters: dict[str, np.ndarray], prefix: str = ""
) -> list[QuantizedWeight]:
    """quantize_weights on a graph file whose weights are all inside it; rewritten in place."""
    import onnx

    model = onnx.load(str(path))
    done = quantize_weights(model, parameters, prefix)
    onnx.save(model, str(path))
    return done
