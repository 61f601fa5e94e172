"""The backend protocol: run a package's named graphs, nothing else.

The pipeline and samplers never branch on which backend runs; a backend takes
and returns arrays of its own kind (numpy for onnxruntime, torch tensors on the
device for torch) keyed by the optimum input/output names, and declares the
operations on them as `array_ops` (fewstep.arrays; numpy when absent).
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

BACKENDS = ("onnxruntime", "openvino", "torch")
# Backends that run a diffusers folder's modules rather than a package's graphs.
SOURCE_FOLDER_BACKENDS = ("torch",)


class BackendError(RuntimeError):
    """A graph failed to run; the message names the graph and the input shapes."""


class Backend(Protocol):
    name: str

    def run(self, graph: str, **inputs: Any) -> dict[str, Any]:
        """Run one graph (`text_encoder`, `unet`, `vae_decoder`, …) and return its outputs."""
        ...

    def has_graph(self, graph: str) -> bool: ...


def describe_inputs(inputs: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}{list(getattr(v, 'shape', ()))}:{getattr(v, 'dtype', type(v).__name__)}"
        for k, v in inputs.items()
    )


def missing_extra_error(module: str, extra: str) -> ImportError:
    return ImportError(
        f"the {module!r} package is needed for this backend: pip install 'fewstep[{extra}]'"
    )


def _backend_class(name: str) -> Any:
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


def create_backend(name: str, package_dir: Any, **options: Any) -> Backend:
    """The backend `name` on a package; options go to its constructor.

    An option the backend does not take (`precision` for onnxruntime) is a ValueError naming
    it and the options that backend takes, rather than a TypeError from deep inside.
    """
    cls = _backend_class(name)
    accepted = [p for p in inspect.signature(cls).parameters if p != "package_dir"]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ValueError(f"backend {name!r} takes no option {unknown}; it takes {accepted}")
    backend: Backend = cls(package_dir, **options)
    return backend
