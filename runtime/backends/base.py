"""The backend contract: run a model's named graphs, nothing else.

The pipeline and samplers never branch on which backend runs. A backend class declares
everything they and the benchmarks use:

- `verify_model(root, check_hashes)`: check the folder it loads from (a model package, or
  the diffusers folder for backends that run its modules) before anything is read from it;
- `run(graph, **inputs)`: one graph (`text_encoder`, `unet`, `vae_decoder`, …) with optimum's
  input and output names, on arrays of the backend's own kind (numpy for onnxruntime and
  openvino, torch tensors on the device for torch);
- `has_graph(graph)`, `input_names(graph)`;
- `array_ops`: the few operations the pipeline applies to those arrays (fewstep.arrays);
- `report()`: what it did besides running graphs (compiles, captures, fused blocks), typed.

Options are constructor keywords (`providers` for onnxruntime, `precision` for openvino,
`device` for torch); `create_backend` refuses one a backend does not take, by name.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Protocol

from fewstep.arrays import ArrayOps

BACKENDS = ("onnxruntime", "openvino", "torch")


class BackendError(RuntimeError):
    """A graph failed to run; the message names the graph and the input shapes."""


@dataclasses.dataclass(frozen=True)
class BackendReport:
    """What a backend did besides running graphs, for benchmarks and logs; empty where a
    backend does no such thing."""

    name: str
    load_ms: float | None = None  # building sessions / loading modules
    # (graph, ((input name, shape), …), seconds) per compiled static shape (openvino)
    compiles: tuple[tuple[str, tuple[tuple[str, tuple[int, ...]], ...], float], ...] = ()
    fused_attention: dict[str, int] = dataclasses.field(default_factory=dict)  # graph → blocks
    captures_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # CUDA graphs
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # the backend's own


class Backend(Protocol):
    name: str
    array_ops: ArrayOps

    @classmethod
    def verify_model(cls, root: Path, check_hashes: bool = True) -> object:
        """PackageError naming the first missing or corrupt file of the folder at `root`."""
        ...

    def run(self, graph: str, **inputs: Any) -> dict[str, Any]:
        """Run one graph and return its outputs by name."""
        ...

    def has_graph(self, graph: str) -> bool: ...

    def input_names(self, graph: str) -> list[str]: ...

    def report(self) -> BackendReport: ...


def describe_inputs(inputs: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}{list(getattr(v, 'shape', ()))}:{getattr(v, 'dtype', type(v).__name__)}"
        for k, v in inputs.items()
    )


def missing_extra_error(module: str, extra: str) -> ImportError:
    return ImportError(
        f"the {module!r} package is needed for this backend: pip install 'fewstep[{extra}]'"
    )


def backend_class(name: str) -> Any:
    """The class of backend `name` (a `Backend`), imported now: each needs its own library."""
    if name == "onnxruntime":
        from fewstep.backends.ort import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "openvino":
        from fewstep.backends.ov import OpenVINOBackend

        return OpenVINOBackend
    if name == "torch":
        from fewstep.backends.torch_backend import TorchBackend

        return TorchBackend
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def check_options(name: str, cls: type, options: dict[str, Any]) -> None:
    """ValueError naming an option backend `name` does not take (`precision` for onnxruntime)
    and the ones it takes, rather than a TypeError from deep inside."""
    accepted = [p for p in inspect.signature(cls).parameters if p != "package_dir"]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ValueError(f"backend {name!r} takes no option {unknown}; it takes {accepted}")


def create_backend(name: str, package_dir: Any, **options: Any) -> Backend:
    """The backend `name` on a model folder; options go to its constructor."""
    cls = backend_class(name)
    check_options(name, cls, options)
    backend: Backend = cls(package_dir, **options)
    return backend
