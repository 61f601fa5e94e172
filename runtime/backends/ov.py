"""OpenVINO backend: the package's ONNX graphs on CPUs, fp32 or bf16, compiled per static shape.

Each graph is read once with `openvino.Core().read_model` (the ONNX frontend) at load; a call
reshapes it to the static shapes of its inputs and compiles it for the CPU, and the compiled
model is kept, keyed by (graph, input shapes). Static shapes are what make OpenVINO fast: a
static U-Net step ran faster than the same graph compiled with dynamic shapes, in fp32 and in
bf16, and compiling took about as long either way (docs/reference.md#openvino-static-shapes).
A pipeline sees few shapes (one per batch and size), so the cost is one compile per new
shape, paid on the first call. Each compiled shape holds its own repacked weights and
buffers: more than the graph's weight files per shape, and on small models, where buffers
dominate, several times them, growing with the size
(docs/reference.md#openvino-compiled-shape-memory). The read ov.Model of each graph stays in
memory too, to be reshaped without reading the file again.

Bounded cache (`max_compiled_shapes`, default 8): each graph keeps at most that many compiled
shapes and evicts the least recently used one when a new shape compiles, so a server that
takes arbitrary sizes stays bounded. The price of a miss is a recompile, as long as the first
compile of that shape (a disk-cache blob, when `cache_dir` is set, shortens it). None keeps
every shape (unbounded growth, for a known small set of sizes); 0 is refused (it would
recompile on every call). An evicted model's idle infer requests are dropped at once; a
call already running on it holds a reference and finishes normally, and the memory goes
when the last such call returns.

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

Thread safety: the shape cache (and its LRU order) is guarded by a lock; compiles are
serialized by a second lock that calls on already compiled shapes never wait for. Each call
takes an infer request from a per-shape pool (creating one when all are busy), so threads
never share a request. Inputs and outputs are float32 numpy arrays whatever the precision
(bf16 is internal) and whatever the package: an fp16 package's outputs are cast to float32,
as on onnxruntime.
Never imports torch.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.arrays import NUMPY_OPS
from fewstep.backends.base import BackendError, BackendReport, describe_inputs, missing_extra_error
from fewstep.package import (
    GRAPH_NAMES,
    ONNX_GRAPH,
    OPENVINO_GRAPH,
    REQUIRED_GRAPHS,
    PackageError,
    graph_file,
    read_manifest,
    sha256_file,
    verify_package,
)

PRECISIONS = ("fp32", "bf16")
_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
_CAPABILITY = {"fp32": "FP32", "bf16": "BF16"}
DEVICE = "CPU"
DEFAULT_MAX_COMPILED_SHAPES = 8

Shapes = tuple[tuple[str, tuple[int, ...]], ...]


def as_float32(array: np.ndarray) -> np.ndarray:
    """fp16 outputs (of an fp16 package's graphs) as float32, so the sampler math runs in
    one precision whatever the package, as on onnxruntime."""
    return array.astype(np.float32) if array.dtype == np.float16 else array


class _Compiled:
    """One compiled static-shape model and its pool of idle infer requests."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.output_names = [o.get_any_name() for o in compiled.outputs]
        self._idle: list[Any] = []
        self._evicted = False
        self._lock = threading.Lock()

    def evict(self) -> None:
        """Drop the idle requests; calls in flight finish and drop theirs (see `infer`)."""
        with self._lock:
            self._evicted = True
            self._idle.clear()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            request = self._idle.pop() if self._idle else self.compiled.create_infer_request()
        try:
            # share_outputs=False copies the results out, so the request can be reused.
            result = request.infer(feed, share_inputs=True, share_outputs=False)
            return {
                name: as_float32(result[port])
                for name, port in zip(self.output_names, self.compiled.outputs, strict=True)
            }
        finally:
            with self._lock:
                if not self._evicted:  # an evicted model's requests go with it
                    self._idle.append(request)


class OpenVINOBackend:
    name = "openvino"
    array_ops = NUMPY_OPS
    verify_model = staticmethod(verify_package)

    def __init__(
        self,
        package_dir: str | Path,
        precision: str = "fp32",
        num_threads: int | None = None,
        cache_dir: str | Path | None = None,
        max_compiled_shapes: int | None = DEFAULT_MAX_COMPILED_SHAPES,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
        ):
            raise ValueError(f"num_threads must be an integer >= 1 or None, got {num_threads!r}")
        if max_compiled_shapes is not None and (
            isinstance(max_compiled_shapes, bool)
            or not isinstance(max_compiled_shapes, int)
            or max_compiled_shapes < 1
        ):
            raise ValueError(
                f"max_compiled_shapes must be an integer >= 1 or None (no limit), "
                f"got {max_compiled_shapes!r}"
            )
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
        self.max_compiled_shapes = max_compiled_shapes
        self.config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _PRECISION_HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if num_threads is not None:
            self.config["INFERENCE_NUM_THREADS"] = num_threads
        self._manifest = read_manifest(self.root) if (self.root / "fewstep.json").exists() else None
        self._models: dict[str, Any] = {}  # graph -> ov.Model, reshaped in place per compile
        self._input_types: dict[str, dict[str, np.dtype]] = {}
        # graph -> its compiled shapes, least recently used first
        self._cache: dict[str, OrderedDict[Shapes, _Compiled]] = {}
        self._lock = threading.Lock()  # guards _models, _input_types and _cache
        self._compile_lock = threading.Lock()  # one reshape + compile at a time
        # (graph, input shapes, seconds) of every compile, for tests and the benchmark.
        self.compile_log: list[tuple[str, Shapes, float]] = []
        t0 = time.perf_counter()
        for graph in REQUIRED_GRAPHS:
            self._load(graph)
        self.load_ms = (time.perf_counter() - t0) * 1e3

    # -- package -----------------------------------------------------------------------------

    def _load(self, graph: str) -> Any:
        path = graph_file(self.root, graph)  # ONNX, or the IR of an int8 package's U-Net
        if path is None:
            raise PackageError(f"missing package file: {self.root / graph / ONNX_GRAPH}")
        try:
            model = self._core.read_model(str(path))
        except Exception as e:  # OpenVINO raises its own exception types
            raise PackageError(f"corrupt package file {path}: {e}") from e
        types = {p.get_any_name(): np.dtype(p.get_element_type().to_dtype()) for p in model.inputs}
        self._input_types[graph] = types
        self._models[graph] = model
        return model

    def report(self) -> BackendReport:
        return BackendReport(self.name, load_ms=self.load_ms, compiles=tuple(self.compile_log))

    def has_graph(self, graph: str) -> bool:
        return graph in self._models or graph_file(self.root, graph) is not None

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
        if not any(f"{graph}/{name}" in hashes for name in (ONNX_GRAPH, OPENVINO_GRAPH)):
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
        """The compiled model for these shapes: cached (now the most recently used) or new."""
        entry = self._cached(graph, shapes)
        if entry is not None:
            return entry
        with self._compile_lock:
            entry = self._cached(graph, shapes)
            if entry is None:
                entry = self._compile(graph, shapes)
                self._add(graph, shapes, entry)
        return entry

    def _cached(self, graph: str, shapes: Shapes) -> _Compiled | None:
        with self._lock:
            by_shapes = self._cache.get(graph)
            if by_shapes is None or shapes not in by_shapes:
                return None
            by_shapes.move_to_end(shapes)
            return by_shapes[shapes]

    def _add(self, graph: str, shapes: Shapes, entry: _Compiled) -> None:
        """Cache `entry`, evicting `graph`'s least recently used shapes beyond the limit."""
        evicted = []
        with self._lock:
            by_shapes = self._cache.setdefault(graph, OrderedDict())
            by_shapes[shapes] = entry
            limit = self.max_compiled_shapes
            while limit is not None and len(by_shapes) > limit:
                evicted.append(by_shapes.popitem(last=False)[1])
        for old in evicted:
            old.evict()

    def compiled(self, graph: str) -> dict[Shapes, Any]:
        """`graph`'s cached compiled models (openvino CompiledModel) by static input shapes,
        least recently used first."""
        with self._lock:
            by_shapes = self._cache.get(graph, OrderedDict())
            return {shapes: c.compiled for shapes, c in by_shapes.items()}

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
