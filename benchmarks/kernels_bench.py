"""fewstep.kernels against torch eager, side by side in one run.

GroupNorm + SiLU (fused kernel vs F.group_norm then F.silu) and attention
(fused kernel vs F.scaled_dot_product_attention) at SD1.5 512² shapes in fp16
(CFG batch 2 for the U-Net, batch 1 for the VAE decoder) on a CUDA GPU, timed
with CUDA events; without a GPU, at tiny shapes in fp32 in Triton's interpreter
(a smoke test of the harness, not a measurement of anything but the harness).

Reported per case: p50 and p90 over `--repeats` calls after `--warmup` calls,
the first call separately (Triton compiles then), achieved GB/s for GroupNorm
(bytes = read x twice + write y once, the model of `group_norm_ref`) and
TFLOP/s for attention (4·B·H·L_q·L_kv·D, the model of `attention_ref`), the
speedup over torch, and max |kernel − torch| as a sanity check.

    python benchmarks/kernels_bench.py --output benchmarks/results/kernels-h100.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# Without a GPU the kernels can only run interpreted; this must be set before
# fewstep.kernels (and so triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fewstep.benchmarks.harness import (  # noqa: E402
    cpu_name,
    git_commit,
    library_versions,
    time_ms,
    write_json,
)
from fewstep.kernels import attention, group_norm  # noqa: E402

# (name, shape [N, C, H, W], groups, channels_last)
GROUP_NORM_CUDA = [
    ("unet-down0", (2, 320, 64, 64), 32, False),  # SD1.5 down block 0 ResNet
    ("unet-down0-channels_last", (2, 320, 64, 64), 32, True),
    ("unet-down1", (2, 640, 32, 32), 32, False),
    ("unet-down2", (2, 1280, 16, 16), 32, False),
    ("unet-mid", (2, 1280, 8, 8), 32, False),
    ("vae-mid", (1, 512, 64, 64), 32, False),  # VAE decoder mid block
    ("vae-up3", (1, 128, 512, 512), 32, False),  # VAE decoder last up block: 1 M elements/group
]
# 10 channels per group, as SD's: padded tiles and rows of groups on the CPU too
GROUP_NORM_CPU = [("tiny", (1, 40, 8, 8), 4, False), ("tiny-channels_last", (1, 40, 8, 8), 4, True)]
# (name, B, H, L_q, L_kv, D)
ATTENTION_CUDA = [
    ("unet-down0-self", 2, 8, 4096, 4096, 40),  # SD1.5 down block 0 transformer
    ("unet-down0-cross", 2, 8, 4096, 77, 40),
    ("unet-down1-self", 2, 8, 1024, 1024, 80),
    ("unet-down2-self", 2, 8, 256, 256, 160),
    ("unet-down2-cross", 2, 8, 256, 77, 160),
]
ATTENTION_CPU = [("tiny-self", 1, 2, 64, 64, 40), ("tiny-cross", 1, 2, 64, 77, 40)]


def bench_group_norm(cases, dtype, device, warmup, repeats) -> list[dict]:
    out = []
    for name, shape, groups, channels_last in cases:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(shape, generator=gen).to(device, dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        weight = torch.randn(shape[1], generator=gen).to(device, dtype)
        bias = torch.randn(shape[1], generator=gen).to(device, dtype)

        def kernel(x=x, groups=groups, weight=weight, bias=bias):
            return group_norm(x, groups, weight, bias, activation="silu")

        def eager(x=x, groups=groups, weight=weight, bias=bias):
            return F.silu(F.group_norm(x, groups, weight, bias))

        gbytes = 3 * x.numel() * x.element_size() / 1e9  # read x twice, write y once
        k, t = (time_ms(f, warmup, repeats, device) for f in (kernel, eager))
        out.append(
            {
                "op": "group_norm_silu",
                "name": name,
                "shape": list(shape),
                "groups": groups,
                "layout": "channels_last" if channels_last else "nchw",
                "dtype": str(dtype).removeprefix("torch."),
                "kernel_ms": k,
                "torch_ms": t,
                "kernel_gb_per_s": gbytes / (k["p50"] / 1e3),
                "torch_gb_per_s": gbytes / (t["p50"] / 1e3),
                "speedup": t["p50"] / k["p50"],
                "max_abs_diff_vs_torch": float((kernel() - eager()).abs().max()),
            }
        )
    return out


def bench_attention(cases, dtype, device, warmup, repeats) -> list[dict]:
    out = []
    for name, b, h, l_q, l_kv, d in cases:
        gen = torch.Generator(device="cpu").manual_seed(0)
        # q as diffusers builds it: [B, L, H, D] viewed as [B, H, L, D]
        q = torch.randn(b, l_q, h, d, generator=gen).to(device, dtype).transpose(1, 2)
        k = torch.randn(b, l_kv, h, d, generator=gen).to(device, dtype).transpose(1, 2)
        v = torch.randn(b, l_kv, h, d, generator=gen).to(device, dtype).transpose(1, 2)

        def kernel(q=q, k=k, v=v):
            return attention(q, k, v)

        def sdpa(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q, k, v)

        tflop = 4 * b * h * l_q * l_kv * d / 1e12
        kt, tt = (time_ms(f, warmup, repeats, device) for f in (kernel, sdpa))
        out.append(
            {
                "op": "attention",
                "name": name,
                "shape_bhld": [b, h, l_q, d],
                "l_kv": l_kv,
                "dtype": str(dtype).removeprefix("torch."),
                "kernel_ms": kt,
                "torch_ms": tt,
                "kernel_tflop_per_s": tflop / (kt["p50"] / 1e3),
                "torch_tflop_per_s": tflop / (tt["p50"] / 1e3),
                "speedup": tt["p50"] / kt["p50"],
                "max_abs_diff_vs_torch": float((kernel() - sdpa()).abs().max()),
            }
        )
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, interpreter"


def run(warmup: int | None, repeats: int | None, output: Path | None) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    warmup = (10 if cuda else 1) if warmup is None else warmup
    repeats = (100 if cuda else 3) if repeats is None else repeats
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
    results: dict[str, Any] = {
        "what": (
            "fewstep.kernels vs torch eager at SD1.5 512² shapes"
            if cuda
            else "harness smoke test: tiny shapes in Triton's interpreter (not a measurement)"
        ),
        "device": _device_name(device),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "versions": library_versions(("fewstep", "torch", "triton"), cuda=cuda),
        "commit": git_commit(),
        "warmup": warmup,
        "repeats": repeats,
        "group_norm": bench_group_norm(
            GROUP_NORM_CUDA if cuda else GROUP_NORM_CPU, dtype, device, warmup, repeats
        ),
        "attention": bench_attention(
            ATTENTION_CUDA if cuda else ATTENTION_CPU, dtype, device, warmup, repeats
        ),
    }
    for r in results["group_norm"]:
        print(
            f"group_norm+silu {r['name']:<26} kernel {r['kernel_ms']['p50']:8.3f} ms "
            f"{r['kernel_gb_per_s']:7.1f} GB/s | torch {r['torch_ms']['p50']:8.3f} ms "
            f"{r['torch_gb_per_s']:7.1f} GB/s | x{r['speedup']:.2f}"
        )
    for r in results["attention"]:
        print(
            f"attention {r['name']:<32} kernel {r['kernel_ms']['p50']:8.3f} ms "
            f"{r['kernel_tflop_per_s']:7.2f} TFLOP/s | torch {r['torch_ms']['p50']:8.3f} ms "
            f"{r['torch_tflop_per_s']:7.2f} TFLOP/s | x{r['speedup']:.2f}"
        )
    if output is not None:
        print(f"wrote {write_json(output, results)}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--warmup", type=int, help="untimed calls per case (default 10; CPU 1)")
    parser.add_argument("--repeats", type=int, help="timed calls per case (default 100; CPU 3)")
    args = parser.parse_args(argv)
    run(args.warmup, args.repeats, args.output)


if __name__ == "__main__":
    main(sys.argv[1:])
