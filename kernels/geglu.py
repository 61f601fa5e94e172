"""Fused GEGLU (Shazeer, 2020, "GLU Variants Improve Transformer") in Triton, beside its
torch reference: h · gelu(g) for the two halves of a projection, in one pass.

diffusers' GEGLU (models/activations.py), the activation of every SD U-Net transformer
block's feed-forward, projects to [..., 2·I], splits the result into halves h and g and
returns h * F.gelu(g): two elementwise kernels, the first writing gelu(g) out and the
second reading it back beside h. Here one kernel reads both halves once and writes the
product: reads 2·I and writes I per row, where the two kernels move 5·I (an SD1.5 U-Net
step at 512², batch 2, has 16 such blocks: about 370 MB and 16 launches less).

GELU is the exact one (erf), F.gelu's default, which diffusers' GEGLU uses. The math is in
fp32 with one rounding to x's dtype at the end (torch rounds gelu(g) to x's dtype first).

Layout: x [..., 2·I] with a unit stride on the last dim and rows that collapse to one
stride (anything else is copied first); y [..., I] contiguous, as diffusers' product.
Tiles are [BLOCK_M rows, BLOCK_I columns]: SD's I (1280, 2560, 5120) are multiples of
BLOCK_I on a GPU, so no lane is masked there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._interpreter import INTERPRETED, check_device, round_to_bf16

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1/√2: GELU(g) = g·Φ(g), Φ via erf
# (BLOCK_M, BLOCK_I, warps): a GPU program moves 1024 outputs (8 per thread); the
# interpreter pays per program, so it takes big tiles.
_GPU_TILE = (4, 256, 4)
_INTERPRETER_TILE = (64, 128, 4)


@triton.jit
def _geglu_kernel(
    x_ptr,
    y_ptr,
    M,
    inner,  # I: each half's width
    stride_xm,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    INTERPRETER_BF16: tl.constexpr,  # see _interpreter.py
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < M)[:, None] & (cols < inner)[None, :]
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    h = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_row + inner, mask=mask, other=0.0).to(tl.float32)
    y = h * (0.5 * g * (1.0 + tl.math.erf(g * _SQRT_HALF)))
    if INTERPRETER_BF16:
        y = round_to_bf16(y)
    y_row = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(y_row, y.to(y_ptr.dtype.element_ty), mask=mask)


def check_geglu_args(x: torch.Tensor) -> None:
    """ValueError for input no GEGLU accepts, before any device work."""
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x's last dim must be even (the two halves), got {tuple(x.shape)}")


def geglu(x: torch.Tensor) -> torch.Tensor:
    """h · gelu(g) for x = [h, g] split in halves on its last dim: [..., 2·I] → [..., I]."""
    check_geglu_args(x)
    check_device("x", x)
    if x.dtype not in DTYPES:
        raise ValueError(f"x.dtype must be one of {DTYPES}, got {x.dtype}")
    inner = x.shape[-1] // 2
    y = torch.empty(*x.shape[:-1], inner, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    rows = x.reshape(-1, x.shape[-1])  # a view for the projections' contiguous output
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    y_rows = y.view(-1, inner)
    cuda = x.device.type == "cuda" and not INTERPRETED
    block_m, block_i, warps = _GPU_TILE if cuda else _INTERPRETER_TILE
    block_i = min(block_i, triton.next_power_of_2(inner))
    grid = (triton.cdiv(rows.shape[0], block_m), triton.cdiv(inner, block_i))
    _geglu_kernel[grid](
        rows,
        y_rows,
        rows.shape[0],
        inner,
        rows.stride(0),
        y_rows.stride(0),
        BLOCK_M=block_m,
        BLOCK_I=block_i,
        INTERPRETER_BF16=INTERPRETED and x.dtype == torch.bfloat16,
        num_warps=warps,
    )
    return y


def geglu_ref(x: torch.Tensor) -> torch.Tensor:
    """h · gelu(g) in fp32 (fp64 stays fp64), cast back to x's dtype.

    Bytes: a fused implementation reads x once and writes y once: 1.5 · x.numel() ·
    x.element_size() (the model for the benchmark's GB/s)."""
    check_geglu_args(x)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h, g = x.to(compute).chunk(2, dim=-1)
    return (h * F.gelu(g)).to(x.dtype)
