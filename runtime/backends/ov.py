"""OpenVINO backend: the package's ONNX graphs on CPUs, fp32 or bf16, compiled per static shape.

Each graph is read once with `openvino.Core().read_model` (the ONNX frontend) at load; a call
reshapes it to the static shapes of its inputs and compiles it for the CPU, and the compiled
model is kept, keyed by (graph, input shapes). Static shapes are what make OpenVINO fast.
Measured on the `fewstep bench` mid U-Net (latents 2x4x64x64, CFG batch, 2 AVX512-BF16 cores,
quiet machine, OpenVINO 2026.4, the variants interleaved in one process), p50 of 8 steps:
    fp32: static 0.99 s vs dynamic 1.36 s (first call 1.08 s vs 1.66 s)
    bf16: static 0.66 s vs dynamic 0.79 s (first call 0.68 s vs 1.10 s)
and compiling either way takes about the same, 1.7-2.0 s.
A pipeline sees few shapes (one per batch and size), so the cost is one compile per new
shape, paid on the first call. Limits: each compiled shape holds its own repacked weights
(about 1.4x the U-Net's size per shape, measured on the mid model) and nothing is evicted,
so a server that takes arbitrary sizes grows by that much per size; the read ov.Model of
each graph stays in memory too, to be reshaped without reading the file again.

Compile options: INFERENCE_PRECISION_HINT f32 or bf16 (always set: OpenVINO's own default on
a CPU with bf16 is bf16, which would make "fp32" silently run bf16), PERFORMANCE_HINT LATENCY,
INFERENCE_NUM_THREADS from `num_threads`. bf16 needs a CPU that reports BF16 in
OPTIMIZATION_CAPABILITIES (AVX512_BF16 or AMX); elsewhere asking for it is a ValueError, not
a quiet fp32 fallback: a fallback would make benchmarks and images claim a precision that
never ran (the user can ask for fp32).

Disk cache (`cache_dir`): OpenVINO's CACHE_DIR, one subfolder per graph named by the sha256 of
that graph's files (from fewstep.json when it lists them, computed otherwise), so a changed
package never lands in an old graph's folder, and stale folders can be deleted by name.
(OpenVINO's own blob key also hashes the weights of the model it compiles, so even a
hand-edited graph behind a stale manifest gets a fresh blob.)

Thread safety: the shape cache is guarded by a lock; compiles are serialized by a second lock
that calls on already compiled shapes never wait for. Each call takes an infer request from
a per-shape pool (creating one when all are busy), so threads never share a request.
Inputs and outputs are float32 numpy arrays whatever the precision (bf16 is internal).
Never imports torch.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.backends.base import BackendError, describe_inputs, missing_extra_error
from fewstep.package import GRAPH_NAMES, REQUIRED_GRAPHS, PackageError, read_manifest, sha256_file

PRECISIONS = ("fp32", "bf16")
_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
_CAPABILITY = {"fp32": "FP32", "bf16": "BF16"}
DEVICE = "CPU"

Shapes = tuple[tuple[str, tuple[int, ...]], ...]


class _Compiled:
    """One compiled static-shape model and its pool of idle infer requests."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.output_names = [o.get_any_name() for o in compiled.outputs]
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            request = self._idle.pop() if self._idle else self.compiled.create_infer_request()
        try:
            # share_outputs=False copies the results out, so the request can be reused.
            result = request.infer(feed, share_inputs=True, share_outputs=False)
            return {
                name: result[port]
                for name, port in zip(self.output_names, self.compiled.outputs, strict=True)
            }
        finally:
            with self._lock:
                self._idle.append(request)


class OpenVINOBackend:
    name = "openvino"

    def __init__(
        self,
        package_dir: str | Path,
        precision: str = "fp32",
        num_threads: int | None = None,
        cache_dir: str | Path | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
        ):
            raise ValueError(f"num_threads must be an integer >= 1 or None, got {num_threads!r}")
        try:
            import openvino as ov
        except ImportError as e:
            raise missing_extra_error("openvino", "openvino") from e
        self._core = ov.Core()
        capabilities = list(self._core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
        if _CAPABILITY[precision] not in capabilities:
            supported = [p for p in PRECISIONS if _CAPABILITY[p] in capabilities]
            raise ValueError(
                f"precision {precision!r} is not supported by this CPU "
                f"({self._core.get_property(DEVICE, 'FULL_DEVICE_NAME')}); it supports "
                f"{supported} (OPTIMIZATION_CAPABILITIES {capabilities})"
            )
        self.root = Path(package_dir)
        self.precision = precision
        self.num_threads = num_threads
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _PRECISION_HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if num_threads is not None:
            self.config["INFERENCE_NUM_THREADS"] = num_threads
        self._manifest = read_manifest(self.root) if (self.root / "fewstep.json").exists() else None
        self._models: dict[str, Any] = {}  # graph -> ov.Model, reshaped in place per compile
        self._input_types: dict[str, dict[str, np.dtype]] = {}
        self._cache: dict[tuple[str, Shapes], _Compiled] = {}
        self._lock = threading.Lock()  # guards _models, _input_types and _cache
        self._compile_lock = threading.Lock()  # one reshape + compile at a time
        # (graph, input shapes, seconds) of every compile, for tests and the benchmark.
        self.compile_log: list[tuple[str, Shapes, float]] = []
        for graph in REQUIRED_GRAPHS:
            self._load(graph)

    # -- package -----------------------------------------------------------------------------

    def _load(self, graph: str) -> Any:
        path = self.root / graph / "model.onnx"
        if not path.is_file():
            raise PackageError(f"missing package file: {path}")
        try:
            model = self._core.read_model(str(path))
        except Exception as e:  # OpenVINO raises its own exception types
            raise PackageError(f"corrupt package file {path}: {e}") from e
        types = {p.get_any_name(): np.dtype(p.get_element_type().to_dtype()) for p in model.inputs}
        self._input_types[graph] = types
        self._models[graph] = model
        return model

    def has_graph(self, graph: str) -> bool:
        return graph in self._models or (self.root / graph / "model.onnx").is_file()

    def input_names(self, graph: str) -> list[str]:
        self._model(graph)
        return list(self._input_types[graph])

    def _model(self, graph: str) -> Any:
        model = self._models.get(graph)
        if model is None:
            if graph not in GRAPH_NAMES:
                raise ValueError(f"graph must be one of {GRAPH_NAMES}, got {graph!r}")
            with self._lock:
                model = self._models.get(graph) or self._load(graph)
        return model

    def cache_key(self, graph: str) -> str:
        """Name of `graph`'s disk-cache subfolder: `<graph>-<sha256 of its files, 16 hex>`.

        The hashes come from fewstep.json when it lists the graph's files (Pipeline checks
        them on load), otherwise they are computed, so optimum packages get a key too.
        """
        listed = (self._manifest or {}).get("files", {})
        prefix = f"{graph}/"
        hashes = {rel: sha for rel, sha in listed.items() if rel.startswith(prefix)}
        if f"{graph}/model.onnx" not in hashes:
            folder = self.root / graph
            hashes = {
                p.relative_to(self.root).as_posix(): sha256_file(p)
                for p in sorted(folder.rglob("*"))
                if p.is_file()
            }
        digest = hashlib.sha256()
        for rel in sorted(hashes):
            digest.update(f"{rel}\0{hashes[rel]}\n".encode())
        return f"{graph}-{digest.hexdigest()[:16]}"

    # -- compile per static shape ------------------------------------------------------------

    def _compile(self, graph: str, shapes: Shapes) -> _Compiled:
        model = self._model(graph)
        config = dict(self.config)
        if self.cache_dir is not None:
            folder = self.cache_dir / self.cache_key(graph)
            folder.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(folder)
        t0 = time.perf_counter()
        model.reshape({name: list(shape) for name, shape in shapes})
        compiled = self._core.compile_model(model, DEVICE, config)
        self.compile_log.append((graph, shapes, time.perf_counter() - t0))
        return _Compiled(compiled)

    def _compiled(self, graph: str, shapes: Shapes) -> _Compiled:
        key = (graph, shapes)
        with self._lock:
            entry = self._cache.get(key)
        if entry is not None:
            return entry
        with self._compile_lock:
            with self._lock:
                entry = self._cache.get(key)
            if entry is None:
                entry = self._compile(graph, shapes)
                with self._lock:
                    self._cache[key] = entry
        return entry

    def compiled(self, graph: str) -> dict[Shapes, Any]:
        """`graph`'s compiled models so far (openvino CompiledModel), by static input shapes."""
        with self._lock:
            return {shapes: c.compiled for (g, shapes), c in self._cache.items() if g == graph}

    # -- run ---------------------------------------------------------------------------------

    def run(self, graph: str, **inputs: Any) -> dict[str, np.ndarray]:
        self._model(graph)
        types = self._input_types[graph]
        feed = {}
        for name, value in inputs.items():
            if name not in types:
                raise BackendError(f"{graph} has no input {name!r}; it takes {list(types)}")
            array = np.asarray(value, dtype=types[name])
            # (not np.ascontiguousarray: it turns the 0-d timestep into shape [1])
            feed[name] = array if array.flags.c_contiguous else array.copy(order="C")
        missing = [name for name in types if name not in feed]
        if missing:
            raise BackendError(
                f"{graph} needs input(s) {missing}; got {describe_inputs(feed)}; "
                f"it takes {list(types)}"
            )
        shapes = tuple((name, tuple(feed[name].shape)) for name in types)
        try:
            return self._compiled(graph, shapes).infer(feed)
        except Exception as e:
            raise BackendError(f"{graph} failed on inputs {describe_inputs(feed)}: {e}") from e
