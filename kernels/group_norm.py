"""Fused GroupNorm (+ SiLU) forward in Triton, beside its torch reference.

GroupNorm is the most frequent normalization in SD U-Nets and VAEs, and in
every ResNet block it is followed by SiLU: fusing the two saves one full read
and write of the activation. The kernel follows the structure of Triton's
layer-norm tutorial (python/tutorials/05-layer-norm.py: fp32 statistics, one
program per normalized row, a separate pass that writes the output), adapted
to groups that are too large for one program (an SD VAE at 512² normalizes
4 channels × 512 × 512 = 1 M elements per group, and there are only N·32
groups to spread over >100 SMs). Statistics use the parallel variance update
of Chan, Golub & LeVeque (1979), never E[x²] − E[x]².

Two launches, x read twice and y written once (the byte model of
`group_norm_ref` and of the benchmark's GB/s); with one program per group
(split 1: the interpreter's choice, and small or many groups) step 2 alone, one
launch, computing its group's statistics itself (ONE_PASS):

1. `_group_norm_stats_kernel`, grid (N·G, SPLIT): program (ng, p) reads its
   slice of the group's spatial range in [BLOCK_C, BLOCK_S] tiles, computes
   each tile's mean and centred sum of squares in fp32 (a two-pass over
   registers, so x is read once) and merges tiles with Chan's update. It writes
   one partial (count, mean, M2) per program: [N·G, SPLIT, 3] fp32.
2. `_group_norm_fwd_kernel`, grid (N·G, SPLIT): each program merges the SPLIT
   partials of its group (exactly, in fp32), then normalizes its slice:
   y = act((x − mean)·rstd·w[c] + b[c]), cast to x's dtype.

Layouts: any x whose spatial dims collapse to one stride, which covers
contiguous NCHW (stride_s = 1, stride_c = H·W), channels_last NHWC
(stride_s = C, stride_c = 1) and 3-D [N, C, L]. The output has x's layout
(`torch.empty_like`). Tiles are 2-D (channel × spatial) so both layouts load
without integer division.

Limits: fp32/fp16/bf16; each sample must have < 2**31 elements (per-sample
offsets are int32, the batch offset is int64); empty tensors are not launched
(ops.py falls back to torch for them). `split` (programs per group) and `tile`
(elements per tile) are tuning knobs: on CUDA `split` comes from the SM count and
tiles hold 2048 elements; in the interpreter, split 1 and 16384-element tiles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._interpreter import INTERPRETED, round_to_bf16

ACTIVATIONS = (None, "silu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elements per [BLOCK_C, BLOCK_S] tile. The interpreter pays per tile (one numpy
# call per op), so it gets big tiles; a GPU program holds 2048 elements in
# registers with 4 warps (16 per thread).
_TILE_GPU = 2048
_TILE_INTERPRETER = 16384
_MAX_BLOCK_C = 64


@triton.jit
def _slice_statistics(
    x_base, s_start, s_end, CPG, stride_xc, stride_xs, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr
):
    """(count, mean, M2) of one group's channels over spatial range [s_start, s_end), in fp32
    [BLOCK_C, BLOCK_S] tiles merged with Chan's update."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    # Statistics are kept relative to a pivot (the slice's first element), so sums
    # stay small when |mean| >> std and their fp32 rounding does not swamp the mean.
    pivot = tl.load(x_base + s_start * stride_xs).to(tl.float32)
    count = 0.0
    mean = 0.0  # of x - pivot
    m2 = 0.0
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + offs_c
        n_c = tl.minimum(CPG - c0, BLOCK_C)
        for s0 in range(s_start, s_end, BLOCK_S):
            s = s0 + offs_s
            mask = (c < CPG)[:, None] & (s < s_end)[None, :]
            ptrs = x_base + c[:, None] * stride_xc + s[None, :] * stride_xs
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_C, BLOCK_S]
            x = tl.where(mask, x - pivot, 0.0)
            n_b = (n_c * tl.minimum(s_end - s0, BLOCK_S)).to(tl.float32)
            mean_b = tl.sum(x) / n_b
            d = tl.where(mask, x - mean_b, 0.0)
            m2_b = tl.sum(d * d)
            # Chan et al.: merge (count, mean, m2) with the tile's (n_b, mean_b, m2_b).
            n_ab = count + n_b
            delta = mean_b - mean
            mean = mean + delta * (n_b / n_ab)
            m2 = m2 + m2_b + delta * delta * (count * n_b / n_ab)
            count = n_ab
    return count, pivot + mean, m2


@triton.jit
def _group_norm_stats_kernel(
    x_ptr,
    partial_ptr,  # [N·G, SPLIT, 3] fp32: count, mean, M2
    G,
    HW,
    CPG,  # channels per group
    S_PER_PROG,  # spatial elements per program (a multiple of BLOCK_S)
    SPLIT,
    stride_xn,
    stride_xc,
    stride_xs,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    x_base = x_ptr + n.to(tl.int64) * stride_xn + (g * CPG).to(tl.int64) * stride_xc
    s_start = pid_s * S_PER_PROG
    s_end = tl.minimum(s_start + S_PER_PROG, HW)
    count, mean, m2 = _slice_statistics(
        x_base, s_start, s_end, CPG, stride_xc, stride_xs, BLOCK_C, BLOCK_S
    )
    out = partial_ptr + (pid_ng * SPLIT + pid_s) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _group_norm_fwd_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    partial_ptr,  # unused with ONE_PASS
    G,
    HW,
    CPG,
    S_PER_PROG,
    SPLIT,
    eps,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_yn,
    stride_yc,
    stride_ys,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    INTERPRETER_BF16: tl.constexpr,  # see _interpreter.py
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
    ONE_PASS: tl.constexpr,  # SPLIT == 1: the statistics from x here, no stats launch
):
    pid_ng = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    x_base = x_ptr + n.to(tl.int64) * stride_xn + (g * CPG).to(tl.int64) * stride_xc
    y_base = y_ptr + n.to(tl.int64) * stride_yn + (g * CPG).to(tl.int64) * stride_yc

    if ONE_PASS:  # the whole group, read again below (mostly from L2)
        count, mean, m2 = _slice_statistics(
            x_base, 0, HW, CPG, stride_xc, stride_xs, BLOCK_C, BLOCK_S
        )
        var = m2 / count  # biased, as torch
    else:
        # Merge the group's SPLIT partials: mean = Σ nᵢ·meanᵢ / Σ nᵢ (relative to the
        # first partial's mean), M2 = Σ M2ᵢ + Σ nᵢ·(meanᵢ − mean)².
        offs_p = tl.arange(0, BLOCK_SPLIT)
        mask_p = offs_p < SPLIT
        part = partial_ptr + (pid_ng * SPLIT + offs_p) * 3
        cnt = tl.load(part, mask=mask_p, other=0.0)
        mean_p = tl.load(part + 1, mask=mask_p, other=0.0)
        m2_p = tl.load(part + 2, mask=mask_p, other=0.0)
        total = tl.sum(cnt)
        mean_0 = tl.load(partial_ptr + pid_ng * SPLIT * 3 + 1)
        shifted = tl.where(mask_p, mean_p - mean_0, 0.0)
        mean_shifted = tl.sum(cnt * shifted) / total
        mean = mean_0 + mean_shifted
        dm = tl.where(mask_p, shifted - mean_shifted, 0.0)
        var = (tl.sum(m2_p) + tl.sum(cnt * dm * dm)) / total  # biased, as torch
    # IEEE sqrt and division (tl.sqrt / '/' may be approximate on GPU); scalar, so free.
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))

    s_start = pid_s * S_PER_PROG
    s_end = tl.minimum(s_start + S_PER_PROG, HW)
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + offs_c
        mask_c = c < CPG
        # y = (x − mean)·(rstd·w) + b. Not folded into x·scale + shift: when |mean| >> std
        # that form cancels two large terms and loses the low bits.
        scale = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
        if HAS_WEIGHT:
            scale = scale * tl.load(w_ptr + g * CPG + c, mask=mask_c, other=0.0).to(tl.float32)
        shift = tl.zeros([BLOCK_C], tl.float32)
        if HAS_BIAS:
            shift = tl.load(b_ptr + g * CPG + c, mask=mask_c, other=0.0).to(tl.float32)
        for s0 in range(s_start, s_end, BLOCK_S):
            s = s0 + offs_s
            mask = mask_c[:, None] & (s < s_end)[None, :]
            x = tl.load(
                x_base + c[:, None] * stride_xc + s[None, :] * stride_xs, mask=mask, other=0.0
            ).to(tl.float32)
            y = (x - mean) * scale[:, None] + shift[:, None]
            if SILU:
                y = y / (1.0 + tl.exp(-y))
            if INTERPRETER_BF16:
                y = round_to_bf16(y)
            tl.store(
                y_base + c[:, None] * stride_yc + s[None, :] * stride_ys,
                y.to(y_ptr.dtype.element_ty),
                mask=mask,
            )


def spatial_stride(x: torch.Tensor) -> int | None:
    """The one stride that walks x's spatial dims (2:) in order, or None if they don't collapse."""
    dims = [
        (size, stride)
        for size, stride in zip(x.shape[2:], x.stride()[2:], strict=True)
        if size != 1
    ]
    if not dims:
        return 1
    for (_, outer), (size, inner) in zip(dims, dims[1:], strict=False):
        if outer != size * inner:
            return None
    return dims[-1][1]


def check_group_norm_args(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str | None,
) -> None:
    """ValueError for bad input (what torch would also reject), before any device work."""
    if x.dim() < 2:
        raise ValueError(f"x must have shape [N, C, ...], got {tuple(x.shape)}")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(
            f"num_groups must be positive and divide the {channels} channels, got {num_groups}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _default_split(x: torch.Tensor, groups_total: int, tiles_per_group: int) -> int:
    """Programs per group: about 4 per SM over the whole grid (a GPU at batch 1-2 has
    only 32-64 groups); 1 in the interpreter (fewest programs)."""
    if INTERPRETED or x.device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(tiles_per_group, math.ceil(4 * sms / groups_total)))


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    *,
    split: int | None = None,
    tile: int | None = None,
    warps: int = 4,
) -> torch.Tensor:
    """GroupNorm(num_groups)(x) then `activation` (None or "silu"), fused: x is read once
    for the statistics and once for the output, y written once.

    x: [N, C, *spatial] fp32/fp16/bf16 with collapsible spatial strides (NCHW,
    channels_last, [N, C, L]); weight, bias: [C] or None. Returns y with x's
    shape, dtype and layout. Tuning knobs (None: chosen from the device): `split`,
    programs per group (1: one launch, ONE_PASS); `tile`, elements
    per [BLOCK_C, BLOCK_S] tile (a power of 2); `warps` per program.
    """
    check_group_norm_args(x, num_groups, weight, bias, activation)
    if x.dtype not in DTYPES:
        raise ValueError(f"x.dtype must be one of {DTYPES}, got {x.dtype}")
    stride_s = spatial_stride(x)
    if stride_s is None:
        raise ValueError(f"x's spatial dims must collapse to one stride, got {x.stride()}")
    y = torch.empty_like(x)  # x's layout (NCHW or channels_last)
    if x.numel() == 0:
        return y
    batch, channels = x.shape[:2]
    hw = x[0, 0].numel()
    cpg = channels // num_groups
    groups_total = batch * num_groups

    if tile is None:
        tile = _TILE_INTERPRETER if INTERPRETED or x.device.type != "cuda" else _TILE_GPU
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of 2 >= 16, got {tile}")
    block_c = min(triton.next_power_of_2(cpg), _MAX_BLOCK_C)
    block_s = min(max(tile // block_c, 16), triton.next_power_of_2(hw))
    tiles_per_group = triton.cdiv(hw, block_s)
    if split is None:
        split = _default_split(x, groups_total, tiles_per_group)
    if split < 1:
        raise ValueError(f"split must be >= 1, got {split}")
    if warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"warps must be 1, 2, 4, 8 or 16, got {warps}")
    # Whole tiles per program, and no program without work.
    s_per_prog = triton.cdiv(tiles_per_group, min(split, tiles_per_group)) * block_s
    split = triton.cdiv(hw, s_per_prog)

    one_pass = split == 1
    partials = (
        x  # placeholder pointer, never read
        if one_pass
        else torch.empty((groups_total, split, 3), device=x.device, dtype=torch.float32)
    )
    grid = (groups_total, split)
    if not one_pass:
        _group_norm_stats_kernel[grid](
            x,
            partials,
            num_groups,
            hw,
            cpg,
            s_per_prog,
            split,
            x.stride(0),
            x.stride(1),
            stride_s,
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            num_warps=warps,
        )
    _group_norm_fwd_kernel[grid](
        x,
        y,
        weight if weight is not None else x,  # placeholder pointer, never read
        bias if bias is not None else x,
        partials,
        num_groups,
        hw,
        cpg,
        s_per_prog,
        split,
        eps,
        x.stride(0),
        x.stride(1),
        stride_s,
        y.stride(0),
        y.stride(1),
        spatial_stride(y),
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        SILU=activation == "silu",
        INTERPRETER_BF16=INTERPRETED and x.dtype == torch.bfloat16,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        BLOCK_SPLIT=triton.next_power_of_2(split),
        ONE_PASS=one_pass,
        num_warps=warps,
    )
    return y


def group_norm_ref(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> torch.Tensor:
    """torch's GroupNorm (+ SiLU) computed in fp32 (fp64 stays fp64), cast back to x's dtype.

    Bytes: a fused implementation reads x twice (statistics, then normalize) and
    writes y once: 3 · x.numel() · x.element_size(); weight and bias (2·C) are
    negligible. This is the model for the benchmark's GB/s. (This reference
    itself moves more: casts, the norm, and the activation are separate passes.)
    """
    check_group_norm_args(x, num_groups, weight, bias, activation)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32

    def up(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(compute)

    y = F.group_norm(x.to(compute), num_groups, up(weight), up(bias), eps)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)
