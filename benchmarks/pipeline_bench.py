"""`fewstep bench`: fewstep's backends against diffusers (torch eager) on the same weights.

Sides: `diffusers` (StableDiffusionPipeline or StableDiffusionXLPipeline, as the folder's
model_index.json names it, in fp32), for models that list it `diffusers-bf16` (the same
pipeline loaded in bfloat16), and one per fewstep backend spec (`BENCH_BACKENDS`:
onnxruntime, onnxruntime-unfused, openvino-fp32, openvino-bf16, and openvino-int8: the
package quantized by `fewstep quantize` with its built-in prompts, made in the workdir on
first use, its other layers in bf16). Each side runs in its own
fresh process, so cold start (import + load to first image) and peak memory (max RSS) belong
to that side alone. All sides use the same model folder, prompt, DDIM sampler, guidance 7.5
(U-Net batch 2) and initial latents; SDXL's size conditioning is given explicitly and alike
on both sides (original and target size the image's, crop (0, 0): both pipelines' defaults).
Reported per model: per-stage latency (text encoding per image, i.e. every text encoder call
of one generation summed: for SD 1.5 diffusers encodes the prompt and the negative prompt in
two calls of batch 1, fewstep in one of batch 2; SDXL's empty negative is zeros on both
sides, so both encode the prompt once with each of its two encoders; one U-Net step; VAE
decode; p50 and p90), end-to-end latency for each step count, cold start, peak memory, the
share of each fewstep step spent outside the U-Net call, each side's VAE class, each side's
speedup over fp32 diffusers (`speedup`) and over bf16 diffusers where it ran
(`speedup_over_bf16`), and the largest difference of its last image from fp32 diffusers' on
a 0..1 scale (`image_max_abs_diff`: near 0 in fp32, it shows the sides computed the same
thing) with its PSNR against that image (`image_psnr_db`: what bf16 and int8 cost).
Models with `nocfg_steps` are also timed end to end at those step counts with
guidance 1 (`end_to_end_ms["4-nocfg"]`): both pipelines then skip the unconditional branch,
so the U-Net runs at batch 1, as few-step (LCM-, Turbo-style) models run; these runs add no
stage timings. Backends that compile per shape (OpenVINO) compile in the untimed warm-up
calls, which have the shapes of every timed call; their compile seconds are reported apart
(`compile_s`), and `compiles_timed` (compiles inside the timed region) must be 0. A backend
this machine cannot run (bf16 on a CPU without it, a missing library) is recorded as
skipped, with the reason.

Roofline: before the sides, the run measures this machine's matmul peaks per number format
and its memory bandwidth (fewstep.benchmarks.roofline, `results["roofline"]`). The fp32
diffusers side, after its timed runs, counts the FLOPs of one generation's text encoding,
one U-Net call (batch 2) and one VAE decode with torch's FlopCounterMode (`flops`), attention
run as plain matmuls so it is counted (FlopCounterMode counts 0 for CPU SDPA). Every side
computes those same products, so per side and stage the run reports the achieved TFLOP/s
(flops / p50) and its share of the peak of the side's number format (`SIDE_FORMATS`) and of
the bf16 peak (`utilization`). fewstep's U-Net stage is the whole sampler step, so its rate
is slightly understated.

Models (`BENCH_MODELS`; random weights):
- `tiny`: fewstep.export.testing's sd1, at 64².
- `mid`: fewstep.benchmarks.sd15_model's `mid` size: SD 1.5's layout with U-Net and VAE
  blocks (64, 128, 256, 256) and CLIP-L, so a 512² step and decode take seconds on a CPU.
- `sd15`: SD 1.5's full layout (sd15_model's `full`), at 512², with the bf16
  diffusers side and a 4-step no-CFG run.
- `sdxl-mid`: fewstep.benchmarks.sdxl_models' `mid` SDXL layout (two text encoders, added
  size and pooled-text conditioning), at 512².
- `sdxl-mid-taesdxl`: the same folder with a TAESDXL-sized tiny autoencoder
  (sdxl_models.make_taesdxl) as its VAE: the package is exported with `vae=`, and diffusers
  loads the pipeline with `vae=AutoencoderTiny.from_pretrained(...)`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.benchmarks.harness import (
    cpu_name,
    git_commit,
    library_versions,
    percentiles,
    write_json,
)
from fewstep.benchmarks.roofline import COPY_BYTES, MATMUL_SIZE, measure_roofline

# The export side (and torch with it) loads at import: the CLI turns its absence into the
# extra's name, and every worker, whichever side it measures, starts from the same imports.
from fewstep.export import export_package
from fewstep.export.testing import make_tiny_model

SIDES = ("fewstep", "diffusers")
# Baseline side -> the dtype diffusers loads the pipeline in. "diffusers" (fp32) is the
# reference every speedup and image difference is taken against.
BASELINES: dict[str, str] = {"diffusers": "fp32", "diffusers-bf16": "bf16"}
# Backend spec -> (backend name, options). The default `--backends` is all of them.
BENCH_BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "onnxruntime": ("onnxruntime", {}),
    # the graphs as exported, without the in-memory MultiHeadAttention fusion
    "onnxruntime-unfused": ("onnxruntime", {"fuse_attention": False}),
    "openvino-fp32": ("openvino", {"precision": "fp32"}),
    "openvino-bf16": ("openvino", {"precision": "bf16"}),
    # the package's U-Net quantized to int8 (fewstep quantize), its other layers in bf16
    "openvino-int8": ("openvino", {"precision": "bf16"}),
}
# Specs that run the int8 package (made in the workdir from the fp32 one) instead.
INT8_BACKENDS = ("openvino-int8",)
# Side -> the number format its matmuls run in: the roofline peak its achieved rate is read
# against (an int8 side reads against peak_tflops["int8"]).
SIDE_FORMATS: dict[str, str] = {
    "diffusers": "fp32",
    "diffusers-bf16": "bf16",
    "onnxruntime": "fp32",
    "onnxruntime-unfused": "fp32",
    "openvino-fp32": "fp32",
    "openvino-bf16": "bf16",
    "openvino-int8": "int8",
}
PROMPT = "a red circle on a blue background"
GUIDANCE = 7.5
# The no-CFG runs' guidance: both pipelines skip the unconditional branch at <= 1, so the U-Net
# runs at batch 1, as few-step (LCM-, Turbo-style) models run.
NOCFG_GUIDANCE = 1.0
# Stages whose FLOPs are counted and whose achieved rate is reported.
STAGES = ("text_encoder", "unet_step", "vae_decoder")
# The roofline's matmul size and copy size (tests shrink them).
ROOFLINE_MATMUL_SIZE = MATMUL_SIZE
ROOFLINE_COPY_BYTES = COPY_BYTES
# Whose versions a result records.
LIBRARIES = ("fewstep", "numpy", "onnxruntime", "openvino", "torch", "diffusers", "transformers")


def _make_tiny(path: Path) -> Path:
    return make_tiny_model(path, "sd1")


def _make_sd15(path: Path) -> Path:
    from fewstep.benchmarks.sd15_model import make_sd15_model

    return make_sd15_model(path, "full")


def _make_mid(path: Path) -> Path:
    from fewstep.benchmarks.sd15_model import make_sd15_model

    return make_sd15_model(path, "mid")


def _make_sdxl_mid(path: Path) -> Path:
    from fewstep.benchmarks.sdxl_models import make_sdxl_model

    return make_sdxl_model(path, "mid")


def _make_taesdxl(path: Path) -> Path:
    from fewstep.benchmarks.sdxl_models import make_taesdxl

    return make_taesdxl(path)


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """How one model of `fewstep bench` is built, in the workdir, and at which image size."""

    folder: str  # the diffusers folder's name: variants of one model share it
    build: Callable[[Path], Path]
    image_size: int  # height = width, pixels
    tiny_vae: str | None = None  # a TINY_VAES name: the AutoencoderTiny replacing the VAE
    baselines: tuple[str, ...] = ("diffusers",)  # BASELINES sides; "diffusers" first
    # step counts also timed end to end without CFG (NOCFG_GUIDANCE), as "<steps>-nocfg"
    nocfg_steps: tuple[int, ...] = ()


# Tiny autoencoder name (also its folder's) -> its builder.
TINY_VAES: dict[str, Callable[[Path], Path]] = {"taesdxl": _make_taesdxl}
BENCH_MODELS: dict[str, BenchModel] = {
    "tiny": BenchModel("tiny", _make_tiny, 64),
    "mid": BenchModel("mid", _make_mid, 512),
    "sd15": BenchModel(
        "sd15", _make_sd15, 512, baselines=("diffusers", "diffusers-bf16"), nocfg_steps=(4,)
    ),
    "sdxl-mid": BenchModel("sdxl-mid", _make_sdxl_mid, 512),
    "sdxl-mid-taesdxl": BenchModel("sdxl-mid", _make_sdxl_mid, 512, tiny_vae="taesdxl"),
}
MODELS = tuple(BENCH_MODELS)
DIFFUSERS_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def size_conditioning(size: int) -> dict[str, tuple[int, int]]:
    """SDXL's size conditioning for a size² image, as both sides are given it."""
    return {
        "original_size": (size, size),
        "crops_coords_top_left": (0, 0),
        "target_size": (size, size),
    }


def _rss_mb() -> float:
    """Peak resident memory of this process, MB.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork + exec, so every
    worker would report at least the parent's peak (the parent has imported torch).
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class BackendUnavailable(Exception):
    """This machine cannot run the backend spec (missing library, unsupported precision)."""


def run_fewstep(
    package: Path,
    steps_list: list[int],
    repeats: int,
    latents: np.ndarray,
    backend: str = "onnxruntime",
    image_out: Path | None = None,
    nocfg_steps: tuple[int, ...] = (),
) -> dict:
    t0 = time.perf_counter()
    from fewstep.pipeline import Pipeline

    name, options = BENCH_BACKENDS[backend]
    try:
        pipe = Pipeline.from_pretrained(package, backend=name, **options)
    except (ImportError, ValueError) as e:  # missing library; precision the CPU lacks
        raise BackendUnavailable(str(e)) from e
    size = latents.shape[-1] * pipe.info.vae_scale_factor
    args: dict[str, Any] = dict(guidance_scale=GUIDANCE, height=size, width=size, scheduler="ddim")
    if pipe.info.family == "sdxl":
        args.update(size_conditioning(size))
    pipe(PROMPT, num_inference_steps=1, latents=latents, output_type="np", **args)
    cold = time.perf_counter() - t0
    nocfg_args = args | {"guidance_scale": NOCFG_GUIDANCE}
    if nocfg_steps:  # the batch-1 shapes, compiled here too
        pipe(PROMPT, num_inference_steps=1, latents=latents, output_type="np", **nocfg_args)
    warmup_compiles = pipe.backend.report().compiles
    stages: dict[str, list[float]] = {"text_encoder": [], "unet_step": [], "vae_decoder": []}
    outside: list[float] = []
    e2e: dict[str, Any] = {}
    for steps in steps_list:
        totals = []
        for _ in range(repeats):
            t = pipe(
                PROMPT,
                num_inference_steps=steps,
                latents=latents,
                output_type="np",
                timings=True,
                **args,
            )
            tm = t.timings_ms
            totals.append(tm["total"])
            stages["text_encoder"].append(tm["text_encoder"])
            stages["unet_step"] += tm["sampler_step"]
            stages["vae_decoder"].append(tm["vae_decoder"])
            steps_ms = zip(tm["sampler_step"], tm["unet_call"], strict=True)
            outside += [(s - c) / s for s, c in steps_ms]
        e2e[str(steps)] = percentiles(totals)
    images = t.images
    for steps in nocfg_steps:  # end to end only: the stages above are all at CFG's batch 2
        totals = [
            pipe(
                PROMPT,
                num_inference_steps=steps,
                latents=latents,
                output_type="np",
                timings=True,
                **nocfg_args,
            ).timings_ms["total"]
            for _ in range(repeats)
        ]
        e2e[f"{steps}-nocfg"] = percentiles(totals)
    if image_out is not None:
        np.save(image_out, images)
    result: dict[str, Any] = {
        "backend": name,
        "backend_options": options,
        "vae_class": pipe.info.vae_class,
        "cold_start_s": cold,
        "stages_ms": {k: percentiles(v) for k, v in stages.items()},
        "end_to_end_ms": e2e,
        "outside_unet_fraction_p50": float(np.median(outside)),
        "peak_rss_mb": _rss_mb(),
    }
    report = pipe.backend.report()
    if report.fused_attention:  # graph → attention blocks run as one fused op
        result["fused_attention"] = report.fused_attention
    if warmup_compiles:
        compile_s: dict[str, float] = {}
        for graph, _, seconds in warmup_compiles:
            compile_s[graph] = compile_s.get(graph, 0.0) + seconds
        result["compile_s"] = compile_s
        result["compiles_timed"] = len(report.compiles) - len(warmup_compiles)
    return result


def _diffusers_pipeline(folder: Path, tiny_vae: Path | None, dtype: Any = None) -> Any:
    """The folder's diffusers pipeline (its model_index.json's class), with `tiny_vae` (an
    AutoencoderTiny folder) as its VAE when given, DDIM as its scheduler, in torch `dtype`
    (None: fp32)."""
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    cls = index.get("_class_name")
    if cls not in DIFFUSERS_PIPELINES:
        raise ValueError(
            f"{folder / 'model_index.json'}: _class_name must be one of {DIFFUSERS_PIPELINES}, "
            f"got {cls!r}"
        )
    # SD: no safety checker; SDXL: no watermark (fewstep applies neither)
    options: dict[str, Any] = (
        {"safety_checker": None} if cls == "StableDiffusionPipeline" else {"add_watermarker": False}
    )
    if tiny_vae is not None:  # loaded in place of the folder's VAE, not after it
        options["vae"] = diffusers.AutoencoderTiny.from_pretrained(tiny_vae, torch_dtype=dtype)
    pipe = getattr(diffusers, cls).from_pretrained(folder, torch_dtype=dtype, **options)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _stage_modules(pipe: Any) -> dict[str, list[Any]]:
    """Stage -> the diffusers modules whose calls make it up, as fewstep's stages are cut:
    every text encoder (SDXL has two), the U-Net, the VAE's decoder."""
    encoders = [pipe.text_encoder]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders.append(pipe.text_encoder_2)
    return {"text_encoder": encoders, "unet_step": [pipe.unet], "vae_decoder": [pipe.vae.decoder]}


def math_attention(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Any:
    """`torch.nn.functional.scaled_dot_product_attention` as plain tensor ops (q·kᵀ·scale,
    mask, softmax, ·v), which FlopCounterMode counts: on CPU it counts 0 for torch's own."""
    import torch

    if enable_gqa:  # each group of query heads shares one key/value head
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query * scale) @ key.transpose(-2, -1)  # one n×m matrix less than scaling after
    if is_causal:  # top-left aligned, as torch's
        n, m = query.shape[-2], key.shape[-2]
        keep = torch.ones(n, m, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        weights = torch.dropout(weights, dropout_p, train=True)
    return weights @ value


@contextlib.contextmanager
def counted_attention() -> Any:
    """Within: torch.nn.functional.scaled_dot_product_attention is `math_attention`.

    diffusers' AttnProcessor2_0 and transformers' sdpa attention look the function up on the
    module at each call, so both run the math version here.
    """
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = math_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def count_stage_flops(modules: dict[str, list[Any]], call: Callable[[], Any]) -> dict[str, int]:
    """Stage -> FLOPs of its modules' calls during `call()`, summed over calls, counted by
    torch's FlopCounterMode with attention as `math_attention` (counted: 4·b·h·n·m·d)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = dict.fromkeys(modules, 0)
    handles = []
    with counted_attention(), FlopCounterMode(display=False) as counter:
        for stage, stage_modules in modules.items():
            start = [0]

            def pre(*_: Any, start: list[int] = start) -> None:
                start[0] = counter.get_total_flops()

            def post(*_: Any, stage: str = stage, start: list[int] = start) -> None:
                flops[stage] += counter.get_total_flops() - start[0]

            for module in stage_modules:
                handles += [
                    module.register_forward_pre_hook(pre),
                    module.register_forward_hook(post),
                ]
        try:
            call()
        finally:
            for handle in handles:
                handle.remove()
    return flops


def run_diffusers(
    folder: Path,
    steps_list: list[int],
    repeats: int,
    latents: np.ndarray,
    tiny_vae: Path | None = None,
    image_out: Path | None = None,
    dtype: str = "fp32",
    nocfg_steps: tuple[int, ...] = (),
    count_flops: bool = False,
) -> dict:
    """diffusers' side, its pipeline in `dtype` (fp32 or bf16). `count_flops`: after the timed
    runs, count one generation's text encoding, one U-Net call (batch 2) and one VAE decode."""
    t0 = time.perf_counter()
    import torch

    pipe = _diffusers_pipeline(
        folder, tiny_vae, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    )
    pipe.set_progress_bar_config(disable=True)
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    starts: dict[str, float] = {}
    hooks: list[Any] = []

    def timed(module: Any, stage: str) -> None:
        def pre(*_: Any, **__: Any) -> None:
            starts[stage] = time.perf_counter()

        def post(*_: Any, **__: Any) -> None:
            stages[stage].append((time.perf_counter() - starts[stage]) * 1e3)

        hooks.extend([module.register_forward_pre_hook(pre), module.register_forward_hook(post)])

    size = latents.shape[-1] * pipe.vae_scale_factor
    args: dict[str, Any] = dict(guidance_scale=GUIDANCE, height=size, width=size, output_type="np")
    if type(pipe).__name__ == "StableDiffusionXLPipeline":
        args.update(size_conditioning(size))
    nocfg_args = args | {"guidance_scale": NOCFG_GUIDANCE}
    # the pipeline's own dtype: its scheduler keeps the latents' dtype into the U-Net
    start = torch.from_numpy(latents).to(pipe.unet.dtype)
    with torch.inference_mode():
        pipe(PROMPT, num_inference_steps=1, latents=start, **args)
        cold = time.perf_counter() - t0
        if nocfg_steps:
            pipe(PROMPT, num_inference_steps=1, latents=start, **nocfg_args)
        for stage, modules in _stage_modules(pipe).items():
            for module in modules:
                timed(module, stage)
        e2e: dict[str, Any] = {}
        for steps in steps_list:
            totals = []
            for _ in range(repeats):
                calls = len(stages["text_encoder"])
                t1 = time.perf_counter()
                out = pipe(PROMPT, num_inference_steps=steps, latents=start, **args)
                totals.append((time.perf_counter() - t1) * 1e3)
                # one entry per image, as fewstep reports it: sum this generation's calls
                stages["text_encoder"][calls:] = [sum(stages["text_encoder"][calls:])]
            e2e[str(steps)] = percentiles(totals)
        for hook in hooks:  # the no-CFG runs are timed end to end only
            hook.remove()
        for steps in nocfg_steps:
            totals = []
            for _ in range(repeats):
                t1 = time.perf_counter()
                pipe(PROMPT, num_inference_steps=steps, latents=start, **nocfg_args)
                totals.append((time.perf_counter() - t1) * 1e3)
            e2e[f"{steps}-nocfg"] = percentiles(totals)
        # before counting: the math attention's score matrices would raise the peak
        peak_rss = _rss_mb()
        if count_flops:  # one 1-step generation: one text encoding, U-Net call, VAE decode
            flops = count_stage_flops(
                _stage_modules(pipe),
                lambda: pipe(PROMPT, num_inference_steps=1, latents=start, **args),
            )
    if image_out is not None:
        np.save(image_out, np.asarray(out.images, np.float32))
    result: dict[str, Any] = {
        "pipeline": type(pipe).__name__,
        "dtype": dtype,
        "vae_class": type(pipe.vae).__name__,
        "cold_start_s": cold,
        "stages_ms": {k: percentiles(v) for k, v in stages.items()},
        "end_to_end_ms": e2e,
        "peak_rss_mb": peak_rss,
    }
    if count_flops:
        result["flops"] = flops
    return result


def _worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("side", choices=SIDES)
    p.add_argument("path")
    p.add_argument("--steps", required=True)
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--latents", required=True)
    p.add_argument("--backend", choices=tuple(BENCH_BACKENDS), default="onnxruntime")
    p.add_argument("--tiny-vae", default=None, help="diffusers: an AutoencoderTiny folder")
    p.add_argument("--image", default=None, help="where the last image is saved (.npy)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="diffusers' dtype")
    p.add_argument("--nocfg-steps", default="", help="step counts also run without CFG")
    a = p.parse_args(argv)
    image = Path(a.image) if a.image else None
    latents = np.load(a.latents)
    steps = [int(s) for s in a.steps.split(",")]
    nocfg = tuple(int(s) for s in a.nocfg_steps.split(",") if s)
    # The machine's 1-minute load average before and after: on a shared box, a side that ran
    # beside other work (load above the core count) is visible in the result.
    load_start = os.getloadavg()[0]
    if a.side == "diffusers":
        tiny_vae = Path(a.tiny_vae) if a.tiny_vae else None
        # FLOPs are counted once per model, in fp32: every side computes the same products
        count = a.dtype == "fp32"
        result = run_diffusers(
            Path(a.path), steps, a.repeats, latents, tiny_vae, image, a.dtype, nocfg, count
        )
    else:
        try:
            result = run_fewstep(Path(a.path), steps, a.repeats, latents, a.backend, image, nocfg)
        except BackendUnavailable as e:
            result = {"skipped": str(e)}
    result["load_avg_1m"] = [load_start, os.getloadavg()[0]]
    print("RESULT " + json.dumps(result))


def _u_net_rate(use: dict[str, Any] | None) -> str:
    """The U-Net step's achieved TFLOP/s and its share of the side's own-format and bf16 peaks."""
    if use is None:
        return "—"
    shares = [
        f"{fractions['unet_step']:.0%} of {fmt}"
        for key, fmt in (("peak_fraction", use["number_format"]), ("bf16_peak_fraction", "bf16"))
        if (fractions := use.get(key)) is not None
    ]
    rate = f"{use['achieved_tflops']['unet_step']:.3g}"
    return rate + (f" ({', '.join(dict.fromkeys(shares))})" if shares else "")


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per model and side; speedups are over fp32 diffusers' p50 (and
    the U-Net step's also over bf16 diffusers' where it ran)."""
    steps = results["steps"]
    rows = [
        "| model | side | text enc p50 | U-Net step p50 / p90 (speedup) | "
        "U-Net speedup over diffusers-bf16 | U-Net TFLOP/s (share of peak) | VAE p50 | "
        + " | ".join(f"{s} steps p50 (speedup)" for s in steps)
        + " | no-CFG end to end p50 (speedup) | cold start | peak RSS |",
        "|---|---|---|---|---|---|---|" + "---|" * len(steps) + "---|---|---|",
    ]
    for model, entry in results["models"].items():
        for side, r in entry["results"].items():
            if "skipped" in r:
                rows.append(f"| {model} | {side} | skipped: {r['skipped']} |")
                continue
            up = entry["speedup"].get(side)
            over_bf16 = entry.get("speedup_over_bf16", {}).get(side)
            u_net_over_bf16 = f"{over_bf16['unet_step']:.2f}×" if over_bf16 else "—"
            st = r["stages_ms"]

            def times(key: str, up: dict[str, float] | None = up) -> str:
                return f" ({up[key]:.2f}×)" if up else ""

            e2e = " | ".join(
                f"{r['end_to_end_ms'][str(s)]['p50']:.0f} ms{times(f'end_to_end_{s}')}"
                for s in steps
            )
            nocfg = "; ".join(
                f"{key.removesuffix('-nocfg')} steps: {t['p50']:.0f} ms{times(f'end_to_end_{key}')}"
                for key, t in r["end_to_end_ms"].items()
                if key.endswith("-nocfg")
            )
            rows.append(
                f"| {model} | {side} | {st['text_encoder']['p50']:.1f} ms | "
                f"{st['unet_step']['p50']:.1f} / {st['unet_step']['p90']:.1f} ms"
                f"{times('unet_step')} | "
                f"{u_net_over_bf16} | "
                f"{_u_net_rate(entry.get('utilization', {}).get(side))} | "
                f"{st['vae_decoder']['p50']:.0f} ms | {e2e} | {nocfg or '—'} | "
                f"{r['cold_start_s']:.2f} s | {r['peak_rss_mb']:.0f} MB |"
            )
    return "\n".join(rows)


def format_roofline(roofline: dict[str, Any]) -> str:
    """One line per number format (its peak, and each library's rate) and the copy bandwidth."""
    lines = [
        f"Roofline: {roofline['cpu']}, flags {' '.join(roofline['cpu_flags']) or 'none'}; "
        f"{roofline['matmul_size']}³ matmul"
    ]
    for fmt, rates in roofline["matmul_tflops"].items():
        unit = "TOP/s" if fmt == "int8" else "TFLOP/s"
        per_library = ", ".join(f"{lib} {rate:.3g}" for lib, rate in rates.items())
        peak = roofline["peak_tflops"].get(fmt)
        lines.append(
            f"- {fmt}: peak {peak:.3g} {unit} ({per_library})" if peak else f"- {fmt}: none"
        )
    lines.append(f"- memory bandwidth (copy): {roofline['memory_bandwidth_gbs']:.1f} GB/s")
    return "\n".join(lines)


def speedups(ref: dict[str, Any], side: dict[str, Any]) -> dict[str, float]:
    """ref p50 / side p50 for the U-Net step and end to end at each step count ref ran."""
    return {
        "unet_step": ref["stages_ms"]["unet_step"]["p50"] / side["stages_ms"]["unet_step"]["p50"],
        **{
            f"end_to_end_{key}": t["p50"] / side["end_to_end_ms"][key]["p50"]
            for key, t in ref["end_to_end_ms"].items()
        },
    }


def utilization(
    side: dict[str, Any], flops: dict[str, int], roofline: dict[str, Any], number_format: str
) -> dict[str, Any]:
    """Per stage: achieved TFLOP/s (counted FLOPs / p50 seconds), and its share of this machine's
    peak in the side's number format and of its bf16 peak (where those were measured)."""
    achieved = {
        stage: flops[stage] / (side["stages_ms"][stage]["p50"] / 1e3) / 1e12 for stage in STAGES
    }
    peaks = roofline["peak_tflops"]
    use: dict[str, Any] = {"number_format": number_format, "achieved_tflops": achieved}
    for key, fmt in (("peak_fraction", number_format), ("bf16_peak_fraction", "bf16")):
        if fmt in peaks:
            use[key] = {stage: rate / peaks[fmt] for stage, rate in achieved.items()}
    return use


def _int8_package(package: Path) -> Path:
    """`package` with its U-Net quantized to int8 (the built-in calibration prompts), made
    beside it unless there already."""
    from fewstep.export.quantize import quantize_package

    int8 = package.with_name(package.name.removesuffix("-onnx") + "-int8")
    if not int8.exists():
        quantize_package(package, int8)
    return int8


def _build(
    model: BenchModel, name: str, workdir: Path, backends: list[str]
) -> tuple[Path, dict[str, Path], Path | None]:
    """(diffusers folder, the fewstep package of each backend spec, tiny VAE folder or None)
    of `model`, built in `workdir` unless there already; the int8 package only when a spec
    runs it."""
    folder = workdir / model.folder
    if not folder.exists():
        model.build(folder)
    tiny_vae = None
    if model.tiny_vae is not None:
        tiny_vae = workdir / model.tiny_vae
        if not tiny_vae.exists():
            TINY_VAES[model.tiny_vae](tiny_vae)
    package = workdir / f"{name}-onnx"
    if not package.exists():
        export_package(folder, package, vae=tiny_vae)
    packages = dict.fromkeys(backends, package)
    int8_specs = [spec for spec in backends if spec in INT8_BACKENDS]
    if int8_specs:
        packages |= dict.fromkeys(int8_specs, _int8_package(package))
    return folder, packages, tiny_vae


def _check_model(name: str) -> None:
    if name not in BENCH_MODELS:
        raise ValueError(f"models must be among {tuple(BENCH_MODELS)}, got {name!r}")
    baselines = BENCH_MODELS[name].baselines
    if not baselines or baselines[0] != "diffusers" or not set(baselines) <= set(BASELINES):
        raise ValueError(
            f"BENCH_MODELS[{name!r}].baselines must start with 'diffusers' and be among "
            f"{tuple(BASELINES)}, got {baselines}"
        )
    if any(s < 1 for s in BENCH_MODELS[name].nocfg_steps):
        raise ValueError(
            f"BENCH_MODELS[{name!r}].nocfg_steps must be integers >= 1, "
            f"got {BENCH_MODELS[name].nocfg_steps}"
        )


def _sides(
    model: BenchModel, folder: Path, packages: dict[str, Path], tiny_vae: Path | None
) -> dict[str, list[str]]:
    """Side label -> worker arguments; results keep this order (baselines first, fp32 first)."""
    vae_args = ["--tiny-vae", str(tiny_vae)] if tiny_vae is not None else []
    nocfg = ["--nocfg-steps", ",".join(map(str, model.nocfg_steps))] if model.nocfg_steps else []
    baselines = {
        side: ["diffusers", str(folder), *vae_args, "--dtype", BASELINES[side], *nocfg]
        for side in model.baselines
    }
    return baselines | {
        spec: ["fewstep", str(package), "--backend", spec, *nocfg]
        for spec, package in packages.items()
    }


def psnr_db(diff: np.ndarray) -> float:
    """Peak signal-to-noise ratio, dB, of a difference between two 0..1 images (inf if 0)."""
    mse = float(np.mean(np.square(diff, dtype=np.float64)))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _compare(entry: dict[str, Any], images: dict[str, Path], roofline: dict[str, Any]) -> None:
    """Fill `entry`'s speedups (over fp32 diffusers; over bf16 diffusers where it ran), image
    differences from fp32 diffusers, counted FLOPs and each side's use of the roofline."""
    ran = {side: r for side, r in entry["results"].items() if "skipped" not in r}
    ref = ran["diffusers"]
    entry["flops"] = ref["flops"]
    for side, r in ran.items():
        if side != "diffusers":
            entry["speedup"][side] = speedups(ref, r)
            diff = np.load(images[side]) - np.load(images["diffusers"])
            entry["image_max_abs_diff"][side] = float(np.abs(diff).max())
            entry["image_psnr_db"][side] = psnr_db(diff)
        entry["utilization"][side] = utilization(r, ref["flops"], roofline, SIDE_FORMATS[side])
    if "diffusers-bf16" in ran:
        entry["speedup_over_bf16"] = {
            side: speedups(ran["diffusers-bf16"], r)
            for side, r in ran.items()
            if side != "diffusers-bf16"
        }


def run_bench(
    models: list[str],
    steps: list[int],
    repeats: int,
    workdir: Path,
    out: Path | None,
    backends: list[str] | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """Benchmark `backends` (specs of BENCH_BACKENDS; default all) against diffusers, after
    measuring this machine's roofline.

    `note` is appended to the result's `what` (e.g. what else was running).
    """
    for name in models:
        _check_model(name)
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be integers >= 1, got {steps}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    backends = list(BENCH_BACKENDS) if backends is None else backends
    for spec in backends:
        if spec not in BENCH_BACKENDS:
            raise ValueError(f"backends must be among {tuple(BENCH_BACKENDS)}, got {spec!r}")
    if not backends:
        raise ValueError("backends must name at least one backend, got none")
    what = (
        f"fewstep {', '.join(backends)} vs diffusers torch eager fp32 (and bf16 where a model "
        "lists it), DDIM, CFG 7.5, batch 1; '<steps>-nocfg' end to end: guidance 1, no CFG"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    print("[bench] roofline …", flush=True)
    results: dict[str, Any] = {
        "what": what + (f"; {note}" if note else ""),
        "device": cpu_name(),
        "versions": library_versions(LIBRARIES),
        "commit": git_commit(),
        "steps": steps,
        "repeats": repeats,
        "roofline": measure_roofline(n=ROOFLINE_MATMUL_SIZE, copy_bytes=ROOFLINE_COPY_BYTES),
        "models": {},
    }
    for name in models:
        model = BENCH_MODELS[name]
        folder, packages, tiny_vae = _build(model, name, workdir, backends)
        latent = model.image_size // 8  # every model's VAE scales by 8
        latents = np.random.default_rng(0).standard_normal((1, 4, latent, latent), np.float32)
        latents_path = workdir / f"{name}-latents.npy"
        np.save(latents_path, latents)
        entry: dict[str, Any] = {
            "image_size": latent * 8,
            "results": {},
            "speedup": {},
            "image_max_abs_diff": {},
            "image_psnr_db": {},
            "utilization": {},
        }
        sides = _sides(model, folder, packages, tiny_vae)
        images = {side: workdir / f"{name}-{side}-image.npy" for side in sides}
        for side, worker_args in sides.items():
            images[side].unlink(missing_ok=True)  # a skipped side leaves none
            print(f"[bench] {name}: {side} …", flush=True)
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fewstep.benchmarks.pipeline_bench",
                    "_worker",
                    *worker_args,
                    "--steps",
                    ",".join(map(str, steps)),
                    "--repeats",
                    str(repeats),
                    "--latents",
                    str(latents_path),
                    "--image",
                    str(images[side]),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                raise RuntimeError(f"{side} benchmark on {name} failed:\n{proc.stderr[-3000:]}")
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
            entry["results"][side] = json.loads(line[len("RESULT ") :])
        _compare(entry, images, results["roofline"])
        results["models"][name] = entry
    print(format_roofline(results["roofline"]))
    print(format_table(results))
    if out is not None:
        print(f"wrote {write_json(out, results)}")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        _worker(sys.argv[2:])
