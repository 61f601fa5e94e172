"""Fuse the exported attention of a U-Net or VAE graph into onnxruntime's MultiHeadAttention.

The package's graphs hold attention as standard ONNX (what torch's exporter writes for
`scaled_dot_product_attention`), so that every runtime reads them:

    q [B, S, C] → Reshape [B, S, H, D] → Transpose (0, 2, 1, 3) → Mul √scale ┐
    k [B, L, C] → Reshape [B, L, H, D] → Transpose (0, 2, 3, 1) → Mul √scale ┴ MatMul → Softmax ┐
    v [B, L, C] → Reshape [B, L, H, D] → Transpose (0, 2, 1, 3) ──────────────────────────── MatMul
      → Transpose (0, 2, 1, 3) → Reshape [B, S, C]

onnxruntime runs that as written: the B·H·S·L score matrix is materialized twice (scores and
softmax), 2 × 1.07 GB per self-attention of a 512² SD1.5-layout U-Net at batch 2. Its contrib
op `com.microsoft.MultiHeadAttention` takes q, k, v as [B, S, C] and runs flash attention on
the CPU (MLAS), which made the U-Net step faster and halved the peak memory on the mid
benchmark model at 512² (sides `onnxruntime` and `onnxruntime-unfused` of
benchmarks/results/cpu-bench-all.json). The backend swaps each matched subgraph for that op in
an in-memory copy of the graph; the package on disk stays standard ONNX for OpenVINO and
TensorRT.

Matching is strict (every link above, each intermediate used only inside the pattern, the
default scale 1/√D built as the exporter builds it, float32 projections, the head count a
constant); anything else is left unfused. Pure protobuf editing (fewstep.onnx_proto): no
`onnx` package on the runtime path.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np

from fewstep.onnx_proto import (
    TensorLocation,
    decode_text,
    message_fields,
    read_varint,
    tensor_location,
)

_FLOAT = 1  # TensorProto.FLOAT
_INT64 = 7
_FLOAT_TYPES = {_FLOAT: "<f4", 10: "<f2", 11: "<f8"}


@dataclasses.dataclass
class _Node:
    index: int
    op_type: str = ""
    domain: str = ""
    name: str = ""
    inputs: list[str] = dataclasses.field(default_factory=list)
    outputs: list[str] = dataclasses.field(default_factory=list)
    ints: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    tensor: np.ndarray | None = None  # a Constant node's value


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _packed_or_single(buf: bytes, wire: int, value) -> list[int]:
    if wire == 0:
        return [_signed(value)]
    out, pos = [], value[0]
    while pos < value[1]:
        v, pos = read_varint(buf, pos)
        out.append(_signed(v))
    return out


def _small_tensor(buf: bytes, start: int, end: int) -> np.ndarray | None:
    """Value of a small TensorProto (int64 or float, raw or typed fields); None otherwise."""
    dims: list[int] = []
    data_type, raw, ints, floats = 0, None, [], []
    for field, wire, value in message_fields(buf, start, end):
        if field == 1:
            dims += _packed_or_single(buf, wire, value)
        elif field == 2:
            data_type = value
        elif field == 9:
            raw = bytes(buf[value[0] : value[1]])
        elif field == 7:
            ints += _packed_or_single(buf, wire, value)
        elif field == 4 and wire == 2:
            floats += np.frombuffer(buf[value[0] : value[1]], "<f4").tolist()
        elif field == 4 and wire == 5:
            floats.append(float(np.frombuffer(buf[value[0] : value[1]], "<f4")[0]))
    shape = tuple(dims)
    if data_type == _INT64:
        array = np.frombuffer(raw, "<i8") if raw is not None else np.array(ints, np.int64)
    elif data_type in _FLOAT_TYPES:
        array = np.frombuffer(raw, _FLOAT_TYPES[data_type]) if raw is not None else np.array(floats)
    else:
        return None
    return array.reshape(shape) if array.size == int(np.prod(shape)) else None


def _parse_node(buf: bytes, index: int, span: tuple[int, int]) -> _Node:
    node = _Node(index)
    for field, _, value in message_fields(buf, *span):
        if field == 1:
            node.inputs.append(decode_text(buf, value))
        elif field == 2:
            node.outputs.append(decode_text(buf, value))
        elif field == 3:
            node.name = decode_text(buf, value)
        elif field == 4:
            node.op_type = decode_text(buf, value)
        elif field == 7:
            node.domain = decode_text(buf, value)
        elif field == 5:
            attr_name, ints = "", []
            tensor: np.ndarray | None = None
            for f, w, v in message_fields(buf, *value):
                if f == 1:
                    attr_name = decode_text(buf, v)
                elif f == 3:  # i
                    ints = [_signed(v)]
                elif f == 8:  # ints
                    ints += _packed_or_single(buf, w, v)
                elif f == 5 and w == 2:  # t
                    tensor = _small_tensor(buf, *v)
            if attr_name == "value":  # a Constant's
                node.tensor = tensor
            if ints:
                node.ints[attr_name] = ints
    return node


# --- protobuf writing --------------------------------------------------------------------


def _varint_bytes(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint_bytes(field << 3 | 2) + _varint_bytes(len(payload)) + payload


def _string(field: int, text: str) -> bytes:
    return _length_delimited(field, text.encode("utf-8"))


def _int_attribute(name: str, value: int) -> bytes:
    attr_int_type = 2  # AttributeProto.INT
    payload = _string(1, name) + _varint_bytes(3 << 3 | 0) + _varint_bytes(value)
    payload += _varint_bytes(20 << 3 | 0) + _varint_bytes(attr_int_type)
    return payload


def _mha_node(name: str, q: str, k: str, v: str, output: str, heads: int) -> bytes:
    payload = b"".join(_string(1, x) for x in (q, k, v)) + _string(2, output)
    payload += _string(3, name) + _string(4, "MultiHeadAttention")
    payload += _length_delimited(5, _int_attribute("num_heads", heads))
    payload += _string(7, "com.microsoft")
    return _length_delimited(1, payload)  # GraphProto.node


# --- matching ----------------------------------------------------------------------------


class _Graph:
    def __init__(self, buf: bytes, graph_span: tuple[int, int], model_path: Path):
        self.buf = buf
        self.nodes: list[_Node] = []
        self.initializers: dict[str, TensorLocation] = {}
        self.outputs: set[str] = set()
        checked: dict[str, Path] = {}
        for field, wire, value in message_fields(buf, *graph_span):
            if wire != 2:
                continue
            if field == 1:
                self.nodes.append(_parse_node(buf, len(self.nodes), value))
            elif field == 5:
                tensor = tensor_location(buf, value[0], value[1], model_path, checked)
                self.initializers[tensor.name] = tensor
            elif field == 12:  # graph outputs (ValueInfoProto.name = 1)
                for f, _, v in message_fields(buf, *value):
                    if f == 1:
                        self.outputs.add(decode_text(buf, v))
        self.producer = {out: n for n in self.nodes for out in n.outputs}
        self.consumers: dict[str, list[_Node]] = defaultdict(list)
        for n in self.nodes:
            for name in n.inputs:
                self.consumers[name].append(n)

    def op(self, tensor: str, op_type: str) -> _Node | None:
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op_type and not node.domain else None

    def constant(self, tensor: str) -> np.ndarray | None:
        node = self.op(tensor, "Constant")
        return node.tensor if node is not None else None

    def projection_width(self, tensor: str) -> int | None:
        """C of a float32 Linear output (MatMul by a [C_in, C] initializer, + bias)."""
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "Add":
            node = next((self.producer[i] for i in node.inputs if i in self.producer), None)
        if node is None or node.op_type != "MatMul" or node.domain:
            return None
        weight = self.initializers.get(node.inputs[1])
        if weight is None or weight.data_type != _FLOAT or len(weight.shape) != 2:
            return None
        return weight.shape[1]

    def heads(self, reshape: _Node) -> int | None:
        """H of a Reshape to [B, -1, H, D] whose shape is Concat(…, Constant H, …)."""
        concat = self.op(reshape.inputs[1], "Concat")
        if concat is None or len(concat.inputs) != 4:
            return None
        value = self.constant(concat.inputs[2])
        return int(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def default_scale(self, mul_q: _Node, mul_k: _Node) -> bool:
        """Both Muls by Sqrt(Cast(Div(1, Sqrt(D)))): √ of the default scale 1/√D."""
        sqrt_q, sqrt_k = self.op(mul_q.inputs[1], "Sqrt"), self.op(mul_k.inputs[1], "Sqrt")
        if sqrt_q is None or sqrt_k is None or sqrt_q.inputs != sqrt_k.inputs:
            return False
        cast = self.op(sqrt_q.inputs[0], "Cast")
        div = self.op(cast.inputs[0], "Div") if cast else None
        if div is None or self.op(div.inputs[1], "Sqrt") is None:
            return False
        one = self.constant(div.inputs[0])
        return one is not None and one.size == 1 and float(one.reshape(-1)[0]) == 1.0

    def only_user(self, tensor: str, node: _Node) -> bool:
        """`node` is the one user of `tensor`, but for Shape nodes (the exporter's scale
        arithmetic reads q's shape; fuse_attention checks that it dies with the pattern)."""
        users = [n for n in self.consumers[tensor] if n.op_type != "Shape"]
        return tensor not in self.outputs and [n.index for n in users] == [node.index]

    def match(self, softmax: _Node) -> tuple[list[_Node], bytes, set[str]] | None:
        """The nodes of the attention around `softmax`, its fused node and that node's inputs."""
        if softmax.ints.get("axis", [-1])[0] not in (-1, 3):
            return None
        scores = self.op(softmax.inputs[0], "MatMul")
        if scores is None:
            return None
        mul_q, mul_k = self.op(scores.inputs[0], "Mul"), self.op(scores.inputs[1], "Mul")
        if mul_q is None or mul_k is None or not self.default_scale(mul_q, mul_k):
            return None
        t_q, t_k = self.op(mul_q.inputs[0], "Transpose"), self.op(mul_k.inputs[0], "Transpose")
        users = self.consumers[softmax.outputs[0]]
        out = users[0] if len(users) == 1 and users[0].op_type == "MatMul" else None
        if t_q is None or t_k is None or out is None or out.inputs[0] != softmax.outputs[0]:
            return None
        t_v = self.op(out.inputs[1], "Transpose")
        t_out_users = self.consumers[out.outputs[0]]
        t_out = t_out_users[0] if len(t_out_users) == 1 else None
        r_out_users = self.consumers[t_out.outputs[0]] if t_out else []
        r_out = r_out_users[0] if len(r_out_users) == 1 else None
        if t_v is None or t_out is None or t_out.op_type != "Transpose":
            return None
        if r_out is None or r_out.op_type != "Reshape" or r_out.domain:
            return None
        perms = [n.ints.get("perm") for n in (t_q, t_k, t_v, t_out)]
        if perms != [[0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3], [0, 2, 1, 3]]:
            return None
        r_q, r_k, r_v = (self.op(t.inputs[0], "Reshape") for t in (t_q, t_k, t_v))
        if r_q is None or r_k is None or r_v is None:
            return None
        heads = {self.heads(r) for r in (r_q, r_k, r_v)}
        widths = {self.projection_width(r.inputs[0]) for r in (r_q, r_k, r_v)}
        h, c = heads.pop(), widths.pop()
        if heads or widths or h is None or c is None or h < 1 or c % h:
            return None
        links = [
            (r_q, t_q), (t_q, mul_q), (mul_q, scores),
            (r_k, t_k), (t_k, mul_k), (mul_k, scores),
            (scores, softmax), (softmax, out), (r_v, t_v), (t_v, out),
            (out, t_out), (t_out, r_out),
        ]  # fmt: skip
        if not all(self.only_user(node.outputs[0], user) for node, user in links):
            return None
        fused = _mha_node(
            softmax.name + "/MultiHeadAttention",
            r_q.inputs[0],
            r_k.inputs[0],
            r_v.inputs[0],
            r_out.outputs[0],
            h,
        )
        nodes = [r_q, t_q, mul_q, r_k, t_k, mul_k, scores, softmax, r_v, t_v, out, t_out, r_out]
        return nodes, fused, {r_q.inputs[0], r_k.inputs[0], r_v.inputs[0]}


def fuse_attention(model: bytes, model_path: Path = Path("model.onnx")) -> tuple[bytes, int]:
    """(the model with every matched attention fused, how many); unchanged bytes when none.

    `model_path`: where the graph's file is, whose folder its external data must stay in.
    """
    graphs = [v for f, w, v in message_fields(model, 0, len(model)) if f == 7 and w == 2]
    if len(graphs) != 1:
        raise ValueError("not an ONNX model (no graph)")
    graph = _Graph(model, graphs[0], model_path)
    removed: set[int] = set()
    inserted: dict[int, bytes] = {}  # node index → the fused node written in its place
    fused_inputs: set[str] = set()
    for node in graph.nodes:
        if node.op_type != "Softmax" or node.domain:
            continue
        found = graph.match(node)
        if found is None:
            continue
        nodes, fused, inputs = found
        removed.update(n.index for n in nodes)
        inserted[nodes[-1].index] = fused
        fused_inputs.update(inputs)
    if not inserted:
        return model, 0
    removed |= _dead_nodes(graph, removed, fused_inputs)
    replaced = {out for i in inserted for out in graph.nodes[i].outputs}  # the fused nodes'
    gone = {out for n in graph.nodes if n.index in removed for out in n.outputs} - replaced
    if any(i in gone for n in graph.nodes if n.index not in removed for i in n.inputs):
        return model, 0  # something outside the patterns reads inside them: leave it all

    graph_bytes = bytearray()
    node_index = 0
    for field, wire, value in message_fields(model, *graphs[0]):
        if field == 1 and wire == 2:
            i = node_index
            node_index += 1
            if i in inserted:
                graph_bytes += inserted[i]
            if i in removed:
                continue
        graph_bytes += _raw_field(model, field, wire, value)
    opset = _length_delimited(1, b"com.microsoft") + _varint_bytes(2 << 3) + _varint_bytes(1)
    out = bytearray()
    for field, wire, value in message_fields(model, 0, len(model)):
        if field == 7 and wire == 2:
            out += _length_delimited(7, bytes(graph_bytes))
        else:
            out += _raw_field(model, field, wire, value)
    out += _length_delimited(8, opset)  # ModelProto.opset_import
    return bytes(out), len(inserted)


def _raw_field(buf: bytes, field: int, wire: int, value) -> bytes:
    tag = _varint_bytes(field << 3 | wire)
    if wire == 0:
        return tag + _varint_bytes(value)
    start, end = value
    if wire == 2:
        return tag + _varint_bytes(end - start) + bytes(buf[start:end])
    return tag + bytes(buf[start:end])


def _dead_nodes(graph: _Graph, removed: set[int], live: set[str]) -> set[int]:
    """Nodes left computing only what removed nodes used (the Reshapes' shape arithmetic)."""
    dead: set[int] = set()
    users = {name: {n.index for n in nodes} for name, nodes in graph.consumers.items()}
    gone = set(removed)
    changed = True
    while changed:
        changed = False
        for node in reversed(graph.nodes):
            if node.index in gone:
                continue
            if any(
                o in graph.outputs or o in live or users.get(o, set()) - gone for o in node.outputs
            ):
                continue
            gone.add(node.index)
            dead.add(node.index)
            changed = True
    return dead
