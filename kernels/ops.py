"""The kernels as torch custom ops (`torch.ops.fewstep.*`), with a guard and a torch fallback.

`torch.library.custom_op` makes each kernel one opaque node with a fake
(meta) implementation, so torch.compile traces through it without tracing
Triton's launcher, and CUDA graphs capture its launches like any other op
(no host syncs, no allocations outside torch's caching allocator).

Each op first validates its arguments (a ValueError for input no implementation accepts),
then asks the guard. Inputs the kernel does not support run the plain torch op instead
(F.group_norm (+ F.silu), F.scaled_dot_product_attention, h * F.gelu(g), F.layer_norm) in
their own precision, and the reason is logged once per distinct reason on the
"fewstep.kernels" logger. Setting FEWSTEP_DISABLE_KERNELS=1 makes every call take the
fallback (read per call). With `tune=True` an op runs, per shape, the fastest of the kernel
and torch's op as timed on the GPU at its first call (tuning.py).

Outputs have the layout the fake implementation promises (x's for GroupNorm,
q's for attention, see `attention_output_like`); a fallback whose torch op
returns another layout is copied into it.

Inference only: no autograd formula is registered.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._interpreter import device_problem
from .attention import DTYPES as ATTENTION_DTYPES
from .attention import MAX_HEAD_DIM, attention, attention_output_like, check_attention_args
from .geglu import DTYPES as GEGLU_DTYPES
from .geglu import check_geglu_args, geglu
from .group_norm import DTYPES as GROUP_NORM_DTYPES
from .group_norm import check_group_norm_args, group_norm, spatial_stride
from .layer_norm import DTYPES as LAYER_NORM_DTYPES
from .layer_norm import MAX_WIDTH, check_layer_norm_args, layer_norm
from .tuning import choose, signature

logger = logging.getLogger("fewstep.kernels")

DISABLE_ENV = "FEWSTEP_DISABLE_KERNELS"
_INT32_MAX = 2**31 - 1
_GRID_Y_MAX = 65535  # attention's grid is (query blocks, B·H)

_logged_reasons: set[tuple[str, str]] = set()


def _log_fallback_once(op: str, reason: str) -> None:
    if (op, reason) not in _logged_reasons:
        _logged_reasons.add((op, reason))
        logger.warning("fewstep::%s falls back to torch: %s", op, reason)


def kernels_disabled() -> bool:
    """FEWSTEP_DISABLE_KERNELS=1 (read per call): every op takes torch's path."""
    return os.environ.get(DISABLE_ENV, "0") not in ("", "0")


def _common_reason(tensors: dict[str, torch.Tensor], dtypes: tuple[torch.dtype, ...]) -> str | None:
    if kernels_disabled():
        return f"kernels disabled by {DISABLE_ENV}=1"
    first = next(iter(tensors.values()))
    problem = device_problem(first)
    if problem:
        return problem
    for name, t in tensors.items():
        if t.device != first.device:
            return f"{name} is on {t.device}, not on {first.device}"
    if first.dtype not in dtypes:
        return f"dtype {first.dtype} not in {dtypes}"
    if first.numel() == 0:
        return "empty tensor"
    return None


def _max_offset(t: torch.Tensor, first_dim: int) -> int:
    """Largest element offset within t[i0, ..., i_{first_dim-1}]: the kernels index it in int32."""
    return sum(
        (size - 1) * stride
        for size, stride in zip(t.shape[first_dim:], t.stride()[first_dim:], strict=True)
    )


def _as_layout(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """y, or a copy of y with the strides of `like` (a meta tensor) when they differ."""
    if y.stride() == like.stride():
        return y
    out = torch.empty_strided(like.shape, like.stride(), dtype=y.dtype, device=y.device)
    return out.copy_(y)


# GroupNorm ------------------------------------------------------------------


def group_norm_fallback_reason(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    input_bias: torch.Tensor | None = None,
) -> str | None:
    """Why `fewstep::group_norm` would run torch instead of the kernel; None if it won't."""
    optional = (("weight", weight), ("bias", bias), ("input_bias", input_bias))
    tensors = {"x": x} | {n: t for n, t in optional if t is not None}
    reason = _common_reason(tensors, GROUP_NORM_DTYPES)
    if reason is not None:
        return reason
    if spatial_stride(x) is None:
        return "spatial dims of x do not collapse to one stride (neither NCHW nor channels_last)"
    if _max_offset(x, 1) > _INT32_MAX:
        return "a sample of x spans more than 2**31 elements"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dim() == 1 and t.stride(0) != 1 and t.numel() > 1:
            return f"{name} is not contiguous"
    return None


@torch.library.custom_op("fewstep::group_norm", mutates_args=())
def group_norm_op(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    input_bias: torch.Tensor | None = None,
    tune: bool = False,
) -> torch.Tensor:
    """GroupNorm (+ SiLU) of x [N, C, *spatial] (+ input_bias [N, C] first): the fused
    kernel, or torch where unsupported. tune: per shape, the fastest of the kernel's
    default launch, its two-launch form and torch (tuning.py)."""
    check_group_norm_args(x, num_groups, weight, bias, activation, input_bias)
    reason = group_norm_fallback_reason(x, num_groups, weight, bias, input_bias)
    args = (x, num_groups, weight, bias, eps, activation, input_bias)
    if reason is not None:
        _log_fallback_once("group_norm", reason)
        return _group_norm_torch(*args)

    def kernel(**knobs):
        return lambda: group_norm(
            x, num_groups, weight, bias, eps, activation, input_bias=input_bias, **knobs
        )

    if not tune:
        return kernel()()
    candidates = {
        "kernel": kernel(),  # one launch where it has a grid sync (group_norm's default)
        "kernel-two-launch": kernel(one_launch=False),
        "torch": lambda: _group_norm_torch(*args),
    }
    chosen = choose("group_norm", signature(*args), candidates, x.device, reference="torch")
    return candidates[chosen]()


def _group_norm_torch(x, num_groups, weight, bias, eps, activation, input_bias):
    shifted = x
    if input_bias is not None:  # as diffusers adds a time embedding: in x's dtype
        shifted = x + input_bias.view(*x.shape[:2], *[1] * (x.dim() - 2))
    y = F.group_norm(shifted, num_groups, weight, bias, eps)
    if activation == "silu":
        y = F.silu(y, inplace=True)
    return _as_layout(y, torch.empty_like(x, device="meta"))


@group_norm_op.register_fake
def _group_norm_fake(
    x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, input_bias=None, tune=False
):
    check_group_norm_args(x, num_groups, weight, bias, activation, input_bias)
    return torch.empty_like(x)


# Attention ------------------------------------------------------------------


def attention_fallback_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> str | None:
    """Why `fewstep::attention` would run torch's SDPA instead of the kernel; None if it won't."""
    reason = _common_reason({"q": q, "k": k, "v": v}, ATTENTION_DTYPES)
    if reason is not None:
        return reason
    if scale is not None and not scale > 0:
        return "scale <= 0 (the kernel scales the row max)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim > {MAX_HEAD_DIM}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            return f"{name} has a non-unit stride on the head dim"
        if _max_offset(t, 2) > _INT32_MAX:
            return f"one head of {name} spans more than 2**31 elements"
    if k.shape[2] == 0:
        return "no keys (L_kv = 0)"
    if q.shape[0] * q.shape[1] > _GRID_Y_MAX:
        return f"B·H > {_GRID_Y_MAX} (CUDA grid y limit)"
    return None


@torch.library.custom_op("fewstep::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    tune: bool = False,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v in SDPA's [B, H, L, D]: the fused kernel, or SDPA if unsupported.
    tune: per shape, the fastest of SDPA as torch dispatches it (untimed: the first), SDPA
    on each of its CUDA backends, and the kernel where it applies (tuning.py): torch prefers
    flash attention where it applies, which is not always the fastest backend for a card
    and shape. FEWSTEP_DISABLE_KERNELS=1: torch's dispatch, untuned."""
    check_attention_args(q, k, v)
    reason = attention_fallback_reason(q, k, v, scale)
    if reason is not None:
        _log_fallback_once("attention", reason)
    if not tune or kernels_disabled():
        return attention(q, k, v, scale) if reason is None else _attention_torch(q, k, v, scale)
    candidates = {"sdpa": functools.partial(_attention_torch, q, k, v, scale)}
    if q.device.type == "cuda":
        for name, backend in SDPA_BACKENDS.items():
            candidates[name] = functools.partial(_attention_torch, q, k, v, scale, backend)
        if q.shape[:-1].numel() * k.shape[-2] * 4 <= _MATH_SCORES_MAX_BYTES:
            math = SDPBackend.MATH  # batched matmuls and a softmax (large head dims)
            candidates["sdpa-math"] = functools.partial(_attention_torch, q, k, v, scale, math)
    if reason is None:  # e.g. the VAE's head dim of 512 is SDPA's alone
        candidates["kernel"] = functools.partial(attention, q, k, v, scale)
    key = signature(q, k, v, scale)
    return candidates[choose("attention", key, candidates, q.device, reference="sdpa")]()


# SDPA's CUDA backends, each a candidate of the tuned attention (one that cannot take the
# inputs, e.g. flash at head dim 512, fails and is not chosen).
SDPA_BACKENDS = {
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
}
# SDPA's math backend too, where its fp32 scores [B, H, L_q, L_kv] take at most this much.
_MATH_SCORES_MAX_BYTES = 2**30


def _attention_torch(q, k, v, scale, backend: SDPBackend | None = None):
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return _as_layout(out, attention_output_like(q.to("meta")))


@attention_op.register_fake
def _attention_fake(q, k, v, scale=None, tune=False):
    check_attention_args(q, k, v)
    return attention_output_like(q)


# GEGLU ----------------------------------------------------------------------


def geglu_fallback_reason(x: torch.Tensor) -> str | None:
    """Why `fewstep::geglu` would run torch instead of the kernel; None if it won't."""
    reason = _common_reason({"x": x}, GEGLU_DTYPES)
    if reason is not None:
        return reason
    if x.numel() // x.shape[-1] > _INT32_MAX:
        return "more than 2**31 rows"
    return None


@torch.library.custom_op("fewstep::geglu", mutates_args=())
def geglu_op(x: torch.Tensor, tune: bool = False) -> torch.Tensor:
    """h · gelu(g) for x's halves [h, g] on its last dim: the fused kernel, or torch.
    tune: per shape, the faster of torch (untimed: the first) and the kernel (tuning.py)."""
    check_geglu_args(x)
    reason = geglu_fallback_reason(x)
    if reason is not None:
        _log_fallback_once("geglu", reason)
        return _geglu_torch(x)
    if not tune:
        return geglu(x)
    candidates = {"torch": lambda: _geglu_torch(x), "kernel": lambda: geglu(x)}
    return candidates[choose("geglu", signature(x), candidates, x.device, reference="torch")]()


def _geglu_torch(x):
    h, g = x.chunk(2, dim=-1)
    return h * F.gelu(g)  # diffusers' GEGLU, op for op


@geglu_op.register_fake
def _geglu_fake(x, tune=False):
    check_geglu_args(x)
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


# LayerNorm ------------------------------------------------------------------


def layer_norm_fallback_reason(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> str | None:
    """Why `fewstep::layer_norm` would run torch instead of the kernel; None if it won't."""
    optional = (("weight", weight), ("bias", bias))
    tensors = {"x": x} | {n: t for n, t in optional if t is not None}
    reason = _common_reason(tensors, LAYER_NORM_DTYPES)
    if reason is not None:
        return reason
    if x.shape[-1] > MAX_WIDTH:
        return f"rows wider than {MAX_WIDTH}"
    if x.numel() // x.shape[-1] > _INT32_MAX:
        return "more than 2**31 rows"
    for name, t in optional:
        if t is not None and t.stride(0) != 1 and t.numel() > 1:
            return f"{name} is not contiguous"
    return None


@torch.library.custom_op("fewstep::layer_norm", mutates_args=())
def layer_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    tune: bool = False,
) -> torch.Tensor:
    """LayerNorm of x over its last dim: the fused kernel, or F.layer_norm.
    tune: per shape, the faster of torch (untimed: the first) and the kernel (tuning.py)."""
    check_layer_norm_args(x, weight, bias)
    reason = layer_norm_fallback_reason(x, weight, bias)
    if reason is not None:
        _log_fallback_once("layer_norm", reason)
        return _layer_norm_torch(x, weight, bias, eps)
    if not tune:
        return layer_norm(x, weight, bias, eps)
    candidates = {
        "torch": lambda: _layer_norm_torch(x, weight, bias, eps),
        "kernel": lambda: layer_norm(x, weight, bias, eps),
    }
    key = signature(x, weight, bias, eps)
    return candidates[choose("layer_norm", key, candidates, x.device, reference="torch")]()


def _layer_norm_torch(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps).contiguous()


@layer_norm_op.register_fake
def _layer_norm_fake(x, weight=None, bias=None, eps=1e-5, tune=False):
    check_layer_norm_args(x, weight, bias)
    return x.new_empty(x.shape)
