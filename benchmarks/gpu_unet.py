"""The GPU suite's U-Net step: diffusers eager against fewstep's torch backend, configured
several ways, and torch.compile.

Two steps (`UNetStep`), each fp16 at batch 2 (CFG) on random weights (benchmarks/
gpu_models.py): SD1.5 at 512² (64² latents), the suite's `unet` section, and SDXL base at
1024² (128² latents, with SDXL's added conditioning: the pooled text embedding and the size
ids), its `sdxl_unet` section. Each runs diffusers eager (SDPA); fewstep's torch backend with
its defaults (every kernel tuned per shape against torch's op), the GroupNorm kernel alone,
no kernels, no CUDA graphs (profiled by kernel: the profiler sees a graph replay as one
event), compile=True; last, torch.compile of the same module (channels_last; compile time
reported apart). `compile_variants=False` leaves the two compiled ones out (an SDXL U-Net
compiles for minutes: the suite adds them on request). Every variant's output is checked
against the U-Net in fp64 by the kernels' rule (benchmarks/gpu_checks.py). On the CPU
(`small`): the tiny model of the family in fp32 at 8² latents, the kernels interpreted and
checked but not timed.

`bench_unet(folder, device, dtype, small, warmup, repeats, compile_mode, step,
compile_variants)` is both sections.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from fewstep.backends.torch_backend import SDXL_UNET_CONDITIONING, is_sdxl
from fewstep.benchmarks.gpu_checks import accuracy, randn
from fewstep.benchmarks.gpu_models import GFLOP
from fewstep.benchmarks.harness import free_memory, profile_by_kernel, time_ms_and_memory


@dataclasses.dataclass(frozen=True)
class UNetStep:
    """One U-Net step the suite times: what it is called, its latent side on the GPU and in
    `small` mode, and its FLOPs (a gpu_models.GFLOP key)."""

    label: str
    small_label: str
    side: int
    small_side: int
    gflop: str


SD15_STEP = UNetStep("SD1.5", "tiny sd1", 64, 8, "sd15_unet_64x64_b2")
SDXL_STEP = UNetStep("SDXL", "tiny sdxl", 128, 8, "sdxl_unet_128x128_b2")
BATCH = 2  # classifier-free guidance: the unconditional and the conditional half


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
TORCH_COMPILE = "torch_compile"  # torch.compile of diffusers' module: its row's name


def unet_variants(small: bool, compile_variants: bool = True) -> tuple[Variant, ...]:
    """The torch-backend configurations a step runs: the GPU's (without the compiled one
    unless `compile_variants`) or the CPU's."""
    if small:
        return SMALL_VARIANTS
    return tuple(v for v in GPU_VARIANTS if compile_variants or not v.compile)


def step_inputs(unet_config: dict[str, Any], side: int, device) -> dict[str, torch.Tensor]:
    """The step's inputs by the U-Net graph's names, float32: latents, timestep, text
    embeddings and, for SDXL, a pooled text embedding and the size ids of a square image of
    side·8 pixels (original size, crop top-left, target size)."""
    inputs = {
        "sample": randn((BATCH, unet_config["in_channels"], side, side), torch.float32, device),
        "timestep": torch.tensor(500.0, device=device),
        "encoder_hidden_states": randn(
            (BATCH, 77, unet_config["cross_attention_dim"]), torch.float32, device, seed=1
        ),
    }
    if is_sdxl(unet_config):
        pooled = (
            unet_config["projection_class_embeddings_input_dim"]
            - 6 * unet_config["addition_time_embed_dim"]
        )
        inputs["text_embeds"] = randn((BATCH, pooled), torch.float32, device, seed=2)
        pixels = float(side * 8)
        size_ids = [pixels, pixels, 0.0, 0.0, pixels, pixels]
        inputs["time_ids"] = torch.tensor([size_ids] * BATCH, device=device)
    return inputs


def module_call(inputs: dict[str, torch.Tensor], dtype, channels_last: bool = False):
    """diffusers' forward arguments from `inputs`: (args, kwargs) in `dtype` (the timestep
    stays float32, as the backend passes it), the added conditioning as SDXL's pipelines
    pass it."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    args = (
        inputs["sample"].to(dtype).contiguous(memory_format=layout),
        inputs["timestep"],
        inputs["encoder_hidden_states"].to(dtype),
    )
    added = {name: inputs[name].to(dtype) for name in SDXL_UNET_CONDITIONING if name in inputs}
    return args, {"added_cond_kwargs": added or None, "return_dict": False}


def bench_unet(
    folder: Path,
    device,
    dtype,
    small,
    warmup,
    repeats,
    compile_mode,
    step: UNetStep = SD15_STEP,
    compile_variants: bool = True,
) -> dict:
    import diffusers

    from fewstep.backends.torch_backend import diffusers_dtype_kwargs

    side = step.small_side if small else step.side
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    inputs = step_inputs(cfg, side, device)
    result: dict[str, Any] = {
        "what": f"U-Net step, {step.small_label if small else step.label} architecture, "
        "random weights",
        "latent": list(inputs["sample"].shape),
        "inputs": {name: list(t.shape) for name, t in inputs.items()},
        "dtype": str(dtype).removeprefix("torch."),
        "variants": {},
        "checks": {},
    }
    run_torch_compile = compile_mode != "none" and compile_variants
    if not small and not compile_variants:  # for the report: what a run with them would add
        compiled = [v.name for v in GPU_VARIANTS if v.compile]
        result["left_out"] = compiled + ([TORCH_COMPILE] if compile_mode != "none" else [])

    def load_unet(load_dtype):
        unet = diffusers.UNet2DConditionModel.from_pretrained(
            folder / "unet", use_safetensors=True, **diffusers_dtype_kwargs(load_dtype)
        )
        return unet.to(device).eval().requires_grad_(False)

    with torch.inference_mode():
        args64, kwargs64 = module_call(inputs, torch.float64)
        ref64 = load_unet(torch.float64)(*args64, **kwargs64)[0]
        free_memory()
        out_eager, out_eager_cl, row = _bench_eager(
            load_unet(dtype), inputs, dtype, warmup, repeats, device
        )
        result["checks"]["diffusers_eager"] = accuracy(out_eager, out_eager, ref64)
        result["variants"]["diffusers_eager"] = row
        # torch's own error in channels_last, the layout the variants run in: its convolutions
        # take other algorithms there (oneDNN's NHWC kernels on the CPU), which round otherwise.
        result["diffusers_eager_channels_last_err"] = float(
            (out_eager_cl.double() - ref64.double()).abs().max()
        )
        free_memory()  # the eager module's weights: room for the variants'

    for variant in unet_variants(small, compile_variants):
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

    if run_torch_compile:  # last: a long or failed compile costs no other variant
        with torch.inference_mode():
            try:
                row, check = _bench_compiled(
                    load_unet(dtype),
                    inputs,
                    dtype,
                    out_eager,
                    ref64,
                    compile_mode,
                    warmup,
                    repeats,
                    device,
                )
                result["variants"][TORCH_COMPILE], result["checks"][TORCH_COMPILE] = row, check
            except Exception as e:  # a compile failure is a result, not the end of the run
                result["torch_compile_error"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"torch.compile failed: {result['torch_compile_error']}", flush=True)
            free_memory()

    base = result["variants"]["diffusers_eager"]["p50"]
    for row in result["variants"].values():
        row["speedup_vs_eager"] = base / row["p50"]
        if not small:
            row["tflop_per_s"] = GFLOP[step.gflop] / row["p50"]  # GFLOP/ms = TFLOP/s
    return result


def _bench_eager(unet, inputs, dtype, warmup, repeats, device):
    """diffusers eager: (its output, its output in channels_last, its timing row)."""
    args, kwargs = module_call(inputs, dtype)

    def eager_call():
        return unet(*args, **kwargs)[0]

    out = eager_call()
    row = time_ms_and_memory(eager_call, warmup, repeats, device)
    unet.to(memory_format=torch.channels_last)
    args_cl, _ = module_call(inputs, dtype, channels_last=True)
    return out, unet(*args_cl, **kwargs)[0], row


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


def _bench_compiled(unet, inputs, dtype, out_eager, ref64, mode, warmup, repeats, device):
    """torch.compile of the U-Net in channels_last (as diffusers' docs set it up)."""
    unet = unet.to(memory_format=torch.channels_last)
    compiled = torch.compile(unet, mode=mode, fullgraph=True)
    args, kwargs = module_call(inputs, dtype, channels_last=True)

    def call():
        return compiled(*args, **kwargs)[0]

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
