"""onnxruntime backend: runs the package's ONNX graphs (CPU, or CUDA/TensorRT providers).

Sessions are created once per graph at load (the VAE encoder lazily, since only
img2img needs it) and are safe to call from several threads: InferenceSession.run
holds no per-call state. Float inputs are cast to the dtype each graph declares,
so fp16 packages take the same float32 arrays as fp32 ones.

LoRAs (`loras=[(path, scale), …]`) are folded at load without touching the package: the
folded initializers (fewstep.lora, computed from the files' pristine values) go into an
in-memory copy of the graph's bytes, or, for weights kept in external data, into
`SessionOptions.add_external_initializers`. Not `add_initializer`: onnxruntime ignores it
for Conv weights at the default optimisation level (fewstep.lora.onnx_package explains).

On the CPU provider, the attention of the U-Net and VAE graphs runs as onnxruntime's fused
MultiHeadAttention (flash attention; `fuse_attention=False` runs the graphs as written):
the rewrite is made in memory at load (fewstep.backends.ort_attention), the package is
untouched.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.arrays import NUMPY_OPS
from fewstep.backends.base import BackendError, BackendReport, describe_inputs, missing_extra_error
from fewstep.package import (
    GRAPH_NAMES,
    ONNX_GRAPH,
    REQUIRED_GRAPHS,
    PackageError,
    graph_file,
    verify_package,
)

_ATTENTION_GRAPHS = ("unet", "vae_decoder", "vae_encoder")
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class OnnxRuntimeBackend:
    name = "onnxruntime"
    array_ops = NUMPY_OPS
    verify_model = staticmethod(verify_package)

    def __init__(
        self,
        package_dir: str | Path,
        providers: list[Any] | None = None,
        intra_op_num_threads: int | None = None,
        loras: list[Any] | None = None,
        fuse_attention: bool = True,
    ):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise missing_extra_error("onnxruntime", "onnx") from e
        self._ort = ort
        self.root = Path(package_dir)
        self.providers = providers or ["CPUExecutionProvider"]
        # The contrib op's CUDA kernels are not tested here: fuse for the CPU provider only.
        self._fuse_attention = fuse_attention and all(
            (p if isinstance(p, str) else p[0]) == "CPUExecutionProvider" for p in self.providers
        )
        self.fused_attention: dict[str, int] = {}  # graph → attention blocks fused
        self._intra_op_num_threads = intra_op_num_threads
        self._options = self._session_options()
        self._initializers: dict[str, dict[str, Any]] = {}
        self._ort_values: list[Any] = []
        if loras:
            from fewstep.lora import lora_initializers

            self._initializers = lora_initializers(self.root, loras)
        self._sessions: dict[str, Any] = {}
        self._input_types: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        t0 = time.perf_counter()
        for graph in REQUIRED_GRAPHS:
            self._load(graph)
        self.load_ms = (time.perf_counter() - t0) * 1e3

    def _session_options(self) -> Any:
        options = self._ort.SessionOptions()
        # The memory pattern (one block planned from the first run, allocated on the second)
        # costs more than it saves here: on the CPU it nearly doubled a 512² U-Net's peak
        # memory and slowed its second step, with steady steps no faster
        # (docs/reference.md#onnxruntime-memory-pattern).
        options.enable_mem_pattern = False
        if self._intra_op_num_threads:
            options.intra_op_num_threads = self._intra_op_num_threads
        return options

    def _load(self, graph: str) -> Any:
        path = self.root / graph / ONNX_GRAPH
        if not path.is_file():
            openvino_only = graph_file(self.root, graph)
            if openvino_only is not None:
                raise PackageError(
                    f"{openvino_only}: this package's {graph} is an OpenVINO graph (an int8 "
                    "package from `fewstep quantize`), which only the openvino backend runs; "
                    "load it with backend='openvino'"
                )
            raise PackageError(f"missing package file: {path}")
        model: str | bytes = str(path)
        options = self._options
        patched: bytes | None = None
        external: dict[str, np.ndarray] = {}
        if graph in self._initializers:
            from fewstep.lora.onnx_package import patched_model

            patched, external = patched_model(path, self._initializers.pop(graph))
        if self._fuse_attention and graph in _ATTENTION_GRAPHS:
            from fewstep.backends.ort_attention import fuse_attention

            try:
                fused, count = fuse_attention(patched or path.read_bytes(), path)
            except PackageError:
                raise  # external data out of the package: named, never loaded
            except (ValueError, IndexError, UnicodeDecodeError):
                fused, count = b"", 0  # not a readable graph: onnxruntime reports it below
            if count:
                patched = fused
            self.fused_attention[graph] = count
        if patched is not None or external:
            options = self._session_options()
        if patched is not None:
            model = patched
            # A graph given as bytes finds its external data file through this entry.
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(path.parent)
            )
        if external:
            # The OrtValues wrap the arrays without copying: keep both alive.
            ort_values = [self._ort.OrtValue.ortvalue_from_numpy(v) for v in external.values()]
            self._ort_values.append((external, ort_values))
            options.add_external_initializers(list(external), ort_values)
        try:
            session = self._ort.InferenceSession(
                model, sess_options=options, providers=self.providers
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise PackageError(f"corrupt package file {path}: {e}") from e
        self._input_types[graph] = {i.name: _ORT_TYPES.get(i.type) for i in session.get_inputs()}
        self._sessions[graph] = session
        return session

    def report(self) -> BackendReport:
        return BackendReport(
            self.name, load_ms=self.load_ms, fused_attention=dict(self.fused_attention)
        )

    def has_graph(self, graph: str) -> bool:
        return graph in self._sessions or (self.root / graph / ONNX_GRAPH).is_file()

    def input_names(self, graph: str) -> list[str]:
        self._session(graph)
        return list(self._input_types[graph])

    def _session(self, graph: str) -> Any:
        session = self._sessions.get(graph)
        if session is None:
            if graph not in GRAPH_NAMES:
                raise ValueError(f"graph must be one of {GRAPH_NAMES}, got {graph!r}")
            with self._lock:
                session = self._sessions.get(graph) or self._load(graph)
        return session

    def run(self, graph: str, **inputs: Any) -> dict[str, np.ndarray]:
        session = self._session(graph)
        types = self._input_types[graph]
        feed = {}
        for name, value in inputs.items():
            if name not in types:
                raise BackendError(f"{graph} has no input {name!r}; it takes {list(types)}")
            array = np.asarray(value)
            wanted = types[name]
            feed[name] = array.astype(wanted, copy=False) if wanted is not None else array
        try:
            outputs = session.run(None, feed)
        except Exception as e:
            raise BackendError(f"{graph} failed on inputs {describe_inputs(feed)}: {e}") from e
        names = [o.name for o in session.get_outputs()]
        # fp16 graphs hand back float32 so the sampler math runs in one precision.
        return {
            n: o.astype(np.float32) if o.dtype == np.float16 else o
            for n, o in zip(names, outputs, strict=True)
        }
