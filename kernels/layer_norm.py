"""LayerNorm over the last dim in Triton, beside its torch reference.

Every transformer block of an SD U-Net normalizes its tokens three times (norm1, norm2,
norm3: nn.LayerNorm over 320, 640 or 1280 channels), 48 LayerNorms per SD1.5 step, and
torch's kernel moves rows this short well below a copy's rate (measured on an H200, see
benchmarks/results/gpu-suite-h200.json). Here a program normalizes BLOCK_M whole
rows held in registers: x read once, y written once, statistics in fp32 as a two-pass
over the registers (mean, then the centred sum of squares; never E[x²] − E[x]²), one
rounding to x's dtype at the end.

The row width N is a compile-time constant (one compile per width; SD has three), so a
row's mask is known and loads and stores are vectors. Rows may be strided (a unit stride
inside a row); y is contiguous. Rows wider than MAX_WIDTH are left to torch (ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._interpreter import INTERPRETED, check_device, round_to_bf16

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_WIDTH = 8192  # one row in registers: 8192 fp32 over 8 warps is 32 per thread
# Elements per program on a GPU (whole rows: BLOCK_M = this // BLOCK_N, at least 1); the
# interpreter pays per program, so it takes many rows at once.
_GPU_TILE = 4096
_INTERPRETER_ROWS = 64


@triton.jit
def _layer_norm_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    M,
    N: tl.constexpr,  # the row width: a constant, so the row mask is known and loads are vectors
    stride_xm,
    stride_ym,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRETER_BF16: tl.constexpr,  # see _interpreter.py
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask_n = cols < N
    mask = (rows < M)[:, None] & mask_n[None, :]
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    centred = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / N  # biased, as torch
    # IEEE sqrt and division (tl.sqrt / '/' may be approximate on GPU); [BLOCK_M], so free.
    rstd = tl.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), tl.sqrt_rn(var + eps))
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if INTERPRETER_BF16:
        y = round_to_bf16(y)
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * stride_ym
    tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def check_layer_norm_args(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> None:
    """ValueError for input no LayerNorm over the last dim accepts, before any device work."""
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dim, got {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (x.shape[-1],):
            raise ValueError(f"{name} must have shape ({x.shape[-1]},), got {tuple(t.shape)}")


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """F.layer_norm(x, (x.shape[-1],), weight, bias, eps), fused: [..., N] → [..., N]."""
    check_layer_norm_args(x, weight, bias)
    check_device("x", x)
    if x.dtype not in DTYPES:
        raise ValueError(f"x.dtype must be one of {DTYPES}, got {x.dtype}")
    width = x.shape[-1]
    if width > MAX_WIDTH:
        raise ValueError(f"rows wider than {MAX_WIDTH} are not supported, got {width}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    rows = x.reshape(-1, width)  # a view for contiguous tokens
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    y_rows = y.view(-1, width)
    block_n = triton.next_power_of_2(width)
    cuda = x.device.type == "cuda" and not INTERPRETED
    block_m = max(1, _GPU_TILE // block_n) if cuda else _INTERPRETER_ROWS
    warps = 8 if block_n >= 4096 else 4
    _layer_norm_kernel[(triton.cdiv(rows.shape[0], block_m),)](
        rows,
        y_rows,
        weight if weight is not None else rows,
        bias if bias is not None else rows,
        rows.shape[0],
        width,
        rows.stride(0),
        y_rows.stride(0),
        eps,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        INTERPRETER_BF16=INTERPRETED and x.dtype == torch.bfloat16,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
    )
    return y


def layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """torch's LayerNorm over the last dim in fp32 (fp64 stays fp64), cast back to x's dtype.

    Bytes: a fused implementation reads x once and writes y once: 2 · x.numel() ·
    x.element_size() (the model for the benchmark's GB/s)."""
    check_layer_norm_args(x, weight, bias)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32

    def up(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(compute)

    y = F.layer_norm(x.to(compute), (x.shape[-1],), up(weight), up(bias), eps)
    return y.to(x.dtype)
