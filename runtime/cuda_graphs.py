"""CUDA-graph capture, done one way for all of fewstep: `capture`, `GraphedCall`, `signature`.

- `capture(fn, calls, warmup, pool)`: `warmup` eager calls of fn() and then `calls` calls
  captured in one CUDA graph, all on a side stream; what the kernel tuner and the benchmarks
  time (device time without the host's launch cost).
- `GraphedCall(fn, inputs, pool)`: fn(**inputs) captured for one input signature, replayed
  on new inputs of that signature (copied into its static buffers; the output cloned out,
  since the next replay overwrites it); the torch backend keeps one per
  `signature(inputs)`. Each capture is checked once: its replay of the warm-up inputs must
  give what the eager warm-up gave.

How a capture is made, and why:
- the warm-up runs first, on the capturing stream: Triton compiles, cuDNN picks algorithms
  and the caching allocator grows there, and none of that may happen inside a capture;
- `CUDAGraph.capture_begin` directly, not `torch.cuda.graph()`: on entry that one
  synchronizes and empties the caching allocator, which throws away what a warm-up (or a
  tuner timing every op of a model) has just allocated;
- `capture_error_mode="thread_local"`: work other threads queue on the GPU meanwhile (a
  server's other requests) is not an error for this capture;
- `pool`: graphs that share a memory pool (a backend's graphs, replayed one at a time) reuse
  one another's memory; None gives the graph a private pool.

Needs torch with CUDA; imported only where a GPU is used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Captured:
    graph: Any  # torch.cuda.CUDAGraph
    output: Any  # the last captured call's output: each replay rewrites it in place
    warmup_output: Any  # the last eager warm-up call's output (None without a warm-up)


def capture(fn: Callable[[], Any], calls: int = 1, warmup: int = 1, pool: Any = None) -> Captured:
    """`warmup` eager calls of fn(), then `calls` calls captured in one graph (module
    docstring); the current stream waits for both before this returns."""
    import torch

    if calls < 1 or warmup < 0:
        raise ValueError(f"calls must be >= 1 and warmup >= 0, got calls={calls}, warmup={warmup}")
    caller = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(caller)
    warmup_output = output = None
    with torch.cuda.stream(side):
        for _ in range(warmup):
            warmup_output = fn()
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(*(() if pool is None else (pool,)), capture_error_mode="thread_local")
        try:
            for _ in range(calls):
                output = fn()
        finally:
            graph.capture_end()
    caller.wait_stream(side)
    return Captured(graph, output, warmup_output)


def signature(inputs: dict[str, Any]) -> tuple:
    """What a captured graph is specific to: each input's name, shape and dtype."""
    return tuple((name, tuple(t.shape), str(t.dtype)) for name, t in sorted(inputs.items()))


def map_tensors(fn: Callable[[Any], Any], out: Any) -> Any:
    """fn over an output: one tensor, or a dict of them (a text encoder's)."""
    return {k: fn(v) for k, v in out.items()} if isinstance(out, dict) else fn(out)


def max_difference(a: Any, b: Any) -> float:
    """max |a - b| over two outputs of the same call, relative to max |b| (+ 1)."""
    pairs = [(a[k], b[k]) for k in b] if isinstance(b, dict) else [(a, b)]
    return max(float((x - y).abs().max()) / (1.0 + float(y.abs().max())) for x, y in pairs)


class GraphedCall:
    """fn(**inputs) captured for the signature of `inputs` (module docstring).

    `tolerance`: how far the checking replay may differ from the eager warm-up (relative);
    a larger difference is a RuntimeError, and nothing is kept.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        inputs: dict[str, Any],
        pool: Any = None,
        warmup: int = 2,
        tolerance: float = 1e-2,
    ):
        self.signature = signature(inputs)
        self.static_inputs = {name: t.clone() for name, t in inputs.items()}
        captured = capture(lambda: fn(**self.static_inputs), 1, max(warmup, 1), pool)
        self.graph, self.static_output = captured.graph, captured.output
        self.graph.replay()
        difference = max_difference(self.static_output, captured.warmup_output)
        if not difference <= tolerance:
            raise RuntimeError(f"the replay differs from eager by {difference:.3g} (relative)")

    def __call__(self, inputs: dict[str, Any]) -> Any:
        for name, t in inputs.items():
            self.static_inputs[name].copy_(t)
        self.graph.replay()
        return map_tensors(lambda t: t.clone(), self.static_output)
