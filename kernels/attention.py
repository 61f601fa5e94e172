"""Fused attention forward (flash-style, online softmax) in Triton, beside its torch reference.

Follows FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster Attention with
Better Parallelism and Work Partitioning", Algorithm 1, forward pass): one
program per (query block, batch·head); it walks the keys in blocks, keeping a
running row max m, row sum l and unnormalized output acc in fp32, rescaling by
exp(m_old − m_new), and divides by l once at the end. The loop structure is
that of Triton's fused-attention tutorial (python/tutorials/06-fused-attention.py):
exp2 with log2(e) folded into the scale, P cast to V's dtype for the P·V dot.

Shapes are SDPA's: q [B, H, L_q, D], k and v [B, H, L_kv, D], out [B, H, L_q, D],
any strides with a unit stride on D (so the transposed views diffusers makes,
[B, L, H, D] → [B, H, L, D], load without a copy). The output takes q's layout
(`torch.empty_like`).

Deviations and limits:
- No mask, no dropout, no causal path (SD's U-Net attention has none). Cross
  attention's 77 keys are handled by masking the tail of the last key block.
- The head dim is covered by two power-of-2 blocks, BLOCK_D + BLOCK_DR, each a
  separate dot (`head_dim_blocks`): SD's 80 = 64 + 16 and 160 = 128 + 32 exactly,
  40 = 32 + 16 with 8 masked lanes, where one padded block (64, 128, 256) would
  spend 37.5% of the dots' FLOPs on zeros. Padded lanes cost FLOPs, not bytes. D ≤ 256.
  D is a compile-time constant (one compile per head dim; SD has four): its lane mask
  is then known to change only every 8 lanes, so the masked block's K and V tiles reach
  shared memory by the same asynchronous copies as the others (with D a runtime
  argument they would go through registers inside the key loop, costing registers).
- fp32 inputs use IEEE fp32 dots (no TF32), to match torch's fp32 default.
- In Triton's interpreter, bf16 dot operands are widened to fp32 and bf16
  rounding is done by hand (INTERPRETER_BF16; why: _interpreter.py).
- Forward only; no log-sum-exp is saved.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from ._interpreter import INTERPRETED, check_device, round_to_bf16
from .tuning import device_time_ms

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


@triton.jit
def _load_block(base, offs_a, stride_a, offs_b, stride_b, mask_a, mask_b, WIDEN: tl.constexpr):
    """The [len(offs_a), len(offs_b)] block at base + a·stride_a + b·stride_b, 0 where masked;
    widened to fp32 when WIDEN (INTERPRETER_BF16, see _interpreter.py)."""
    block = tl.load(
        base + offs_a[:, None] * stride_a + offs_b[None, :] * stride_b,
        mask=mask_a[:, None] & mask_b[None, :],
        other=0.0,
    )
    if WIDEN:
        block = block.to(tl.float32)
    return block


@triton.jit
def _store_output(
    base, offs_m, stride_m, offs_d, mask_m, mask_d, acc, l_i, ROUND_BF16: tl.constexpr
):
    """acc / l_i (FlashAttention-2, Alg. 1 line 12) stored at base + m·stride_m + d, in base's
    dtype (rounded to bf16 by hand when ROUND_BF16, see _interpreter.py)."""
    out = acc / l_i[:, None]
    if ROUND_BF16:
        out = round_to_bf16(out)
    tl.store(
        base + offs_m[:, None] * stride_m + offs_d[None, :],
        out.to(base.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


@triton.jit
def _attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    H,
    L_Q,
    L_KV,
    D: tl.constexpr,  # the head dim: a constant, so its masks are known per 8 lanes
    qk_scale,  # softmax scale · log2(e): scores live in the exp2 domain
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # head-dim lanes [0, BLOCK_D)
    BLOCK_DR: tl.constexpr,  # the rest, lanes [BLOCK_D, BLOCK_D + BLOCK_DR); 0: none
    DOT_PRECISION: tl.constexpr,
    INTERPRETER_BF16: tl.constexpr,  # see _interpreter.py
    EVEN_N: tl.constexpr,  # L_KV % BLOCK_N == 0: no key block needs a mask
    EVEN_D: tl.constexpr,  # D == BLOCK_D + BLOCK_DR: no head-dim padding to mask
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    o_base = o_ptr + b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < L_Q
    # With a rest block, BLOCK_D <= D (head_dim_blocks), so only the rest has padding.
    mask_d = tl.full([BLOCK_D], 1, tl.int1) if EVEN_D or BLOCK_DR > 0 else offs_d < D

    # [BLOCK_M, BLOCK_D]; padded rows and head-dim lanes are 0, so they add 0 to QKᵀ.
    q = _load_block(q_base, offs_m, stride_qm, offs_d, 1, mask_m, mask_d, INTERPRETER_BF16)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if BLOCK_DR > 0:  # the same for the rest of the head dim (a compile-time branch)
        offs_dr = BLOCK_D + tl.arange(0, BLOCK_DR)
        mask_dr = (offs_dr < D) if not EVEN_D else tl.full([BLOCK_DR], 1, tl.int1)
        q_r = _load_block(q_base, offs_m, stride_qm, offs_dr, 1, mask_m, mask_dr, INTERPRETER_BF16)
        acc_r = tl.zeros([BLOCK_M, BLOCK_DR], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, L_KV, BLOCK_N):
        offs_kv = start_n + offs_n
        mask_n = (offs_kv < L_KV) if not EVEN_N else tl.full([BLOCK_N], 1, tl.int1)
        # Kᵀ block [BLOCK_D, BLOCK_N]
        k = _load_block(k_base, offs_d, 1, offs_kv, stride_kn, mask_d, mask_n, INTERPRETER_BF16)
        s = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        if BLOCK_DR > 0:
            k_r = _load_block(
                k_base, offs_dr, 1, offs_kv, stride_kn, mask_dr, mask_n, INTERPRETER_BF16
            )
            s = tl.dot(q_r, k_r, s, input_precision=DOT_PRECISION)
        if not EVEN_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))  # keys past L_KV get probability 0
        # FlashAttention-2, Alg. 1 lines 8-10: new row max, rescale factor, probabilities. The
        # scale (> 0) is applied to the row max, then inside one FMA per score: at SD's small
        # head dims the softmax's per-score work, not the dots, bounds the kernel.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(tl.fma(s, qk_scale, -m_new[:, None]))
        l_i = l_i * alpha + tl.sum(p, 1)
        # [BLOCK_N, BLOCK_D]
        v = _load_block(v_base, offs_kv, stride_vn, offs_d, 1, mask_n, mask_d, INTERPRETER_BF16)
        # P in V's dtype; in the interpreter's bf16, rounded to bf16 but kept in fp32 (as v)
        p = round_to_bf16(p) if INTERPRETER_BF16 else p.to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        if BLOCK_DR > 0:
            v_r = _load_block(
                v_base, offs_kv, stride_vn, offs_dr, 1, mask_n, mask_dr, INTERPRETER_BF16
            )
            acc_r = acc_r * alpha[:, None] + tl.dot(p, v_r, input_precision=DOT_PRECISION)
        m_i = m_new
    _store_output(o_base, offs_m, stride_om, offs_d, mask_m, mask_d, acc, l_i, INTERPRETER_BF16)
    if BLOCK_DR > 0:
        _store_output(
            o_base, offs_m, stride_om, offs_dr, mask_m, mask_dr, acc_r, l_i, INTERPRETER_BF16
        )


def check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """ValueError for inputs no attention accepts (mismatched shapes), before any device work."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k, v must be 4-D [B, H, L, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            "q [B, H, L_q, D], k and v [B, H, L_kv, D] must agree, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def attention_output_like(q: torch.Tensor) -> torch.Tensor:
    """An uninitialized output for q: q's layout when dense with unit stride on D, else contiguous.

    (Diffusers' [B, L, H, D] → [B, H, L, D] view thus gets an output whose
    transpose back is free.)
    """
    out = torch.empty_like(q)
    if out.stride(3) != 1 and q.shape[3] > 1:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return out


def head_dim_blocks(head_dim: int, pad: bool = False) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_DR): two power-of-2 blocks (each >= 16, a dot's minimum; BLOCK_DR 0
    for none) covering `head_dim`, with BLOCK_D <= head_dim when there is a rest; one padded
    block where a split would not save lanes, or with `pad`.

    SD's head dims: 40 → (32, 16), 80 → (64, 16), 160 → (128, 32); 64 → (64, 0).
    """
    padded = max(16, triton.next_power_of_2(head_dim))
    if pad or padded == head_dim or head_dim <= 16:
        return padded, 0
    main = padded // 2
    rest = max(16, triton.next_power_of_2(head_dim - main))
    return (main, rest) if main + rest < padded else (padded, 0)


# Launch shapes derived from the block sizes: a constant mask is no mask at all.
_attention_fwd = triton.heuristics(
    {
        "EVEN_N": lambda args: args["L_KV"] % args["BLOCK_N"] == 0,
        "EVEN_D": lambda args: args["D"] == args["BLOCK_D"] + args["BLOCK_DR"],
    }
)(_attention_fwd_kernel)

# GPU launch configs (BLOCK_M, BLOCK_N, num_warps, num_stages) by (element size, head-dim
# lanes BLOCK_D + BLOCK_DR rounded up to 64, 128 or 256),
# autotuned per (L_q, L_kv, dtype) at the first call of each shape (a CUDA graph's warm-up in
# the torch backend). The first of each list is the Triton tutorial's forward config, sized to
# fit an A100's shared memory (164 KB); the others may need an H100's (227 KB), and the
# autotuner skips any that a card cannot run.
GPU_CONFIGS = {
    (2, 64): [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3)],
    (2, 128): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 2)],
    (2, 256): [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 64, 4, 2), (64, 32, 4, 3)],
    (4, 64): [(64, 32, 4, 2)],
    (4, 128): [(64, 32, 4, 2)],
    (4, 256): [(32, 32, 4, 1)],
}
# The interpreter pays per program: one big block.
_INTERPRETER_CONFIG = (128, 128, 4, 1)
_TUNED: dict[tuple[int, int], Any] = {}


def _graphed_ms(kernel_call: Any, quantiles: tuple[float, ...]) -> list[float]:
    """The autotuner's timer: device time in a CUDA graph, as the backend replays the kernel
    (Triton's default times eager launches, and at SD's small latents a call is short enough
    that this times the Python launcher as much as the kernel). Chosen configs are kept on
    disk beside Triton's compile cache (cache_results), for the next process."""
    ms = device_time_ms(kernel_call, torch.device("cuda", torch.cuda.current_device()))
    return [ms] * len(quantiles)


def _tuned_kernel(element_size: int, lanes: int) -> Any:
    """The autotuned launcher over GPU_CONFIGS[(element_size, lanes)], made once."""
    key = (element_size, lanes)
    if key not in _TUNED:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            for bm, bn, warps, stages in GPU_CONFIGS[key]
        ]
        tune = triton.autotune(
            configs, key=["L_Q", "L_KV", "D"], do_bench=_graphed_ms, cache_results=True
        )
        _TUNED[key] = tune(_attention_fwd)
    return _TUNED[key]


def tuned_configs() -> dict[str, dict[str, Any]]:
    """What the autotuner chose so far, by (element size, lanes, L_q, L_kv, dtypes): reports."""
    chosen = {}
    for (element_size, lanes), tuner in _TUNED.items():
        for shape_key, config in tuner.cache.items():
            label = f"bytes={element_size} lanes={lanes} key={list(shape_key)}"
            chosen[label] = {
                **config.kwargs,
                "num_warps": config.num_warps,
                "num_stages": config.num_stages,
            }
    return chosen


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    pad_head_dim: bool = False,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v without materializing the [L_q, L_kv] scores.

    q [B, H, L_q, D], k and v [B, H, L_kv, D]; fp32/fp16/bf16; D ≤ 256; unit
    stride on D. scale (> 0) defaults to 1/sqrt(D), as SDPA's. Returns [B, H, L_q, D]
    in q's dtype and layout. `pad_head_dim`: one padded head-dim block instead of
    two (`head_dim_blocks`), for the benchmark's comparison.
    """
    check_attention_args(q, k, v)
    check_device("q", q)
    if q.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {q.dtype}")
    batch, heads, l_q, head_dim = q.shape
    l_kv = k.shape[2]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be <= {MAX_HEAD_DIM}, got {head_dim}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1 and head_dim > 1:
            raise ValueError(f"{name} must have unit stride on D, got strides {t.stride()}")
    out = attention_output_like(q)
    if out.numel() == 0:
        return out
    if l_kv == 0:
        raise ValueError("k and v must have at least one key (L_kv >= 1), got 0")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")

    block_d, block_dr = head_dim_blocks(head_dim, pad=pad_head_dim)
    args = (
        q,
        k,
        v,
        out,
        heads,
        l_q,
        l_kv,
        head_dim,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
    )
    constants = {
        "BLOCK_D": block_d,
        "BLOCK_DR": block_dr,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "INTERPRETER_BF16": INTERPRETED and q.dtype == torch.bfloat16,
    }
    if INTERPRETED or q.device.type != "cuda":
        block_m, block_n, warps, stages = _INTERPRETER_CONFIG
        block_n = min(block_n, max(16, triton.next_power_of_2(l_kv)))
        grid = (triton.cdiv(l_q, block_m), batch * heads)
        _attention_fwd[grid](
            *args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **constants
        )
    else:
        lanes = max(64, triton.next_power_of_2(block_d + block_dr))
        kernel = _tuned_kernel(q.element_size(), lanes)
        kernel[lambda meta: (triton.cdiv(l_q, meta["BLOCK_M"]), batch * heads)](*args, **constants)
    return out


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Math attention softmax(q·kᵀ·scale)·v in fp32 (fp64 stays fp64), cast back to q's dtype.

    FLOPs: 4·B·H·L_q·L_kv·D (two matmuls, 2 FLOPs per multiply-add each; the
    softmax's O(B·H·L_q·L_kv) is not counted): the model for the benchmark's
    TFLOP/s. This reference materializes the [B, H, L_q, L_kv] scores.
    """
    check_attention_args(q, k, v)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q.to(compute) @ k.to(compute).transpose(-2, -1)) * scale  # [B, H, L_q, L_kv]
    return (scores.softmax(dim=-1) @ v.to(compute)).to(q.dtype)
