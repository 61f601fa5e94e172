"""The GPU suite's end to end runs: a turbo model, prompt to image, diffusers against fewstep.

Two models (`EndToEnd`), random weights (benchmarks/gpu_models.py), 1 step, 512², no
guidance, prompt → image as a float32 array, at batch 1 and 8: SD-Turbo (SD 2.1 U-Net and
OpenCLIP-H text encoder configs; diffusers' StableDiffusionPipeline), the suite's `turbo`
section, and SDXL-Turbo (SDXL base's architecture, Euler-ancestral with trailing spacing as
stabilityai/sdxl-turbo ships; diffusers' StableDiffusionXLPipeline, its VAE upcast to fp32 as
diffusers and fewstep both run it), its `sdxl_turbo` section. Each: the diffusers pipeline
eager vs fewstep's pipeline on the torch backend, fast (its defaults) and eager (no kernels,
no CUDA graphs); per-stage times from the pipeline's own timings (`timings=True`: each stage
waits for the device); the largest image difference to diffusers' from the same latents (one
step to the last sigma, 0: an ancestral step adds no noise); a profile of the VAE decoder at
batch 8 by kernel. On the CPU (`small`): the family's tiny model at 64², fp32, fewstep's
defaults only.

`bench_turbo(folder, device, dtype, small, warmup, repeats, model)` is both sections.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.benchmarks.harness import profile_by_kernel, time_ms_and_memory


@dataclasses.dataclass(frozen=True)
class EndToEnd:
    """A model the suite runs end to end: what it is called (on the GPU and in `small` mode)
    and the diffusers pipeline that runs it, with that pipeline's loading options."""

    label: str
    small_label: str
    reference: str  # a diffusers pipeline class
    reference_options: dict[str, Any] = dataclasses.field(default_factory=dict)


SD_TURBO = EndToEnd(
    "SD-Turbo",
    "tiny turbo",
    "StableDiffusionPipeline",
    {"safety_checker": None, "requires_safety_checker": False},
)
# No invisible watermark (diffusers adds one where its package is installed): the images are
# compared as the model makes them.
SDXL_TURBO = EndToEnd(
    "SDXL-Turbo", "tiny sdxl_turbo", "StableDiffusionXLPipeline", {"add_watermarker": False}
)


def bench_turbo(
    folder: Path, device, dtype, small, warmup, repeats, model: EndToEnd = SD_TURBO
) -> dict:
    import diffusers

    from fewstep.backends.torch_backend import TorchBackend, diffusers_dtype_kwargs
    from fewstep.pipeline import Pipeline

    side = 64 if small else 512
    result: dict[str, Any] = {
        "what": f"{model.small_label if small else model.label + ' architecture'}, 1 step, "
        f"{side}², end to end (prompt → float32 image), random weights",
        "model": model.label,
        "dtype": str(dtype).removeprefix("torch."),
        "batches": {},
    }
    reference = (
        getattr(diffusers, model.reference)
        .from_pretrained(folder, **model.reference_options, **diffusers_dtype_kwargs(dtype))
        .to(device)
    )
    reference.set_progress_bar_config(disable=True)
    # Interpreted kernels are a correctness tool (the U-Net sections check them), not timed here.
    ours = {
        "fewstep": Pipeline.from_pretrained(folder, backend="torch", device=device, dtype=dtype)
    }
    if not small:
        ours["fewstep-eager"] = Pipeline.from_pretrained(
            folder, backend="torch", device=device, dtype=dtype, kernels=False, cuda_graphs=False
        )
    for batch in (1, 8):
        prompts = ["a photo of a cat"] * batch
        latents = np.random.default_rng(0).standard_normal(
            (batch, 4, side // 8, side // 8), dtype=np.float32
        )
        call = dict(num_inference_steps=1, guidance_scale=0.0, height=side, width=side)
        rows: dict[str, Any] = {}
        images: dict[str, np.ndarray] = {}

        def run_reference(prompts=prompts, latents=latents, call=call):
            lat = torch.from_numpy(latents).to(device, dtype)
            return reference(prompts, latents=lat, output_type="np", **call).images

        images["diffusers_eager"] = run_reference()
        rows["diffusers_eager"] = time_ms_and_memory(run_reference, warmup, repeats, device)
        for name, pipe in ours.items():
            stages: dict[str, list[float]] = {"text_encoder": [], "unet": [], "vae_decoder": []}

            def run_ours(pipe=pipe, prompts=prompts, latents=latents, call=call, stages=stages):
                out = pipe(prompts, latents=latents, seed=0, output_type="np", timings=True, **call)
                stages["text_encoder"].append(out.timings_ms["text_encoder"])
                stages["unet"].append(out.timings_ms["unet_call"][0])
                stages["vae_decoder"].append(out.timings_ms["vae_decoder"])
                return out.images

            images[name] = run_ours()
            row = time_ms_and_memory(run_ours, warmup, repeats, device)
            row["stages_ms_p50"] = {k: float(np.median(v[-repeats:])) for k, v in stages.items()}
            row["capture_ms"] = dict(pipe.backend.capture_ms)
            rows[name] = row
        for row in rows.values():
            row["images_per_s"] = batch / (row["p50"] / 1e3)
            row["speedup_vs_diffusers"] = rows["diffusers_eager"]["p50"] / row["p50"]
        rows["max_abs_image_diff_vs_diffusers"] = {
            name: float(np.abs(img - images["diffusers_eager"]).max())
            for name, img in images.items()
            if name != "diffusers_eager"
        }
        result["batches"][str(batch)] = rows
    # The VAE decoder at batch 8 dominates: where its time goes, kernel by kernel, with the
    # defaults but without CUDA graphs (the profiler sees a replay as one event).
    profiled = "fewstep-no-cuda-graphs"
    latent = torch.from_numpy(latents).to(device)
    try:
        backend = TorchBackend(folder, device=device, dtype=dtype, cuda_graphs=False)
        decode = functools.partial(backend.run, "vae_decoder", latent_sample=latent)
        result["vae_decoder_profile"] = {"variant": profiled, **profile_by_kernel(decode, device)}
    except Exception as e:  # a profiler that cannot run costs only its table
        result["vae_decoder_profile"] = {"variant": profiled, "error": f"{type(e).__name__}: {e}"}
    return result
