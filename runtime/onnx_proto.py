"""Where an ONNX model keeps each initializer's bytes, read without the `onnx` package.

(Also the protobuf reader of fewstep.backends.ort_attention, which rewrites a graph's nodes.)

The lean runtime has numpy and onnxruntime, not `onnx`; folding a LoRA into a package needs
only each weight's dtype, shape and byte range (in `model.onnx`, or in the external data file
such as `model.onnx_data`) and the graph's nodes. This walks the protobuf wire format
(https://protobuf.dev/programming-guides/encoding/) with the field numbers of onnx/onnx.proto:

    ModelProto.graph = 7
    GraphProto.node = 1, .initializer = 5
    NodeProto.input = 1, .output = 2, .name = 3, .op_type = 4, .attribute = 5
    AttributeProto.name = 1, .i = 3
    TensorProto.dims = 1, .data_type = 2, .name = 8, .raw_data = 9, .external_data = 13,
                .data_location = 14 (1 = EXTERNAL)
    StringStringEntryProto.key = 1, .value = 2 (external data: location, offset, length)

The file is memory-mapped and raw_data is skipped over, never copied, so indexing a graph
costs time in the number of its nodes and tensors, not in the bytes of its weights. Limits:
the main graph only (not subgraphs of If/Loop), raw_data or external tensors only (typed
fields such as float_data have no byte range: `offset` is -1 and they cannot be rewritten in
place). External data locations are checked to stay inside the graph's folder
(`fewstep.package.package_path`): a graph cannot make fewstep read or write a file elsewhere.
"""

from __future__ import annotations

import dataclasses
import mmap
from pathlib import Path

import numpy as np

from fewstep.package import PackageError, package_path

# TensorProto.DataType → numpy (bfloat16 has no numpy dtype: not foldable here)
ONNX_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    10: np.dtype("<f2"),
    11: np.dtype("<f8"),
    6: np.dtype("<i4"),
    7: np.dtype("<i8"),
    9: np.dtype("bool"),
}


@dataclasses.dataclass(frozen=True)
class TensorLocation:
    name: str
    data_type: int  # TensorProto.DataType
    shape: tuple[int, ...]
    path: Path  # the file the bytes are in
    offset: int  # -1: not a raw byte range (typed repeated fields)
    nbytes: int

    @property
    def dtype(self) -> np.dtype:
        if self.data_type not in ONNX_DTYPES:
            raise NotImplementedError(
                f"initializer {self.name!r} has ONNX data_type {self.data_type}, which fewstep "
                "cannot fold (float32, float16 and float64 only)"
            )
        return ONNX_DTYPES[self.data_type]

    def read(self) -> np.ndarray:
        """A copy of the tensor's values."""
        if self.offset < 0:
            raise NotImplementedError(
                f"initializer {self.name!r} is stored in typed fields, not raw bytes"
            )
        count = int(np.prod(self.shape, dtype=np.int64))
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.nbytes)
        if len(data) != self.nbytes or count * self.dtype.itemsize != self.nbytes:
            raise ValueError(
                f"initializer {self.name!r}: {self.path} is truncated or its size does not "
                f"match shape {list(self.shape)}"
            )
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape).copy()


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    op_type: str
    name: str
    inputs: tuple[str, ...]
    int_attributes: dict[str, int]


@dataclasses.dataclass(frozen=True)
class OnnxIndex:
    path: Path
    initializers: dict[str, TensorLocation]
    nodes: tuple[NodeInfo, ...]


def read_varint(buf: mmap.mmap | bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def message_fields(buf: mmap.mmap | bytes, start: int, end: int):
    """(field number, wire type, varint value or (start, end) byte range) of one message."""
    pos = start
    while pos < end:
        tag, pos = read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
            yield field, wire, value
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            yield field, wire, (pos, pos + length)
            pos += length
        elif wire == 1:
            yield field, wire, (pos, pos + 8)
            pos += 8
        elif wire == 5:
            yield field, wire, (pos, pos + 4)
            pos += 4
        else:
            raise ValueError(f"not an ONNX model: protobuf wire type {wire} at byte {pos}")
    if pos != end:
        raise ValueError(f"not an ONNX model: a field overruns its message at byte {pos}")


def decode_text(buf: mmap.mmap | bytes, span: tuple[int, int]) -> str:
    return bytes(buf[span[0] : span[1]]).decode("utf-8")


def _external_int(external: dict[str, str], key: str, default: int, where: str) -> int:
    """An external data entry's offset or length: a decimal integer ≥ 0."""
    text = external.get(key)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 20):
        raise PackageError(f"{where} {key} must be an integer >= 0, got {text!r:.80}")
    return int(text)


def tensor_location(
    buf: mmap.mmap | bytes,
    start: int,
    end: int,
    model_path: Path,
    checked: dict[str, Path] | None = None,
) -> TensorLocation:
    """The TensorProto at buf[start:end]: name, type, shape and where its bytes are.

    An external data location must be a relative path inside the graph's folder, symlinks
    followed (onnxruntime and OpenVINO refuse others too); PackageError naming the graph
    file, the initializer and the location otherwise. `checked` remembers the locations
    checked already ({location: path}), for the initializers of one graph.
    """
    dims: list[int] = []
    data_type, name, raw, external = 0, "", None, {}
    for field, wire, value in message_fields(buf, start, end):
        if field == 1:
            if wire == 0:
                dims.append(value)
            else:  # packed
                pos, stop = value
                while pos < stop:
                    dim, pos = read_varint(buf, pos)
                    dims.append(dim)
        elif field == 2:
            data_type = value
        elif field == 8:
            name = decode_text(buf, value)
        elif field == 9:
            raw = value
        elif field == 13:
            entry = {f: decode_text(buf, v) for f, _, v in message_fields(buf, *value)}
            external[entry.get(1, "")] = entry.get(2, "")
    dims = [d - (1 << 64) if d >= 1 << 63 else d for d in dims]  # int64 two's complement
    if external:
        where = f"{model_path}: initializer {name!r:.200} external data"
        location = external.get("location")
        if checked is not None and location in checked:
            path = checked[location]
        else:
            path = package_path(model_path.parent, location, f"{where} location")
            if checked is not None and location is not None:
                checked[location] = path
        itemsize = ONNX_DTYPES[data_type].itemsize if data_type in ONNX_DTYPES else 0
        size = int(np.prod(dims, dtype=np.int64)) * itemsize
        offset = _external_int(external, "offset", 0, where)
        nbytes = _external_int(external, "length", size, where)
        return TensorLocation(name, data_type, tuple(dims), path, offset, nbytes)
    if raw is not None:
        return TensorLocation(name, data_type, tuple(dims), model_path, raw[0], raw[1] - raw[0])
    return TensorLocation(name, data_type, tuple(dims), model_path, -1, 0)


def _node(buf: mmap.mmap | bytes, start: int, end: int) -> NodeInfo:
    inputs: list[str] = []
    name = op_type = ""
    attributes: dict[str, int] = {}
    for field, _, value in message_fields(buf, start, end):
        if field == 1:
            inputs.append(decode_text(buf, value))
        elif field == 3:
            name = decode_text(buf, value)
        elif field == 4:
            op_type = decode_text(buf, value)
        elif field == 5:
            attr_name, attr_int = "", None
            for f, _, v in message_fields(buf, *value):
                if f == 1:
                    attr_name = decode_text(buf, v)
                elif f == 3:
                    attr_int = v - (1 << 64) if v >= 1 << 63 else v
            if attr_int is not None:
                attributes[attr_name] = attr_int
    return NodeInfo(op_type, name, tuple(inputs), attributes)


def read_onnx_index(path: str | Path) -> OnnxIndex:
    """Initializer locations and nodes of the main graph of the ONNX model at `path`."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _index(buf, path)
    except PackageError:
        raise
    # a field runs past the end, bad text, a bad wire type, an empty file (mmap refuses it)
    except (ValueError, IndexError) as e:
        raise PackageError(f"not an ONNX model: {path} ({type(e).__name__}: {e})") from e


def _index(buf: mmap.mmap, path: Path) -> OnnxIndex:
    graphs = [v for f, wire, v in message_fields(buf, 0, len(buf)) if f == 7 and wire == 2]
    if len(graphs) != 1:
        raise ValueError(f"not an ONNX model (no graph): {path}")
    initializers: dict[str, TensorLocation] = {}
    nodes: list[NodeInfo] = []
    checked: dict[str, Path] = {}  # external data locations: one file for most graphs
    for field, wire, value in message_fields(buf, *graphs[0]):
        if wire != 2:
            continue
        if field == 5:
            tensor = tensor_location(buf, value[0], value[1], path, checked)
            initializers[tensor.name] = tensor
        elif field == 1:
            nodes.append(_node(buf, *value))
    return OnnxIndex(path, initializers, tuple(nodes))
