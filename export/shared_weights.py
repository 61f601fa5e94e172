"""One folder, one copy of the weights: a diffusers folder that is also its model package.

A model package repeats the weights of the diffusers folder it was exported from, so the two
folders hold every weight twice. ONNX can keep an initializer outside the graph as a byte range
(location, offset, length) of a file in the graph's folder, and a safetensors file stores every
tensor as one such range after its JSON header, little-endian like ONNX. So a graph placed in
its component's diffusers folder (`unet/model.onnx` next to
`unet/diffusion_pytorch_model.safetensors`) can read its weights from the safetensors file.
`combine_with_diffusers_folder` writes such a folder: diffusers loads it as a pipeline
(it reads model_index.json's components and ignores the graphs), fewstep as a package.

Each initializer of a shared graph becomes, in order of preference:
- a reference to a safetensors tensor with the same dtype and bytes, whatever the shape
  (GroupNorm's [C] weights are initializers of shape [C, 1, 1]);
- for the transpose of a 2-D tensor (the TorchScript exporter stores a Linear that became a
  MatMul as Wᵀ): a reference to W and a Transpose node that makes the old value (onnxruntime,
  OpenVINO and TensorRT fold it when they load the graph);
- anything else (constants folded at export): kept in the graph.
The graph's `lora_map.json` is rewritten to match. ONNX runtimes refuse external data outside
the graph's folder, so only graphs whose folder is their component's diffusers folder share:
`unet/` and `text_encoder/`. The VAE decoder's graph lives in `vae_decoder/`, away from `vae/`,
and keeps its weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.atomic_folder import atomic_folder, check_separate
from fewstep.lora.onnx_package import (
    LORA_MAP_NAME,
    MODEL_NAME,
    MappedWeight,
    lora_map_json,
    read_lora_map,
)
from fewstep.package import (
    GRAPH_NAMES,
    PackageError,
    verify_diffusers_folder,
    verify_package,
    write_manifest,
)

# graph → the safetensors file of its diffusers component, in the same folder
SHARED_WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # byte range in the file
    length: int


def safetensors_tensors(path: Path) -> list[StoredTensor]:
    """The float tensors of a safetensors file with their byte ranges in it."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    out = []
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in _SAFETENSORS_DTYPES:
            continue
        start, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
        out.append(StoredTensor(name, dtype, tuple(info["shape"]), base + start, end - start))
    return out


@dataclasses.dataclass(frozen=True)
class SharedGraph:
    graph: str
    shared: int  # initializers now read from the safetensors file
    transposed: int  # of those, through a Transpose node
    kept: int  # initializers still in the graph
    bytes_before: int  # of model.onnx
    bytes_after: int


def share_graph_weights(graph_dir: Path, weights_name: str) -> SharedGraph:
    """Rewrite `graph_dir/model.onnx` (and its lora_map.json) to read every initializer it
    can from `graph_dir/weights_name`; written atomically."""
    import onnx
    from onnx import numpy_helper

    model_path = graph_dir / MODEL_NAME
    bytes_before = model_path.stat().st_size
    model = onnx.load(str(model_path), load_external_data=False)
    old_data_files = {
        entry.value
        for t in model.graph.initializer
        for entry in t.external_data
        if entry.key == "location"
    }
    onnx.load_external_data_for_model(model, str(graph_dir))  # the kept ones end up inline
    weights = np.memmap(graph_dir / weights_name, dtype=np.uint8, mode="r")
    candidates: dict[tuple[str, bytes], list[StoredTensor]] = {}
    for stored in safetensors_tensors(graph_dir / weights_name):
        raw = weights[stored.offset : stored.offset + stored.length].tobytes()
        candidates.setdefault((stored.dtype.str, _digest(raw)), []).append(stored)
    # Each byte range backs one initializer: fewstep.lora folds a LoRA by writing over an
    # initializer's bytes, which must change nothing else.
    used: set[str] = set()

    def claim(dtype: str, raw: bytes, name: str, shape: tuple[int, ...] | None):
        free = [
            t
            for t in candidates.get((dtype, _digest(raw)), [])
            if t.name not in used
            and (shape is None or t.shape == shape)
            and weights[t.offset : t.offset + t.length].tobytes() == raw
        ]
        if not free:
            return None
        best = next((t for t in free if name.endswith(t.name)), free[0])  # unet.conv_in.weight
        used.add(best.name)
        return best

    graph = model.graph
    taken = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    taken |= {o for node in graph.node for o in node.output}
    renamed: dict[str, str] = {}  # old initializer → shared tensor it is the transpose of
    transposes = []
    shared = kept = 0
    for tensor in graph.initializer:
        value = numpy_helper.to_array(tensor)
        le = value.astype(value.dtype.newbyteorder("<"), copy=False)
        # Same bytes: the same tensor, whatever the shape (GroupNorm's [C] as [C, 1, 1]).
        stored = claim(le.dtype.str, le.tobytes(), tensor.name, None)
        if stored is None and value.ndim == 2:
            raw_t = np.ascontiguousarray(le.T).tobytes()
            stored = claim(le.dtype.str, raw_t, "", tuple(le.shape[::-1]))
            if stored is not None:
                new_name = _unique(f"{weights_name}:{stored.name}", taken)
                taken.add(new_name)
                transposes.append(
                    onnx.helper.make_node(
                        "Transpose", [new_name], [tensor.name], perm=[1, 0], name=f"{new_name}/T"
                    )
                )
                renamed[tensor.name] = new_name
                tensor.name = new_name
                del tensor.dims[:]
                tensor.dims.extend(stored.shape)
        if stored is None:
            kept += 1
            continue
        shared += 1
        tensor.ClearField("raw_data")
        for field in ("float_data", "int32_data", "double_data"):
            tensor.ClearField(field)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for k, v in (
            ("location", weights_name),
            ("offset", str(stored.offset)),
            ("length", str(stored.length)),
        ):
            tensor.external_data.add(key=k, value=v)
    # The Transposes (of initializers only) first: nodes must be in topological order.
    nodes = [*transposes, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)

    tmp = model_path.with_name(f".{MODEL_NAME}.tmp")
    tmp.write_bytes(model.SerializeToString())
    lora_map_path = graph_dir / LORA_MAP_NAME
    if lora_map_path.exists():
        data_map = json.loads(lora_map_path.read_text())
        mapped = {
            name: MappedWeight(renamed[m.initializer], False) if m.initializer in renamed else m
            for name, m in read_lora_map(lora_map_path).items()
        }
        extra = {k: data_map[k] for k in ("method", "unmapped") if k in data_map}
        extra["shared_weights"] = weights_name
        lora_map_path.write_text(lora_map_json(data_map["graph"], mapped, **extra))
    os.replace(tmp, model_path)
    for location in old_data_files - {weights_name}:  # model.onnx_data: now inline or shared
        (graph_dir / location).unlink(missing_ok=True)
    return SharedGraph(
        graph_dir.name, shared, len(transposes), kept, bytes_before, model_path.stat().st_size
    )


def _digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


def _unique(name: str, taken: set[str]) -> str:
    out, n = name, 1
    while out in taken:
        out, n = f"{name}_{n}", n + 1
    return out


def combine_with_diffusers_folder(
    package: Path, diffusers_folder: Path, out: Path
) -> dict[str, SharedGraph]:
    """Write `out`: the diffusers folder plus the package's graphs and manifest, the U-Net and
    text encoder graphs reading their weights from the diffusers safetensors files.

    The two must hold the same weights in the same dtype (save the diffusers folder in the
    package's precision); a graph that finds none of its weights there is an error. `out` must
    not exist and lie apart from both inputs. Built next to `out` and renamed into place
    (fewstep.atomic_folder).
    """
    package, diffusers_folder, out = Path(package), Path(diffusers_folder), Path(out)
    manifest = verify_package(package)
    verify_diffusers_folder(diffusers_folder)
    check_separate(out, package, source_arg="package")
    check_separate(out, diffusers_folder, source_arg="diffusers_folder")
    if out.exists():
        raise FileExistsError(f"{out} exists")
    with atomic_folder(out) as tmp:
        shutil.copytree(diffusers_folder, tmp, dirs_exist_ok=True)
        for graph in GRAPH_NAMES:
            if not (package / graph).is_dir():
                continue
            (tmp / graph).mkdir(exist_ok=True)
            for src in (package / graph).iterdir():
                if src.is_file() and not (tmp / graph / src.name).exists():
                    shutil.copyfile(src, tmp / graph / src.name)
        for src in (package / "tokenizer").iterdir():
            if src.is_file() and not (tmp / "tokenizer" / src.name).exists():
                shutil.copyfile(src, tmp / "tokenizer" / src.name)
        results = {}
        for graph, weights_name in SHARED_WEIGHT_FILES.items():
            if not (tmp / graph / weights_name).is_file():
                raise PackageError(f"missing diffusers folder file: {graph}/{weights_name}")
            result = share_graph_weights(tmp / graph, weights_name)
            if result.shared == 0:
                raise PackageError(
                    f"{graph}: none of the graph's weights are in {graph}/{weights_name}; "
                    "save the diffusers folder in the package's dtype"
                )
            results[graph] = result
        info: dict[str, Any] = dict(manifest or {})
        info.pop("files", None)
        info.pop("manifest_version", None)
        info["shared_weights"] = {
            graph: {"file": f"{graph}/{SHARED_WEIGHT_FILES[graph]}", **dataclasses.asdict(r)}
            for graph, r in results.items()
        }
        write_manifest(tmp, info)
    return results
