"""The GPU suite's correctness checks: fewstep.kernels against fp64 references at SD shapes.

Each check runs a kernel, the plain torch op in the same precision and the fp64 reference on
the same (exactly upcast) inputs, and passes by the rule of tests/test_kernels.py:

    max|kernel − ref64| <= 2 · max|torch − ref64| + eps(dtype) · max|ref64|

On a GPU the cases are full-size SD1.5/SD2 shapes (fp16 and bf16, NCHW and channels_last,
GroupNorm+SiLU in its default form and in two launches, attention, GEGLU, LayerNorm, the
upsampler's ×2-then-3×3 as one transposed convolution), and the grid-sync GroupNorm is checked
inside a CUDA graph. On the CPU the same checks run at scaled-down shapes in Triton's
interpreter (TRITON_INTERPRET=1 before triton is imported).

Used by the suite's `checks` section (benchmarks/gpu_suite.py, rows in its JSON) and by
tests/test_gpu_checks.py (`gpu`-marked at full size); the random inputs here are also the
ones the suite's kernel timings run on (benchmarks/gpu_kernels.py).
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import torch
import torch.nn.functional as F

from fewstep.benchmarks.harness import free_memory
from fewstep.kernels import (
    attention,
    attention_ref,
    geglu,
    geglu_ref,
    group_norm,
    group_norm_ref,
    layer_norm,
    layer_norm_ref,
)

# the module, whose name the package gives to its function
group_norm_module = importlib.import_module("fewstep.kernels.group_norm")


# -- the rule ------------------------------------------------------------------------------------


def accuracy(got: torch.Tensor, same_precision: torch.Tensor, ref64: torch.Tensor) -> dict:
    """tests/test_kernels.py's rule: max|got − ref64| <= 2·max|torch − ref64| + eps·max|ref64|."""
    ref = ref64.double()
    err_torch = float((same_precision.double() - ref).abs().max())
    err = float((got.double() - ref).abs().max())
    floor = torch.finfo(got.dtype).eps * float(ref.abs().max())
    tol = 2 * err_torch + floor
    return {
        "err": err,
        "err_torch_same_precision": err_torch,
        "tol": tol,
        "ok": bool(err <= tol and torch.isfinite(got).all()),
    }


# -- inputs (also what the kernel timings run on) ------------------------------------------------


def randn(shape, dtype, device, seed=0, scale=1.0, shift=0.0) -> torch.Tensor:
    """N(shift, scale²) drawn on the CPU from `seed` (the same values on every device)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale + shift).to(device, dtype)


def group_norm_inputs(shape, channels_last, dtype, device, weight_shift=0.0):
    """x (mean 0.5, std 2; channels_last if asked), weight and bias for GroupNorm checks."""
    x = randn(shape, dtype, device, scale=2.0, shift=0.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = randn(shape[1], dtype, device, seed=1, shift=weight_shift)
    return x, w, randn(shape[1], dtype, device, seed=2)


def qkv(b, h, lq, lkv, d, dtype, device):
    """q, k, v as diffusers' attention builds them: [B, L, H, D] viewed as [B, H, L, D]."""
    return tuple(
        randn((b, n, h, d), dtype, device, seed=s).transpose(1, 2)
        for s, n in ((0, lq), (1, lkv), (2, lkv))
    )


def upsamplers(shape, dtype, device):
    """diffusers' Upsample2D on random weights, channels_last, and fewstep's fusion of it."""
    from diffusers.models.upsampling import Upsample2D

    from fewstep.kernels.patch import FusedUpsampleConv

    torch.manual_seed(0)
    upsample = Upsample2D(shape[1], use_conv=True).to(device, dtype).eval()
    upsample = upsample.to(memory_format=torch.channels_last)
    return upsample, FusedUpsampleConv(upsample)


# -- the cases -----------------------------------------------------------------------------------

# (name, shape, groups, channels_last, dtype)
GN_CHECKS_GPU = [
    ("unet-down0", (2, 320, 64, 64), 32, False, torch.float16),
    ("unet-down0-channels_last", (2, 320, 64, 64), 32, True, torch.float16),
    ("unet-mid", (2, 1280, 8, 8), 32, False, torch.float16),
    ("vae-mid", (1, 512, 64, 64), 32, True, torch.float16),
    ("vae-up3", (1, 128, 512, 512), 32, False, torch.float16),
    ("unet-down0-bf16", (2, 320, 64, 64), 32, True, torch.bfloat16),
]
GN_CHECKS_SMALL = [
    ("unet-down0-scaled", (2, 320, 16, 16), 32, False, torch.float32),
    ("vae-up3-scaled-channels_last", (1, 128, 32, 32), 32, True, torch.float16),
]
# (name, B, H, L_q, L_kv, D, dtype)
ATTN_CHECKS_GPU = [
    ("sd15-down0-self", 2, 8, 4096, 4096, 40, torch.float16),
    ("sd15-down0-cross", 2, 8, 4096, 77, 40, torch.float16),
    ("sd15-down1-self", 2, 8, 1024, 1024, 80, torch.float16),
    ("sd15-down2-self", 2, 8, 256, 256, 160, torch.float16),
    ("sd21-down0-self", 1, 5, 4096, 4096, 64, torch.float16),
    ("sd15-down0-self-bf16", 2, 8, 4096, 4096, 40, torch.bfloat16),
]
ATTN_CHECKS_SMALL = [
    ("self-scaled", 1, 2, 256, 256, 40, torch.float32),
    ("cross-scaled", 1, 2, 256, 77, 40, torch.float16),
]
# (name, shape of the feed-forward projection's output [B, L, 2·I], dtype)
GEGLU_CHECKS_GPU = [
    ("sd15-down0", (2, 4096, 2 * 1280), torch.float16),
    ("sd15-down2", (2, 256, 2 * 5120), torch.float16),
    ("sd15-down0-bf16", (2, 4096, 2 * 1280), torch.bfloat16),
]
GEGLU_CHECKS_SMALL = [("sd15-down0-scaled", (2, 64, 2 * 80), torch.float32)]
# (name, shape of a transformer block's tokens [B, L, C], dtype)
LAYER_NORM_CHECKS_GPU = [
    ("sd15-down0", (2, 4096, 320), torch.float16),
    ("sd15-down2", (2, 256, 1280), torch.float16),
    ("sd15-down0-bf16", (2, 4096, 320), torch.bfloat16),
]
LAYER_NORM_CHECKS_SMALL = [("sd15-down0-scaled", (2, 64, 320), torch.float32)]
# (name, the upsampler's input [B, C, H, W]): nearest ×2 then a C → C 3×3 convolution. The
# timings run every case; the checks the last two on a GPU (vae-up2 is the largest).
UPSAMPLE_CASES_GPU = [
    ("vae-up0", (1, 512, 64, 64)),
    ("vae-up1", (1, 512, 128, 128)),
    ("vae-up2", (1, 256, 256, 256)),
    ("unet-up2", (2, 640, 32, 32)),
]
UPSAMPLE_CASES_SMALL = [("unet-up2-scaled", (1, 32, 8, 8))]


def check_cases(small: bool) -> list[tuple[str, tuple]]:
    """(op, case) in the order the suite runs and records them: full SD shapes, or the
    CPU's scaled-down ones (`small`)."""
    tables = {
        "group_norm_silu": GN_CHECKS_SMALL if small else GN_CHECKS_GPU,
        "attention": ATTN_CHECKS_SMALL if small else ATTN_CHECKS_GPU,
        "geglu": GEGLU_CHECKS_SMALL if small else GEGLU_CHECKS_GPU,
        "layer_norm": LAYER_NORM_CHECKS_SMALL if small else LAYER_NORM_CHECKS_GPU,
        "upsample_conv": UPSAMPLE_CASES_SMALL if small else UPSAMPLE_CASES_GPU[2:],
    }
    return [(op, case) for op, cases in tables.items() for case in cases]


# -- the checks ----------------------------------------------------------------------------------


def check_group_norm_silu(case, device) -> list[dict]:
    """GroupNorm+SiLU in its default form and in two launches: a row each."""
    name, shape, groups, channels_last, dtype = case
    x, w, b = group_norm_inputs(shape, channels_last, dtype, device, weight_shift=1.0)
    same = F.silu(F.group_norm(x.contiguous(), groups, w, b))
    ref64 = group_norm_ref(x.double(), groups, w.double(), b.double(), activation="silu")
    rows = []
    for form, one_launch in (("", None), ("-two-launch", False)):
        got = group_norm(x, groups, w, b, activation="silu", one_launch=one_launch)
        result = accuracy(got, same, ref64)
        rows.append({"op": "group_norm_silu", "name": name + form, "shape": list(shape)})
        rows[-1].update(result)
    return rows


def check_attention(case, device) -> list[dict]:
    name, b, h, lq, lkv, d, dtype = case
    q, k, v = qkv(b, h, lq, lkv, d, dtype, device)
    got = attention(q, k, v)
    same = F.scaled_dot_product_attention(q, k, v)
    ref64 = attention_ref(q.double(), k.double(), v.double())
    result = accuracy(got, same, ref64)
    row = {"op": "attention", "name": name, "shape_bhld": [b, h, lq, d], "l_kv": lkv}
    row.update(dtype=str(dtype).removeprefix("torch."), **result)
    return [row]


def check_geglu(case, device) -> list[dict]:
    name, shape, dtype = case
    x = randn(shape, dtype, device, scale=2.0)
    h, g = x.chunk(2, dim=-1)
    result = accuracy(geglu(x), h * F.gelu(g), geglu_ref(x.double()))
    return [{"op": "geglu", "name": name, "shape": list(shape), **result}]


def check_layer_norm(case, device) -> list[dict]:
    name, shape, dtype = case
    x = randn(shape, dtype, device, scale=3.0, shift=5.0)
    w = randn(shape[-1:], dtype, device, seed=1, shift=1.0)
    b = randn(shape[-1:], dtype, device, seed=2)
    same = F.layer_norm(x, shape[-1:], w, b)
    ref64 = layer_norm_ref(x.double(), w.double(), b.double())
    result = accuracy(layer_norm(x, w, b), same, ref64)
    return [{"op": "layer_norm", "name": name, "shape": list(shape), **result}]


def check_upsample_conv(case, device) -> list[dict]:
    """fp16 on a GPU; fp32 on the CPU (the suite's dtype there)."""
    name, shape = case
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.inference_mode():
        upsample, fused = upsamplers(shape, dtype, device)
        x = randn(shape, dtype, device).contiguous(memory_format=torch.channels_last)
        same, got = upsample(x), fused(x)
        ref64 = copy.deepcopy(upsample).double()(x.double())
        result = accuracy(got, same, ref64)
    return [{"op": "upsample_conv", "name": name, "shape": list(shape), **result}]


CHECKS = {
    "group_norm_silu": check_group_norm_silu,
    "attention": check_attention,
    "geglu": check_geglu,
    "layer_norm": check_layer_norm,
    "upsample_conv": check_upsample_conv,
}


def run_check(op: str, case: tuple, device: torch.device) -> list[dict]:
    """One case of `check_cases`: its rows (err, err_torch_same_precision, tol, ok)."""
    return CHECKS[op](case, device)


def check_kernels(device: torch.device, small: bool) -> list[dict]:
    """Every case of `check_cases(small)`, its rows in order (the suite's checks.kernels)."""
    out = [row for op, case in check_cases(small) for row in run_check(op, case, device)]
    free_memory()
    return out


def check_grid_sync_in_graph(device: torch.device) -> dict[str, Any]:
    """The default GroupNorm at an SD shape (one cooperative launch with a barrier inside),
    NCHW and channels_last, captured in a CUDA graph must replay to its eager output bit
    for bit, replay after replay (the barrier words are reused without a reset). If it
    cannot, the rest of the run uses the two-launch form, so the sections after still
    measure."""
    result: dict[str, Any] = {"shape": [2, 320, 64, 64], "replays": 3, "error": None}
    try:
        if not group_norm_module.grid_sync_works(device):  # its first-use check (logged)
            raise RuntimeError("the grid sync failed its first-use check")
        for channels_last in (False, True):
            x, w, b = group_norm_inputs(result["shape"], channels_last, torch.float16, device)
            eager = group_norm(x, 32, w, b, activation="silu")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = group_norm(x, 32, w, b, activation="silu")
            for _ in range(result["replays"]):
                out.zero_()
                graph.replay()
                torch.cuda.synchronize(device)
                if not torch.equal(out, eager):
                    layout = "channels_last" if channels_last else "NCHW"
                    result["error"] = f"{layout}: a replay differs from the eager output"
    except Exception as e:  # e.g. a driver that cannot capture a cooperative launch
        result["error"] = f"{type(e).__name__}: {e}"
    result["ok"] = result["error"] is None
    if not result["ok"]:
        group_norm_module.ONE_LAUNCH_MAX_ELEMENTS = 0
    return result
