"""`fewstep bench`: fewstep's backends against diffusers (torch eager) on the same weights.

Sides: `diffusers` (StableDiffusionPipeline or StableDiffusionXLPipeline, as the folder's
model_index.json names it) and one per fewstep backend spec (`BENCH_BACKENDS`: onnxruntime,
onnxruntime-unfused, openvino-fp32, openvino-bf16). Each side runs in its own fresh process,
so cold start (import + load to first image) and peak memory (max RSS) belong to that side
alone. All sides use the same model folder, prompt, DDIM sampler, guidance 7.5 (U-Net batch
2) and initial latents; SDXL's size conditioning is given explicitly and alike on both sides
(original and target size the image's, crop (0, 0): both pipelines' defaults). Reported per
model: per-stage latency (text encoding per image, i.e. every text encoder call of one
generation summed: for SD 1.5 diffusers encodes the prompt and the negative prompt in two
calls of batch 1, fewstep in one of batch 2; SDXL's empty negative is zeros on both sides, so
both encode the prompt once with each of its two encoders; one U-Net step; VAE decode; p50
and p90), end-to-end latency for each step count, cold start, peak memory, the share of each
fewstep step spent outside the U-Net call, each side's VAE class, and each backend's speedup
over diffusers, and the largest difference of its last image from diffusers' on a 0..1
scale (`image_max_abs_diff`: near 0 in fp32, it shows the sides computed the same thing).
Backends that compile per shape (OpenVINO) compile in the untimed warm-up call, which has the
shapes of every timed call; their compile seconds are reported apart (`compile_s`), and
`compiles_timed` (compiles inside the timed region) must be 0. A backend this machine cannot
run (bf16 on a CPU without it, a missing library) is recorded as skipped, with the reason.

Models (`BENCH_MODELS`; random weights):
- `tiny`: fewstep.export.testing's sd1, at 64².
- `mid`: an SD1.5-layout U-Net with block_out_channels (64, 128, 256, 256) and
  cross_attention_dim 768, a CLIP-L-sized text encoder, and a VAE reduced to
  (64, 128, 256, 256) so a 512² decode stays in seconds on a CPU; at 512².
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

# The export side (and torch with it) loads at import: the CLI turns its absence into the
# extra's name, and every worker, whichever side it measures, starts from the same imports.
from fewstep.export import export_package
from fewstep.export.testing import make_tiny_model

SIDES = ("fewstep", "diffusers")
# Backend spec -> (backend name, options). The default `--backends` is all of them.
BENCH_BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "onnxruntime": ("onnxruntime", {}),
    # the graphs as exported, without the in-memory MultiHeadAttention fusion
    "onnxruntime-unfused": ("onnxruntime", {"fuse_attention": False}),
    "openvino-fp32": ("openvino", {"precision": "fp32"}),
    "openvino-bf16": ("openvino", {"precision": "bf16"}),
}
PROMPT = "a red circle on a blue background"
GUIDANCE = 7.5
# Whose versions a result records.
LIBRARIES = ("fewstep", "numpy", "onnxruntime", "openvino", "torch", "diffusers", "transformers")


def make_mid_model(path: Path, seed: int = 0) -> Path:
    """The tiny sd1 model with its U-Net, text encoder and VAE scaled up to mid size."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    make_tiny_model(path, "sd1", seed=seed)
    torch.manual_seed(seed)
    vocab = json.loads((path / "tokenizer" / "vocab.json").read_text())
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(64, 128, 256, 256),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    for module in (text_encoder, unet, vae):
        with torch.no_grad():
            for p in module.parameters():
                if p.dim() > 1:  # keep norms at identity, redraw zero-initialised outputs
                    p.normal_(0.0, 1.0 / np.sqrt(p[0].numel()))
    text_encoder.save_pretrained(path / "text_encoder")
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    return path


def _make_tiny(path: Path) -> Path:
    return make_tiny_model(path, "sd1")


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


# Tiny autoencoder name (also its folder's) -> its builder.
TINY_VAES: dict[str, Callable[[Path], Path]] = {"taesdxl": _make_taesdxl}
BENCH_MODELS: dict[str, BenchModel] = {
    "tiny": BenchModel("tiny", _make_tiny, 64),
    "mid": BenchModel("mid", make_mid_model, 512),
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
    if image_out is not None:
        np.save(image_out, t.images)
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


def _diffusers_pipeline(folder: Path, tiny_vae: Path | None) -> Any:
    """The folder's diffusers pipeline (its model_index.json's class), with `tiny_vae` (an
    AutoencoderTiny folder) as its VAE when given, DDIM as its scheduler."""
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
        options["vae"] = diffusers.AutoencoderTiny.from_pretrained(tiny_vae)
    pipe = getattr(diffusers, cls).from_pretrained(folder, **options)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def run_diffusers(
    folder: Path,
    steps_list: list[int],
    repeats: int,
    latents: np.ndarray,
    tiny_vae: Path | None = None,
    image_out: Path | None = None,
) -> dict:
    t0 = time.perf_counter()
    import torch

    pipe = _diffusers_pipeline(folder, tiny_vae)
    pipe.set_progress_bar_config(disable=True)
    stages: dict[str, list[float]] = {"text_encoder": [], "unet_step": [], "vae_decoder": []}
    starts: dict[str, float] = {}

    def timed(module: Any, stage: str) -> None:
        def pre(*_: Any, **__: Any) -> None:
            starts[stage] = time.perf_counter()

        def post(*_: Any, **__: Any) -> None:
            stages[stage].append((time.perf_counter() - starts[stage]) * 1e3)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    size = latents.shape[-1] * pipe.vae_scale_factor
    args: dict[str, Any] = dict(guidance_scale=GUIDANCE, height=size, width=size, output_type="np")
    sdxl = type(pipe).__name__ == "StableDiffusionXLPipeline"
    if sdxl:
        args.update(size_conditioning(size))
    with torch.inference_mode():
        pipe(PROMPT, num_inference_steps=1, latents=torch.from_numpy(latents), **args)
        cold = time.perf_counter() - t0
        timed(pipe.text_encoder, "text_encoder")
        if sdxl:  # both encoders' calls are this image's text encoding
            timed(pipe.text_encoder_2, "text_encoder")
        timed(pipe.unet, "unet_step")
        timed(pipe.vae.decoder, "vae_decoder")
        e2e: dict[str, Any] = {}
        for steps in steps_list:
            totals = []
            for _ in range(repeats):
                calls = len(stages["text_encoder"])
                t1 = time.perf_counter()
                out = pipe(
                    PROMPT, num_inference_steps=steps, latents=torch.from_numpy(latents), **args
                )
                totals.append((time.perf_counter() - t1) * 1e3)
                # one entry per image, as fewstep reports it: sum this generation's calls
                stages["text_encoder"][calls:] = [sum(stages["text_encoder"][calls:])]
            e2e[str(steps)] = percentiles(totals)
    if image_out is not None:
        np.save(image_out, out.images)
    return {
        "pipeline": type(pipe).__name__,
        "vae_class": type(pipe.vae).__name__,
        "cold_start_s": cold,
        "stages_ms": {k: percentiles(v) for k, v in stages.items()},
        "end_to_end_ms": e2e,
        "peak_rss_mb": _rss_mb(),
    }


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
    a = p.parse_args(argv)
    image = Path(a.image) if a.image else None
    latents = np.load(a.latents)
    steps = [int(s) for s in a.steps.split(",")]
    # The machine's 1-minute load average before and after: on a shared box, a side that ran
    # beside other work (load above the core count) is visible in the result.
    load_start = os.getloadavg()[0]
    if a.side == "diffusers":
        tiny_vae = Path(a.tiny_vae) if a.tiny_vae else None
        result = run_diffusers(Path(a.path), steps, a.repeats, latents, tiny_vae, image)
    else:
        try:
            result = run_fewstep(Path(a.path), steps, a.repeats, latents, a.backend, image)
        except BackendUnavailable as e:
            result = {"skipped": str(e)}
    result["load_avg_1m"] = [load_start, os.getloadavg()[0]]
    print("RESULT " + json.dumps(result))


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per model and side; speedups are over diffusers' p50."""
    steps = results["steps"]
    rows = [
        "| model | side | text enc p50 | U-Net step p50 / p90 (speedup) | VAE p50 | "
        + " | ".join(f"{s} steps p50 (speedup)" for s in steps)
        + " | cold start | peak RSS |",
        "|---|---|---|---|---|" + "---|" * len(steps) + "---|---|",
    ]
    for model, entry in results["models"].items():
        for side, r in entry["results"].items():
            if "skipped" in r:
                rows.append(f"| {model} | {side} | skipped: {r['skipped']} |")
                continue
            up = entry["speedup"].get(side)
            st = r["stages_ms"]

            def times(key: str, up: dict[str, float] | None = up) -> str:
                return f" ({up[key]:.2f}×)" if up else ""

            e2e = " | ".join(
                f"{r['end_to_end_ms'][str(s)]['p50']:.0f} ms{times(f'end_to_end_{s}')}"
                for s in steps
            )
            rows.append(
                f"| {model} | {side} | {st['text_encoder']['p50']:.1f} ms | "
                f"{st['unet_step']['p50']:.1f} / {st['unet_step']['p90']:.1f} ms"
                f"{times('unet_step')} | "
                f"{st['vae_decoder']['p50']:.0f} ms | {e2e} | {r['cold_start_s']:.2f} s | "
                f"{r['peak_rss_mb']:.0f} MB |"
            )
    return "\n".join(rows)


def speedups(ref: dict[str, Any], few: dict[str, Any], steps: list[int]) -> dict[str, float]:
    """diffusers p50 / backend p50 for the U-Net step and end to end at each step count."""
    return {
        "unet_step": ref["stages_ms"]["unet_step"]["p50"] / few["stages_ms"]["unet_step"]["p50"],
        **{
            f"end_to_end_{s}": ref["end_to_end_ms"][str(s)]["p50"]
            / few["end_to_end_ms"][str(s)]["p50"]
            for s in steps
        },
    }


def _build(model: BenchModel, name: str, workdir: Path) -> tuple[Path, Path, Path | None]:
    """(diffusers folder, fewstep package, tiny VAE folder or None) of `model`, built in
    `workdir` unless there already."""
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
    return folder, package, tiny_vae


def run_bench(
    models: list[str],
    steps: list[int],
    repeats: int,
    workdir: Path,
    out: Path | None,
    backends: list[str] | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """Benchmark `backends` (specs of BENCH_BACKENDS; default all) against diffusers.

    `note` is appended to the result's `what` (e.g. what else was running).
    """
    for name in models:
        if name not in BENCH_MODELS:
            raise ValueError(f"models must be among {tuple(BENCH_MODELS)}, got {name!r}")
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
    what = f"fewstep {', '.join(backends)} vs diffusers torch eager fp32, DDIM, CFG 7.5, batch 1"
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "what": what + (f"; {note}" if note else ""),
        "device": cpu_name(),
        "versions": library_versions(LIBRARIES),
        "commit": git_commit(),
        "steps": steps,
        "repeats": repeats,
        "models": {},
    }
    for name in models:
        folder, package, tiny_vae = _build(BENCH_MODELS[name], name, workdir)
        latent = BENCH_MODELS[name].image_size // 8  # every model's VAE scales by 8
        latents = np.random.default_rng(0).standard_normal((1, 4, latent, latent), np.float32)
        latents_path = workdir / f"{name}-latents.npy"
        np.save(latents_path, latents)
        entry: dict[str, Any] = {
            "image_size": latent * 8,
            "results": {},
            "speedup": {},
            "image_max_abs_diff": {},
        }
        # Side label -> worker arguments; results keep this order (diffusers first).
        vae_args = ["--tiny-vae", str(tiny_vae)] if tiny_vae is not None else []
        sides = {"diffusers": ["diffusers", str(folder), *vae_args]} | {
            spec: ["fewstep", str(package), "--backend", spec] for spec in backends
        }
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
        ref = entry["results"]["diffusers"]
        for spec in backends:
            if "skipped" not in entry["results"][spec]:
                entry["speedup"][spec] = speedups(ref, entry["results"][spec], steps)
                diff = np.abs(np.load(images[spec]) - np.load(images["diffusers"]))
                entry["image_max_abs_diff"][spec] = float(diff.max())
        results["models"][name] = entry
    print(format_table(results))
    if out is not None:
        print(f"wrote {write_json(out, results)}")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        _worker(sys.argv[2:])
