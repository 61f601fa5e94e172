"""Per shape, the faster of a kernel and torch's own op, timed on the GPU at first use.

Which is faster depends on the card and the shape, so it is timed where the op runs
rather than fixed here. A tuned op (`tune=True` on the custom ops, `patch(..., tune=True)`,
the torch backend's `kernels="auto"`) times its candidates once per key (the tensors'
shapes, strides, dtypes and device, and the other arguments) and keeps the fastest for the
process, as Triton's autotuner and cuDNN's benchmark mode do. A near tie may go either
way from one process to the next; every candidate computes the op within the kernels'
tolerance (tests/test_kernels.py).

A candidate's time is device time: `CALLS` calls captured in one CUDA graph, replayed
`ROUNDS` times, the fastest replay kept, so host launch cost is out as it is in the torch
backend's graphs. The first call runs outside the capture (Triton compiles, cuDNN picks its
algorithm there). A candidate whose output differs from torch's beyond rounding, or that
raises, is not chosen (why is kept in the report).

Where nothing can be timed (the CPU or Triton's interpreter, during a CUDA graph capture,
under torch.compile's tracing) the first candidate runs, and nothing is stored: the
backend's eager warm-up before its captures is where the timing happens.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._interpreter import INTERPRETED

logger = logging.getLogger("fewstep.kernels")

CALLS = 5  # per captured graph
ROUNDS = 3  # replays timed; the fastest counts


class TensorSignature(NamedTuple):
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclasses.dataclass(frozen=True)
class Choice:
    op: str
    key: tuple
    chosen: str
    times_ms: dict[str, float]  # per call, of each candidate that ran
    failed: dict[str, str]  # the error of each candidate that did not

    def as_dict(self) -> dict[str, Any]:
        """For reports: the tensors' shapes (None for an absent one), dtype, layout."""
        tensors = [k for k in self.key if isinstance(k, TensorSignature)]
        first = tensors[0]
        dense = torch.empty(first.shape, device="meta").stride()
        return {
            "op": self.op,
            "shapes": [list(k.shape) if isinstance(k, TensorSignature) else k for k in self.key],
            "dtype": str(first.dtype).removeprefix("torch."),
            "layout": "dense" if first.stride == dense else "strided",
            "chosen": self.chosen,
            "ms": self.times_ms,
            "failed": self.failed,
        }


_choices: dict[tuple, Choice] = {}
_lock = threading.RLock()  # a candidate that reached a tuned op again would find it held


def signature(*args: Any) -> tuple:
    """A hashable key for a call: each tensor's shape, strides, dtype and device; other
    arguments as they are (None, numbers, strings)."""
    return tuple(
        TensorSignature(tuple(a.shape), a.stride(), a.dtype, a.device)
        if isinstance(a, torch.Tensor)
        else a
        for a in args
    )


def can_time(device: torch.device) -> bool:
    """Whether a call on `device` can be timed now (a compiled CUDA kernel, outside a
    capture)."""
    return (
        device.type == "cuda" and not INTERPRETED and not torch.cuda.is_current_stream_capturing()
    )


def device_time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Device time of one fn() in ms: CALLS calls in a CUDA graph, the fastest of ROUNDS
    replays. fn must be capturable (no host sync, no new allocation outside the caching
    allocator)."""
    from fewstep.cuda_graphs import capture

    with torch.cuda.device(device):
        # one warm-up: compiles, autotunes and picks algorithms, never inside the capture
        graph = capture(fn, calls=CALLS, warmup=1).graph
        stream = torch.cuda.current_stream()
        times = []
        for _ in range(ROUNDS):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / CALLS)
        del graph
    return min(times)


_TF32_EPS = 2.0**-10


class Disagrees(ValueError):
    """A candidate's output is not the reference's (beyond rounding)."""


def check_agrees(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Disagrees unless got equals expected to rounding: max|got − expected| within 16
    ulps of max|expected| (fp32 counted as TF32, in which cuDNN's convolutions and the
    attention kernel multiply fp32). Not a tolerance of the kernels' accuracy
    (tests/test_kernels.py holds them to the same-precision torch op's error): a net for a
    candidate that computes something else on this card (a wrong layout, garbage, NaN)."""
    if got.shape != expected.shape:
        raise Disagrees(f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    relative = 16 * max(torch.finfo(expected.dtype).eps, _TF32_EPS)
    scale = float(expected.float().abs().max())
    error = float((got.float() - expected.float()).abs().max())
    if not error <= relative * scale:  # NaN fails too
        raise Disagrees(f"differs by {error:.3g} where {relative * scale:.3g} is rounding")


def choose(
    op: str,
    key: tuple,
    candidates: dict[str, Callable[[], Any]],
    device: torch.device,
    reference: str,
) -> str:
    """The name of the fastest candidate for (op, key), timed on the first call that can
    be; the first candidate where nothing can be timed. Each must first agree with the
    `reference` candidate (torch's own op; check_agrees)."""
    first = next(iter(candidates))
    if torch.compiler.is_compiling():  # traced code keeps one path
        return first
    known = _choices.get((op, key))
    if known is not None:
        return known.chosen
    if not can_time(device):
        return first
    with _lock:
        known = _choices.get((op, key))  # another thread may have timed it meanwhile
        if known is not None:
            return known.chosen
        times: dict[str, float] = {}
        failed: dict[str, str] = {}
        expected = candidates[reference]()
        for name, fn in candidates.items():
            try:
                with warnings.catch_warnings():  # e.g. SDPA's on a backend that cannot run
                    warnings.simplefilter("ignore")
                    if name != reference:
                        check_agrees(fn(), expected)
                    times[name] = device_time_ms(fn, device)
            except Exception as e:  # e.g. out of resources on this card: not a candidate
                failed[name] = f"{type(e).__name__}: {e}"[:500]
                log = logger.warning if isinstance(e, Disagrees) else logger.info
                log("fewstep::%s: %s is not chosen: %s", op, name, failed[name])
        chosen = min(times, key=times.__getitem__) if times else first
        _choices[(op, key)] = Choice(op, key, chosen, times, failed)
        logger.info("fewstep::%s takes %s for %s (ms per call: %s)", op, chosen, key, times)
    return chosen


def choices() -> list[dict[str, Any]]:
    """Every choice made so far: op, key, the chosen candidate and each one's time."""
    return [c.as_dict() for c in list(_choices.values())]


def clear() -> None:
    """Forget every choice (the next call of each key times again)."""
    _choices.clear()
