"""The GPU suite's U-Net step: diffusers eager against fewstep's torch backend, configured
several ways, and torch.compile.

SD1.5 architecture (benchmarks/gpu_models.py, random weights), 512² (64² latents), batch 2
(CFG), fp16: diffusers eager (SDPA); fewstep's torch backend with its defaults (every kernel
tuned per shape against torch's op), the GroupNorm kernel alone, no kernels, no CUDA graphs
(profiled by kernel: the profiler sees a graph replay as one event), compile=True; last,
torch.compile of the same module (channels_last; compile time reported apart). Every
variant's output is checked against the U-Net in fp64 by the kernels' rule
(benchmarks/gpu_checks.py). On the CPU (`small`): the tiny sd1 model in fp32, the kernels
interpreted and checked but not timed.

`bench_unet(folder, device, dtype, small, warmup, repeats, compile_mode)` is the suite's
`unet` section.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from fewstep.benchmarks.gpu_checks import accuracy, randn
from fewstep.benchmarks.gpu_models import GFLOP
from fewstep.benchmarks.harness import free_memory, profile_by_kernel, time_ms_and_memory


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration of fewstep's torch backend on the U-Net step."""

    name: str
    kernels: bool | str | None | tuple[str, ...]  # None: the backend's default for the device
    cuda_graphs: bool
    channels_last: bool = True
    compile: bool = False
    timed: bool = True  # False: checked only (interpreted kernels are too slow to time)
    profiled: bool = False  # its kernels' time, by kernel: what to speed up next


GPU_VARIANTS = (
    # the defaults: every kernel, each op the faster of kernel and torch per shape; graphs
    Variant("fewstep", kernels=None, cuda_graphs=True),
    # the earlier default's kernel alone (its ResNet blocks now also add conv1's bias in it)
    Variant("fewstep-group-norm-kernel", ("group_norm",), cuda_graphs=True),
    Variant("fewstep-no-kernels", kernels=False, cuda_graphs=True),
    # profiled without graphs (the profiler sees a graph replay as one event): the defaults'
    # device time by kernel, what to speed up next
    Variant("fewstep-no-cuda-graphs", kernels=None, cuda_graphs=False, profiled=True),
    Variant("fewstep-compile", kernels=None, cuda_graphs=True, compile=True),
)
SMALL_VARIANTS = (
    Variant("fewstep", kernels=False, cuda_graphs=False, profiled=True),
    Variant("fewstep-kernels-interpreted", kernels=True, cuda_graphs=False, timed=False),
    Variant("fewstep-auto-interpreted", kernels="auto", cuda_graphs=False, timed=False),
)


def bench_unet(folder: Path, device, dtype, small, warmup, repeats, compile_mode) -> dict:
    import diffusers

    from fewstep.backends.torch_backend import diffusers_dtype_kwargs

    batch, side = 2, (8 if small else 64)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    sample = randn((batch, 4, side, side), torch.float32, device)
    hidden = randn((batch, 77, cfg["cross_attention_dim"]), torch.float32, device, seed=1)
    timestep = torch.tensor(500.0, device=device)
    result: dict[str, Any] = {
        "what": f"U-Net step, {'tiny sd1' if small else 'SD1.5'} architecture, random weights",
        "latent": [batch, 4, side, side],
        "dtype": str(dtype).removeprefix("torch."),
        "variants": {},
        "checks": {},
    }

    def load_unet(load_dtype):
        unet = diffusers.UNet2DConditionModel.from_pretrained(
            folder / "unet", use_safetensors=True, **diffusers_dtype_kwargs(load_dtype)
        )
        return unet.to(device).eval().requires_grad_(False)

    with torch.inference_mode():
        ref64 = load_unet(torch.float64)(sample.double(), timestep, hidden.double()).sample
        free_memory()
        eager = load_unet(dtype)
        args = (sample.to(dtype), timestep, hidden.to(dtype))

        def eager_call():
            return eager(*args, return_dict=False)[0]

        out_eager = eager_call()
        result["checks"]["diffusers_eager"] = accuracy(out_eager, out_eager, ref64)
        result["variants"]["diffusers_eager"] = time_ms_and_memory(
            eager_call, warmup, repeats, device
        )
        # torch's own error in channels_last, the layout the variants run in: its convolutions
        # take other algorithms there (oneDNN's NHWC kernels on the CPU), which round otherwise.
        eager.to(memory_format=torch.channels_last)
        out_eager_cl = eager(
            args[0].contiguous(memory_format=torch.channels_last), *args[1:], return_dict=False
        )[0]
        result["diffusers_eager_channels_last_err"] = float(
            (out_eager_cl.double() - ref64.double()).abs().max()
        )

    inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden}
    for variant in SMALL_VARIANTS if small else GPU_VARIANTS:
        try:
            row, check, profile = bench_variant(
                variant, folder, device, dtype, inputs, warmup, repeats
            )
        except Exception as e:  # one variant that fails is a result, not the end of the section
            error = f"{type(e).__name__}: {e}"[:2000]
            result.setdefault("variant_errors", {})[variant.name] = error
            print(f"variant {variant.name} failed: {traceback.format_exc()[-3000:]}", flush=True)
        else:
            same = out_eager_cl if variant.channels_last else out_eager
            result["checks"][variant.name] = accuracy(check.to(dtype), same, ref64)
            if row is not None:
                result["variants"][variant.name] = row
            if profile is not None:
                result["profile"] = profile
        free_memory()

    if compile_mode != "none":  # last: a long or failed compile costs no other variant
        with torch.inference_mode():
            try:
                row, check = _bench_compiled(
                    load_unet(dtype), args, out_eager, ref64, compile_mode, warmup, repeats, device
                )
                result["variants"]["torch_compile"], result["checks"]["torch_compile"] = row, check
            except Exception as e:  # a compile failure is a result, not the end of the run
                result["torch_compile_error"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"torch.compile failed: {result['torch_compile_error']}", flush=True)
            free_memory()

    base = result["variants"]["diffusers_eager"]["p50"]
    for row in result["variants"].values():
        row["speedup_vs_eager"] = base / row["p50"]
        if not small:
            row["tflop_per_s"] = GFLOP["sd15_unet_64x64_b2"] / row["p50"]  # GFLOP/ms = TFLOP/s
    return result


def bench_variant(variant, folder, device, dtype, inputs, warmup, repeats):
    """One torch-backend configuration on the U-Net step: (timing row or None, its output,
    profile or None)."""
    from fewstep.backends.torch_backend import TorchBackend

    t0 = time.perf_counter()
    backend = TorchBackend(
        folder,
        device=device,
        dtype=dtype,
        kernels=variant.kernels,
        cuda_graphs=variant.cuda_graphs,
        channels_last=variant.channels_last,
        compile=variant.compile,
    )

    def backend_call():
        return backend.run("unet", **inputs)["out_sample"]

    out = backend_call()  # compiles, autotunes, captures the CUDA graph (each when on)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_call_s = time.perf_counter() - t0
    row = profile = None
    if variant.timed:
        row = time_ms_and_memory(backend_call, warmup, repeats, device)
        row["load_and_first_call_s"] = first_call_s
        row["capture_ms"] = dict(backend.capture_ms)
        row["patched"] = {k: dataclasses.asdict(v) for k, v in backend.patch_report.items()}
    if variant.profiled:
        try:
            profile = {"variant": variant.name, **profile_by_kernel(backend_call, device)}
        except Exception as e:  # a profiler that cannot run costs only its table
            profile = {"variant": variant.name, "error": f"{type(e).__name__}: {e}"}
    return row, out, profile


def _bench_compiled(unet, args, out_eager, ref64, mode, warmup, repeats, device):
    """torch.compile of the U-Net in channels_last (as diffusers' docs set it up)."""
    unet = unet.to(memory_format=torch.channels_last)
    compiled = torch.compile(unet, mode=mode, fullgraph=True)
    sample = args[0].contiguous(memory_format=torch.channels_last)

    def call():
        return compiled(sample, args[1], args[2], return_dict=False)[0]

    t0 = time.perf_counter()
    out = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - t0
    check = accuracy(out.clone(), out_eager, ref64)
    del out  # CUDA-graph-owned (reduce-overhead): the next replay overwrites it
    row = {
        "compile_s": compile_s,
        "mode": mode,
        **time_ms_and_memory(call, warmup, repeats, device),
    }
    return row, check
