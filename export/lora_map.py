"""`<graph>/lora_map.json`: which ONNX initializer holds which torch weight, found by value.

The TorchScript exporter stores a Linear that became a MatMul as its transpose under a
generated name (`onnx::MatMul_1627`); conv and Gemm weights keep their parameter names. Rather
than rely on those naming habits, this matches bytes: every float initializer of 2 or more
dimensions is hashed, and every 2-D/4-D parameter of the exported module is looked up as
stored and (2-D) transposed; a hit is confirmed by comparing the values. The result is exact
for whatever exporter wrote the graph. Initializers are read one at a time and only their
digests kept (a hit reads its initializer again), so an SDXL U-Net's 10 GB of weights are
never held a second time beside the torch module. Parameters with no hit (constant folding
merged them into something else) are listed as `unmapped`; a LoRA on one of them is an error at
fold time.
Equal parameters share one initializer (torch.onnx deduplicates by value); both names then map
to it, and `fewstep.lora` refuses to fold into a shared one.

Written for the graphs LoRAs fold into (`fewstep.lora.LORA_GRAPHS`: unet, text_encoder and
SDXL's text_encoder_2). The runtime reads the map in `fewstep.lora.onnx_package` (which also
derives one from the graph for packages that have none).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.lora.onnx_package import (
    LORA_MAP_NAME,
    MODEL_NAME,
    MappedWeight,
    lora_map_json,
    module_weight_name,
)
from fewstep.onnx_proto import read_onnx_index

_FLOAT_TYPES = (1, 10, 11)  # float32, float16, float64


def _digest(array: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    data = np.ascontiguousarray(array)
    # hashes the array's own buffer: no bytes copy
    return data.dtype.str, data.shape, hashlib.blake2b(data.data, digest_size=16).digest()


def match_initializers(graph: str, module: Any, onnx_path: Path) -> tuple[dict, list[str]]:
    """({weight name: MappedWeight}, unmapped weight names) for `module` exported to onnx_path.

    `module` is the exported wrapper (fewstep.export.graphs): its parameter names start with
    the attribute holding the graph's component (`unet.…`, `text_encoder.…`, and
    `text_encoder.…` for text_encoder_2 as well), which `module_weight_name` drops.
    """
    index = read_onnx_index(onnx_path)
    by_value: dict[tuple, list[str]] = {}  # digest -> initializer names
    for name, loc in index.initializers.items():
        if loc.data_type in _FLOAT_TYPES and len(loc.shape) >= 2 and loc.offset >= 0:
            by_value.setdefault(_digest(loc.read()), []).append(name)
    weights: dict[str, MappedWeight] = {}
    unmapped: list[str] = []
    for param_name, param in module.named_parameters():
        if param.ndim not in (2, 4):
            continue
        name = module_weight_name(graph, param_name)
        value = param.detach().cpu().numpy()
        orientations = [(value, False)] + ([(value.T, True)] if value.ndim == 2 else [])
        hit = None
        for candidate, transposed in orientations:
            for init_name in by_value.get(_digest(candidate), []):
                if np.array_equal(index.initializers[init_name].read(), candidate):
                    hit = MappedWeight(init_name, transposed)
                    break
            if hit:
                break
        if hit is None:
            unmapped.append(name)
        else:
            weights[name] = hit
    return weights, unmapped


def write_lora_map(graph_dir: Path, graph: str, module: Any) -> Path:
    """Write `graph_dir/lora_map.json` for the module exported to `graph_dir/model.onnx`."""
    weights, unmapped = match_initializers(graph, module, graph_dir / MODEL_NAME)
    path = graph_dir / LORA_MAP_NAME
    path.write_text(
        lora_map_json(
            graph,
            weights,
            method="exported initializer values matched against the torch parameters",
            unmapped=sorted(unmapped),
        )
    )
    return path
