"""LoRAs on a model package's ONNX graphs, without re-export: new initializer values.

Graphs: unet/, text_encoder/ and SDXL's text_encoder_2/ (`LORA_GRAPHS`); the U-Net's
config.json numbers kohya's sgm block names (fewstep.lora.sgm_names).

Which initializer holds which weight. The TorchScript exporter keeps a parameter's name when
it stores it unchanged (conv weights, Gemm weights: `unet.conv_in.weight`), but stores a
Linear that became a MatMul as its transpose under a generated name (`onnx::MatMul_1627`
holds `to_q.weight.T`). Two sources for the map, weight name → (initializer, transposed):

1. `<graph>/lora_map.json`, written by `fewstep export` (fewstep.export.lora_map) by matching
   every exported initializer's bytes against the torch module's parameters, as stored or
   transposed: exact, and independent of how the exporter names things. The package
   manifest hashes it like every other file.
2. Packages without one (optimum's, or any other exporter's): derived from the
   graph itself. Named initializers name their parameter; a MatMul/Gemm whose weight input is
   an initializer carries its module's scope in the node name (`/unet/down_blocks.0/…/attn1/
   to_q/MatMul` → `down_blocks.0.….attn1.to_q.weight`; fewstep's own text_encoder_2 graph
   scopes it under `/text_encoder/`), and the operator says the layout
   (MatMul: [in, out], the transpose; Gemm: transB). Shapes are checked against every LoRA
   either way; tests check that 2. gives the same map as 1. on exported packages.

Applying: `lora_initializers` returns the folded arrays (base + Σ deltas, computed from the
pristine values in the package's files, never from earlier results). `patched_model` turns
them into what a runtime loads without touching the files: the graph's bytes with the
embedded initializers overwritten in memory, and the externally stored ones (graphs over
2 GB keep weights in `model.onnx_data`) as separate arrays for onnxruntime's
`SessionOptions.add_external_initializers`. (`SessionOptions.add_initializer`, the obvious
way, is silently ignored for Conv weights at onnxruntime's default optimisation level: the
NCHWc layout transformer reads the weight from the graph before the override applies;
benchmarks/lora_bench.py measures it, `ort_override_methods` in
benchmarks/results/cpu-lora.json. The parity tests fold 3×3 and 1×1 conv LoRAs.)
`apply_loras_to_package` writes into a copy of the package, atomically: the new values
take exactly the bytes of the old ones, so every other byte of the graph is unchanged.

Limit: the exporter stores equal weights once (torch.onnx deduplicates initializers by value);
a LoRA on one of them would change both, so that is an error that says to fold at export.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.atomic_folder import atomic_folder, check_new_folder
from fewstep.lora.files import LoraArg, describe_loras, load_loras
from fewstep.lora.fold import (
    WeightFold,
    canonical_weight_name,
    check_folded,
    fold_array,
    plan_fold,
)
from fewstep.onnx_proto import OnnxIndex, read_onnx_index
from fewstep.package import (
    OPENVINO_GRAPH,
    PackageError,
    read_json,
    verify_package,
    write_manifest,
)

# graph folder = the diffusers component it holds (text_encoder_2: SDXL's OpenCLIP-bigG)
LORA_GRAPHS = ("unet", "text_encoder", "text_encoder_2")
# The attribute that holds each graph's component in fewstep's export wrappers
# (fewstep.export.graphs): both text encoders sit under `text_encoder`.
_WRAPPER_ATTRIBUTES = {
    "unet": "unet",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder",
}
LORA_MAP_NAME = "lora_map.json"
CONFIG_NAME = "config.json"
LORA_MAP_FORMAT = "fewstep-lora-map"
LORA_MAP_VERSION = 1
MODEL_NAME = "model.onnx"


@dataclasses.dataclass(frozen=True)
class MappedWeight:
    initializer: str
    transposed: bool  # the initializer holds W.T (a Linear exported as MatMul)


def _scope_roots(graph: str) -> tuple[str, ...]:
    """What an exported name of `graph` may start with: the graph's name or the wrapper's
    attribute (`text_encoder.` in text_encoder_2/)."""
    return (graph, _WRAPPER_ATTRIBUTES.get(graph, graph))


def module_weight_name(graph: str, name: str) -> str:
    """An exported name (`unet.conv_in.weight`, `text_model.…` or bare) → fewstep's name."""
    for root in _scope_roots(graph):
        if name.startswith(f"{root}."):
            name = name[len(root) + 1 :]
            break
    return canonical_weight_name(graph, name)


def derive_lora_map(graph: str, index: OnnxIndex) -> dict[str, MappedWeight]:
    """The weight map read off the graph itself (see the module docstring, 2.)."""
    out: dict[str, MappedWeight] = {}
    inits = index.initializers
    for name, loc in inits.items():
        if name.endswith(".weight") and len(loc.shape) in (2, 4):
            out[module_weight_name(graph, name)] = MappedWeight(name, False)
    for node in index.nodes:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight not in inits or len(inits[weight].shape) != 2 or weight.endswith(".weight"):
            continue
        scope = [s for s in node.name.split("/") if s][:-1]  # drop the op's own name
        if scope and scope[0] in _scope_roots(graph):
            scope = scope[1:]
        if not scope:
            continue
        transposed = node.op_type == "MatMul" or not node.int_attributes.get("transB", 0)
        name = module_weight_name(graph, ".".join(scope) + ".weight")
        out.setdefault(name, MappedWeight(weight, transposed))
    return out


def read_lora_map(path: Path) -> dict[str, MappedWeight]:
    data = read_json(path)
    if data.get("format") != LORA_MAP_FORMAT or data.get("version") != LORA_MAP_VERSION:
        raise PackageError(
            f"{path}: expected format {LORA_MAP_FORMAT!r} version {LORA_MAP_VERSION}, got "
            f"{data.get('format')!r:.80} version {data.get('version')!r:.80}"
        )
    weights = data.get("weights")
    if not isinstance(weights, dict):
        raise PackageError(f"corrupt package file {path}: 'weights' must be an object")
    out = {}
    for name, entry in weights.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("initializer"), str)
            and isinstance(entry.get("transposed"), bool)
        ):
            raise PackageError(
                f"corrupt package file {path}: weights[{name!r:.200}] must be "
                f'{{"initializer": name, "transposed": true or false}}, got {entry!r:.80}'
            )
        out[name] = MappedWeight(entry["initializer"], entry["transposed"])
    return out


def lora_map_json(graph: str, weights: dict[str, MappedWeight], **extra: Any) -> str:
    data = {
        "format": LORA_MAP_FORMAT,
        "version": LORA_MAP_VERSION,
        "graph": graph,
        **extra,
        "weights": {
            name: {"initializer": m.initializer, "transposed": m.transposed}
            for name, m in sorted(weights.items())
        },
    }
    return json.dumps(data, indent=1) + "\n"


def read_graph_config(path: Path) -> dict[str, Any] | None:
    """A graph folder's config.json (the U-Net's numbers kohya's sgm names); None if absent."""
    return read_json(path) if path.is_file() else None


class GraphWeights:
    """One graph of a package: its initializers' locations, its weight map and, for the
    U-Net, its config."""

    def __init__(self, graph_dir: Path, graph: str):
        self.graph = graph
        self.index = read_onnx_index(graph_dir / MODEL_NAME)
        self.config = read_graph_config(graph_dir / CONFIG_NAME) if graph == "unet" else None
        map_path = graph_dir / LORA_MAP_NAME
        if map_path.is_file():
            self.map, self.map_source = read_lora_map(map_path), LORA_MAP_NAME
        else:
            self.map, self.map_source = derive_lora_map(graph, self.index), "graph node scopes"
        inits = self.index.initializers
        stale = [m.initializer for m in self.map.values() if m.initializer not in inits]
        if stale:
            raise PackageError(
                f"{map_path} names initializers that {graph}/{MODEL_NAME} does not have "
                f"(e.g. {stale[0]!r}): the map does not belong to this graph"
            )
        self._users: dict[str, list[str]] = {}
        for name, m in self.map.items():
            self._users.setdefault(m.initializer, []).append(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{weight name: shape in torch layout} of every mapped weight."""
        out = {}
        for name, m in self.map.items():
            shape = self.index.initializers[m.initializer].shape
            out[name] = tuple(reversed(shape)) if m.transposed else shape
        return out

    def folded(self, fold: WeightFold) -> tuple[str, np.ndarray]:
        """(initializer name, its new value) for pristine + the fold's delta, checked to be
        finite in the initializer's dtype."""
        weight = fold.weight
        m = self.map[weight]
        sharing = [w for w in self._users[m.initializer] if w != weight]
        if sharing:
            raise ValueError(
                f"{self.graph}.{weight} shares ONNX initializer {m.initializer!r} with "
                f"{', '.join(sharing)} (the exporter stores equal weights once), so a LoRA on "
                "it cannot be folded into the package; fold it at export instead: "
                "fewstep export --lora"
            )
        base = self.index.initializers[m.initializer].read()
        if base.dtype.kind != "f":
            raise PackageError(
                f"{self.index.path}: initializer {m.initializer!r}, mapped to "
                f"{self.graph}.{weight}, holds {base.dtype}, not floating-point weights"
            )
        value = fold_array(base, fold.delta(), transposed=m.transposed)
        check_folded(fold, base, value)
        return m.initializer, value


def refuse_quantized_unet(root: Path) -> None:
    """PackageError when the package's U-Net is the int8 OpenVINO graph `fewstep quantize`
    writes: LoRAs fold into ONNX weights."""
    quantized = root / "unet" / OPENVINO_GRAPH
    if quantized.is_file() and not (root / "unet" / MODEL_NAME).is_file():
        raise PackageError(
            f"{quantized}: this package's U-Net is quantized to int8 (OpenVINO), and LoRAs fold "
            "into ONNX weights; fold them into the package it was quantized from "
            "(`fewstep lora apply`), then quantize that"
        )


def package_graph_weights(package: str | os.PathLike) -> dict[str, GraphWeights]:
    root = Path(package)
    refuse_quantized_unet(root)
    return {g: GraphWeights(root / g, g) for g in LORA_GRAPHS if (root / g / MODEL_NAME).is_file()}


def lora_initializers(
    package: str | os.PathLike, loras: Sequence[LoraArg]
) -> dict[str, dict[str, np.ndarray]]:
    """{graph: {initializer name: folded value}} for `loras` on a package's pristine weights.

    Every file is read and every key resolved and shape-checked before any delta is computed,
    and every value checked to be finite in its initializer's dtype; errors are ValueErrors
    naming the file and key. External data must lie in the graph's folder (PackageError).
    """
    checked = load_loras(loras)
    graphs = package_graph_weights(package)
    folds = plan_fold(
        checked,
        {g: gw.shapes() for g, gw in graphs.items()},
        {g: gw.config for g, gw in graphs.items()},
    )
    out: dict[str, dict[str, np.ndarray]] = {g: {} for g in graphs}
    for fold in folds:
        name, value = graphs[fold.component].folded(fold)
        out[fold.component][name] = value
    return {g: inits for g, inits in out.items() if inits}


def patched_model(
    model_path: Path, values: dict[str, np.ndarray]
) -> tuple[bytes | None, dict[str, np.ndarray]]:
    """(model bytes with the embedded initializers in `values` overwritten, or None when
    none is embedded; {name: value} of those stored as external data)."""
    index = read_onnx_index(model_path)
    buf: bytearray | None = None
    external: dict[str, np.ndarray] = {}
    for name, value in values.items():
        loc = index.initializers[name]
        data = np.ascontiguousarray(value, dtype=loc.dtype)
        if loc.path != model_path:
            external[name] = data
            continue
        if buf is None:
            buf = bytearray(model_path.stat().st_size)
            with open(model_path, "rb") as f:
                f.readinto(buf)
        assert data.nbytes == loc.nbytes and loc.offset >= 0, (name, data.nbytes, loc)
        np.frombuffer(buf, dtype=np.uint8)[loc.offset : loc.offset + loc.nbytes] = data.view(
            np.uint8
        ).reshape(-1)
    return (bytes(buf) if buf is not None else None), external


def apply_loras_to_package(
    package: str | os.PathLike,
    loras: Sequence[LoraArg],
    out: str | os.PathLike,
    check_hashes: bool = True,
) -> Path:
    """Write a copy of `package` at `out` with `loras` folded into its weights.

    The copy's manifest lists the package's earlier LoRAs plus these (name, sha256, scale);
    `engines/` is not copied (engines hold the old weights). `out` must be new or empty and
    apart from `package` (not it, inside it or around it). Atomic (fewstep.atomic_folder): built
    in a hidden sibling folder and renamed; on any error nothing is left at `out` and `package`
    is untouched.
    """
    root, out_path = Path(package), Path(out)
    if not loras:
        raise ValueError("loras must name at least one (path, scale), got none")
    check_new_folder(out_path, root)
    manifest = verify_package(root, check_hashes=check_hashes) or {}
    refuse_quantized_unet(root)
    checked = load_loras(loras)
    new_values = lora_initializers(root, checked)  # every check happens here, before writing

    with atomic_folder(out_path) as tmp:
        for item in sorted(root.iterdir()):
            if item.name == "engines":
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        for graph, values in new_values.items():
            index = read_onnx_index(tmp / graph / MODEL_NAME)
            for name, value in values.items():
                loc = index.initializers[name]
                data = np.ascontiguousarray(value, dtype=loc.dtype).tobytes()
                assert len(data) == loc.nbytes and loc.offset >= 0, (name, len(data), loc)
                with open(loc.path, "r+b") as f:
                    f.seek(loc.offset)
                    f.write(data)
        new_manifest = {k: v for k, v in manifest.items() if k not in ("files", "manifest_version")}
        new_manifest["loras"] = [*manifest.get("loras", []), *describe_loras(checked, "apply")]
        write_manifest(tmp, new_manifest)
    return out_path
