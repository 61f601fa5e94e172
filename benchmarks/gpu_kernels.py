"""The GPU suite's kernel timings: fewstep.kernels against the torch ops they replace.

At SD1.5 512² shapes in fp16 (benchmarks/kernels_bench.py's cases and the tables here):
fused GroupNorm+SiLU vs eager F.group_norm + F.silu (achieved GB/s, against a copy of the same
tensor and a 1 GiB copy; a sweep of its launch knobs), fused attention vs
F.scaled_dot_product_attention under each of its flash, memory-efficient and cuDNN backends
(TFLOP/s), and with its head dim as one padded block against two (the default), fused GEGLU vs
h * F.gelu(g) and LayerNorm vs F.layer_norm (GB/s), the upsamplers' ×2-then-3×3 as one
transposed convolution vs diffusers'. Each is timed launched eagerly and as 20 calls captured
in a CUDA graph (device time, what the runtime's graphs see). On the CPU (`small`): tiny cases
in Triton's interpreter, which times the code path only.

`bench_kernels(device, small, warmup, repeats)` is the suite's `kernels` section.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import torch
import torch.nn.functional as F
import triton

from fewstep.benchmarks import kernels_bench
from fewstep.benchmarks.gpu_checks import (
    UPSAMPLE_CASES_GPU,
    UPSAMPLE_CASES_SMALL,
    group_norm_inputs,
    qkv,
    randn,
    upsamplers,
)
from fewstep.benchmarks.harness import device_ms, free_memory, graphed_ms, time_ms_and_memory
from fewstep.kernels import attention, geglu, group_norm, layer_norm

# the module, whose name the package gives to its function
group_norm_module = importlib.import_module("fewstep.kernels.group_norm")

# (form, programs per SM over the whole grid, elements per tile, warps): group_norm's `split`,
# `tile`, `warps` and `one_launch` knobs. Forms: two launches (statistics, then normalize);
# one pass (one program per group, one launch: programs per SM unused); the grid sync (one
# launch, a barrier between the statistics and the output; the grid must be resident).
GROUP_NORM_SWEEP = [("two-launch", 4, 2048, 4), ("one-pass", 0, 8192, 8)]
GROUP_NORM_SWEEP += [("grid-sync", k, 2048, 4) for k in (4, 8)]
# Each row is one more Triton compile per case (its constants, and the split's
# specialization), so the sweep runs on these cases only: the U-Net's largest GroupNorm in
# both layouts and the VAE's largest (on the CPU, every tiny case).
GROUP_NORM_SWEEP_CASES = ("unet-down0", "unet-down0-channels_last", "vae-up3")


def group_norm_launch_sweep(case, dtype, device, warmup, repeats) -> dict[str, Any]:
    """Device time of GroupNorm+SiLU with the default knobs and for each (form, programs
    per SM, tile, warps) in GROUP_NORM_SWEEP; a launch that cannot run is a row with its
    error (a grid sync whose grid does not fit on the GPU at once, or that cannot be
    captured in a CUDA graph)."""
    _, shape, groups, channels_last = case
    x, w, b = group_norm_inputs(shape, channels_last, dtype, device)
    cuda = device.type == "cuda"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 1
    want = F.silu(F.group_norm(x.float(), groups, w.float(), b.float())).to(dtype)
    stride_s = group_norm_module.spatial_stride(x)
    default_tile = group_norm_module._TILE_GPU if cuda else group_norm_module._TILE_INTERPRETER
    rows = []
    # (form, programs per SM, tile, warps, knobs the form adds)
    forms: list[tuple] = [("default", None, None, None, {})]
    forms += [(*row, {}) for row in GROUP_NORM_SWEEP]
    cpg = shape[1] // groups
    # the default without software pipelining (each load waits)
    forms.insert(1, ("default", None, None, None, {"stages": 1}))
    if channels_last:  # the default's rows of whole groups against one group per program
        forms.insert(1, ("default", None, None, None, {"groups_per_program": 1}))
    if cpg & -cpg != min(triton.next_power_of_2(cpg), 64):
        # tiles of whole channels (a power of 2 dividing the group's) against padded ones
        whole = {"channel_block": min(cpg & -cpg, 64)}
        forms += [("two-launch", 4, 2048, 4, whole), ("grid-sync", 4, 2048, 4, whole)]
    for form, per_sm, tile, warps, extra in forms:
        knobs: dict[str, Any] = dict(extra)
        if form != "default":
            # per_sm programs per SM over the default's group blocks
            default = group_norm_module.plan_launch(x.shape, groups, stride_s, tile, sms)
            split = 1 if form == "one-pass" else max(1, -(-per_sm * sms // default.blocks))
            knobs |= dict(split=split, tile=tile, warps=warps, one_launch=form == "grid-sync")
        # what runs (a grid sync may cut a split to fit; this is before any cut)
        plan = group_norm_module.plan_launch(
            x.shape,
            groups,
            stride_s,
            knobs.get("tile") or default_tile,
            sms if cuda else None,
            knobs.get("split"),
            knobs.get("groups_per_program"),
            knobs.get("channel_block"),
        )

        def call(knobs=knobs):
            return group_norm(x, groups, w, b, activation="silu", **knobs)

        row = {"form": form, "programs_per_sm": per_sm, **knobs, "plan": dataclasses.asdict(plan)}
        try:
            row["max_err"] = float((call().float() - want.float()).abs().max())
            row["graphed_ms"] = (
                graphed_ms(call, device, repeats)
                if cuda
                else time_ms_and_memory(call, 0, 1, device)["p50"]
            )
        except (ValueError, RuntimeError) as e:  # a grid that cannot all be resident
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    ran = [r for r in rows if "graphed_ms" in r]
    best = min(ran, key=lambda r: r["graphed_ms"])
    default_over_best = ran[0]["graphed_ms"] / best["graphed_ms"]
    return {"rows": rows, "best": best, "default_over_best": default_over_best}


def sdpa_backends(q, k, v, warmup, repeats, device) -> dict[str, dict]:
    """F.scaled_dot_product_attention under each fused backend it accepts: eager and graphed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = {}
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
    ):

        def call(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            call()
        except RuntimeError:  # this backend does not take these inputs
            continue
        rows[backend.name.lower()] = {
            "eager_ms": time_ms_and_memory(call, warmup, repeats, device),
            "graphed_ms": graphed_ms(call, device, repeats),
        }
    return rows


def copy_gb_per_s(x: torch.Tensor, warmup: int, repeats: int) -> float:
    """Device-to-device copy of x, bytes read plus bytes written per second (GB/s)."""
    y = torch.empty_like(x)
    t = time_ms_and_memory(lambda: y.copy_(x), warmup, repeats, x.device)
    return 2 * x.numel() * x.element_size() / 1e9 / (t["p50"] / 1e3)


def copy_bandwidth(device: torch.device, warmup: int, repeats: int) -> dict:
    """The memory ceiling: a copy far larger than L2 (1 GiB on a GPU, 16 MiB on the CPU)."""
    nbytes = 2**30 if device.type == "cuda" else 2**24
    x = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    result = {"bytes": nbytes, "gb_per_s": copy_gb_per_s(x, warmup, repeats)}
    del x
    free_memory()
    return result


def head_dim_comparison(case, dtype, device, warmup: int, repeats: int) -> dict:
    """The attention kernel with its head dim in two blocks (the default) against one padded
    block (SD's 40 = 32 + 16 against 64): device time in a graph on a GPU; on the CPU the
    interpreter's time (the code path only). Both share one autotuner (same lanes bucket and
    key), so the padded form runs with the launch config tuned for the split one."""
    from fewstep.kernels.attention import head_dim_blocks

    _, b, h, lq, lkv, d = case
    q, k, v = qkv(b, h, lq, lkv, d, dtype, device)
    result: dict[str, Any] = {"split": head_dim_blocks(d), "padded": head_dim_blocks(d, True)}
    for name, pad in (("split", False), ("padded", True)):

        def run(q=q, k=k, v=v, pad=pad):
            return attention(q, k, v, pad_head_dim=pad)

        result[f"{name}_ms"] = device_ms(run, device, warmup, repeats)
    result["padded_over_split"] = result["padded_ms"] / result["split_ms"]
    return result


# (name, shape [B, L, 2·I]): SD1.5's feed-forward activations at 512², batch 2 (CFG)
GEGLU_CASES_GPU = [
    ("unet-down0", (2, 4096, 2 * 1280)),
    ("unet-down1", (2, 1024, 2 * 2560)),
    ("unet-down2", (2, 256, 2 * 5120)),
]
GEGLU_CASES_SMALL = [("unet-down0-scaled", (2, 64, 2 * 80))]
# (name, shape [B, L, C]): SD1.5's transformer-block tokens at 512², batch 2 (CFG)
LAYER_NORM_CASES_GPU = [
    ("unet-down0", (2, 4096, 320)),
    ("unet-down1", (2, 1024, 640)),
    ("unet-down2", (2, 256, 1280)),
]
LAYER_NORM_CASES_SMALL = [("unet-down0-scaled", (2, 64, 320))]


def bench_rowwise(device: torch.device, small: bool, warmup: int, repeats: int) -> dict:
    """The fused GEGLU and LayerNorm against diffusers' torch ops (h * F.gelu(g);
    F.layer_norm): device time in a CUDA graph and achieved GB/s (each reads x once and
    writes y once), held against a copy of x; on the CPU the interpreter's time (the code
    path only)."""
    dtype = torch.float32 if small else torch.float16
    out: dict[str, list] = {"geglu": [], "layer_norm": []}
    cases = [("geglu", c) for c in (GEGLU_CASES_SMALL if small else GEGLU_CASES_GPU)]
    norms = LAYER_NORM_CASES_SMALL if small else LAYER_NORM_CASES_GPU
    cases += [("layer_norm", c) for c in norms]
    for op, (name, shape) in cases:
        x = randn(shape, dtype, device, scale=2.0)
        y = torch.empty_like(x)
        if op == "geglu":
            h, g = x.chunk(2, dim=-1)
            kernel, torch_op = functools.partial(geglu, x), (lambda h=h, g=g: h * F.gelu(g))
            moved = 1.5  # bytes per byte of x: x once, y (half as wide) once
        else:
            w = randn(shape[-1:], dtype, device, seed=1, shift=1.0)
            b = randn(shape[-1:], dtype, device, seed=2)
            kernel = functools.partial(layer_norm, x, w, b)
            torch_op = functools.partial(F.layer_norm, x, x.shape[-1:], w, b)
            moved = 2.0
        calls = {"kernel": kernel, "torch": torch_op, "copy_of_x": lambda x=x, y=y: y.copy_(x)}
        ms = {what: device_ms(call, device, warmup, repeats) for what, call in calls.items()}
        gbytes = moved * x.numel() * x.element_size() / 1e9
        out[op].append(
            {
                "name": name,
                "shape": list(shape),
                "ms": ms,
                "kernel_gb_per_s": gbytes / (ms["kernel"] / 1e3),
                "speedup": ms["torch"] / ms["kernel"],
                # a copy moves 2 bytes per byte of x
                "fraction_of_copy": moved / 2 * ms["copy_of_x"] / ms["kernel"],
            }
        )
        del x, y
    free_memory()
    return out


def bench_upsample_conv(device, small: bool, warmup: int, repeats: int) -> list[dict]:
    """Nearest ×2 upsample then 3×3 convolution (diffusers' Upsample2D) against one stride-2
    transposed convolution (fewstep's fusion): device time in a CUDA graph, channels_last,
    cuDNN's algorithm search on (as in the backend); on the CPU, torch's CPU kernels."""
    dtype = torch.float32 if small else torch.float16
    rows = []
    with torch.inference_mode():
        for name, shape in UPSAMPLE_CASES_SMALL if small else UPSAMPLE_CASES_GPU:
            upsample, fused = upsamplers(shape, dtype, device)
            x = randn(shape, dtype, device).contiguous(memory_format=torch.channels_last)
            calls = {"fused": lambda x=x, f=fused: f(x), "torch": lambda x=x, u=upsample: u(x)}
            ms = {what: device_ms(call, device, warmup, repeats) for what, call in calls.items()}
            rows.append(
                {"name": name, "shape": list(shape), "ms": ms, "speedup": ms["torch"] / ms["fused"]}
            )
            del x, upsample, fused
    free_memory()
    return rows


def bench_kernels(device: torch.device, small: bool, warmup: int, repeats: int) -> dict:
    dtype = torch.float32 if small else torch.float16
    gn_cases = kernels_bench.GROUP_NORM_CPU if small else kernels_bench.GROUP_NORM_CUDA
    attn_cases = kernels_bench.ATTENTION_CPU if small else kernels_bench.ATTENTION_CUDA
    group_norm_rows = kernels_bench.bench_group_norm(gn_cases, dtype, device, warmup, repeats)
    attention_rows = kernels_bench.bench_attention(attn_cases, dtype, device, warmup, repeats)
    copy = copy_bandwidth(device, warmup, repeats)
    cuda = device.type == "cuda"
    for row, (_, shape, groups, channels_last) in zip(group_norm_rows, gn_cases, strict=True):
        # GroupNorm+SiLU must move 3 bytes per byte of x (x twice, y once): its ceiling is a
        # copy's rate. Small tensors live in L2, so each row is held against a copy of x itself.
        x, w, b = group_norm_inputs(shape, channels_last, dtype, device)
        same_size = copy_gb_per_s(x, warmup, repeats)
        row["copy_same_size_gb_per_s"] = same_size
        row["fraction_of_copy_same_size"] = row["kernel_gb_per_s"] / same_size
        row["fraction_of_copy_large"] = row["kernel_gb_per_s"] / copy["gb_per_s"]
        if cuda:
            gbytes = 3 * x.numel() * x.element_size() / 1e9
            y = torch.empty_like(x)

            def fused(x=x, groups=groups, w=w, b=b):
                return group_norm(x, groups, w, b, activation="silu")

            def eager(x=x, groups=groups, w=w, b=b):
                return F.silu(F.group_norm(x, groups, w, b))

            graphed = {
                "kernel": graphed_ms(fused, device, repeats),
                "torch": graphed_ms(eager, device, repeats),
                "copy_same_size": graphed_ms(lambda x=x, y=y: y.copy_(x), device, repeats),
            }
            row["graphed_ms"] = graphed
            row["graphed_kernel_gb_per_s"] = gbytes / (graphed["kernel"] / 1e3)
            row["graphed_speedup"] = graphed["torch"] / graphed["kernel"]
            # a copy of x moves 2 bytes per byte of x, the kernel 3: same rate = same bandwidth
            row["graphed_fraction_of_copy"] = 1.5 * graphed["copy_same_size"] / graphed["kernel"]
    # (on the CPU every tiny case, for the code paths: interpreted launches time only the
    # interpreter)
    for row, case in zip(group_norm_rows, gn_cases, strict=True):
        if case[0] in GROUP_NORM_SWEEP_CASES or not cuda:
            row["launch_sweep"] = group_norm_launch_sweep(case, dtype, device, warmup, repeats)
    tuned: dict[str, Any] = {}
    if cuda:
        from fewstep.kernels.attention import tuned_configs

        for row, (_, b, h, lq, lkv, d) in zip(attention_rows, attn_cases, strict=True):
            q, k, v = qkv(b, h, lq, lkv, d, dtype, device)
            tflop = 4 * b * h * lq * lkv * d / 1e12
            backends = sdpa_backends(q, k, v, warmup, repeats, device)
            best = min(backends, key=lambda name: backends[name]["graphed_ms"])
            kernel_ms = graphed_ms(lambda q=q, k=k, v=v: attention(q, k, v), device, repeats)
            sdpa_ms = backends[best]["graphed_ms"]
            row["sdpa_backends"] = backends
            row["sdpa_best_backend"] = best
            row["sdpa_best_ms"] = backends[best]["eager_ms"]
            row["graphed_ms"] = {"kernel": kernel_ms, "sdpa_best": sdpa_ms}
            row["graphed_kernel_tflop_per_s"] = tflop / (kernel_ms / 1e3)
            row["graphed_sdpa_best_tflop_per_s"] = tflop / (sdpa_ms / 1e3)
            row["graphed_speedup_vs_sdpa_best"] = sdpa_ms / kernel_ms
        tuned = tuned_configs()
    for row, case in zip(attention_rows, attn_cases, strict=True):
        row["head_dim_blocks"] = head_dim_comparison(case, dtype, device, warmup, repeats)
    free_memory()
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "copy": copy,
        "group_norm": group_norm_rows,
        "attention": attention_rows,
        "attention_tuned_configs": tuned,
        **bench_rowwise(device, small, warmup, repeats),
        "upsample_conv": bench_upsample_conv(device, small, warmup, repeats),
    }
