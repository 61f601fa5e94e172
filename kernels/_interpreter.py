"""Workarounds for Triton's CPU interpreter (TRITON_INTERPRET=1), which CI runs the kernels in.

Triton 3.7's interpreter mishandles bf16 in two places (triton/runtime/interpreter.py):
- `create_dot` calls np.matmul on bf16 operands' uint16 storage, so bf16 dots
  multiply bit patterns, not values;
- fp32 → bf16 casts truncate (`cast_impl` passes no rounding mode), and the
  explicit "rtne" path drops the carry when the mantissa rounds up into an odd
  exponent.
Kernels therefore take a constexpr flag, set only when interpreted and bf16,
that widens bf16 dot operands to fp32 (exact) and rounds with `round_to_bf16`
before a cast to bf16 (which is then exact). Compiled GPU code never takes it.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(x):
    """fp32 x rounded to the nearest bf16 value (ties to even), returned as fp32; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lsb) & 0xFFFF0000
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


# The interpreter replaces @triton.jit with its own class when TRITON_INTERPRET=1 at import.
INTERPRETED = not isinstance(round_to_bf16, triton.runtime.JITFunction)

# Devices the kernels run on: compiled for CUDA GPUs; the interpreter also takes CPU tensors
# (that is how CI runs them).
KERNEL_DEVICES = ("cpu", "cuda") if INTERPRETED else ("cuda",)


def device_problem(x: Any) -> str | None:
    """Why the kernels cannot run on x's device, or None when they can."""
    if x.device.type in KERNEL_DEVICES:
        return None
    hint = "" if INTERPRETED else " (CPU tensors need TRITON_INTERPRET=1 before import)"
    return f"device type {x.device.type} not in {KERNEL_DEVICES}{hint}"


def check_device(name: str, x: Any) -> None:
    """ValueError naming `name` when the kernels cannot run on x's device (see device_problem)."""
    problem = device_problem(x)
    if problem:
        raise ValueError(f"{name}: {problem}")
