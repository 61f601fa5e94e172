"""The SDXL text-to-image parity cases and their runner, shared by the SDXL test modules
(onnxruntime and OpenVINO in test_sdxl.py, the torch backend in test_sdxl_torch.py, optimum's
packages in test_optimum_sdxl.py).

Reference: diffusers' StableDiffusionXLPipeline in torch fp32 on the tiny SDXL folders
(conftest's `sdxl_references`, with the schedulers of `SCHEDULERS`). `run_case` gives both
pipelines the same latents and the same noise (conftest's `TorchNoise` on fewstep's side) and
returns both images; the callers compare them within conftest's image tolerance. Only the
samplers of `SCHEDULERS` (or the folder's own scheduler) have a reference here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import TorchNoise, parity_call  # noqa: E402

from fewstep.pipeline import Pipeline  # noqa: E402

LATENT_SEED = 7  # numpy's seed of the starting latents
NOISE_SEED = 11  # the torch.Generator seed behind both sides' noise
# fewstep's sampler name -> diffusers' scheduler class
SCHEDULERS = {
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
}


@dataclasses.dataclass(frozen=True)
class SDXLCase:
    id: str
    sampler: str | None  # None: the package's own scheduler (Euler, leading)
    guidance_scale: float
    prompts: tuple[str, ...] = ("a red cat",)
    per_prompt: int = 1
    height: int = 64
    width: int = 64
    steps: int = 3
    extra: tuple[tuple[str, Any], ...] = ()  # further keyword arguments, to both pipelines
    family: str = "sdxl"


SIZES = (
    ("original_size", (128, 96)),
    ("crops_coords_top_left", (8, 16)),
    ("target_size", (64, 96)),
)
NEGATIVE_SIZES = (
    ("negative_original_size", (32, 48)),
    ("negative_crops_coords_top_left", (4, 0)),
    ("negative_target_size", (64, 32)),
)
CASES = [
    SDXLCase("ddim-cfg-zero-negatives", "ddim", 5.0),
    SDXLCase(
        "ddim-cfg-prompt2-negatives-wide",
        "ddim",
        6.0,
        width=96,
        extra=(
            ("prompt_2", "a blue dog"),
            ("negative_prompt", "ugly"),
            ("negative_prompt_2", "blurry"),
        ),
    ),
    SDXLCase("ddim-nocfg-b2-tall", "ddim", 1.0, ("a cat", "a dog"), height=96),
    SDXLCase(
        "euler-default-cfg-sizes-rescale",
        None,
        5.0,
        width=96,
        extra=(*SIZES, *NEGATIVE_SIZES, ("negative_prompt", "bad"), ("guidance_rescale", 0.7)),
    ),
    SDXLCase(
        "euler-cfg-n2-prompt2-list",
        "euler",
        7.0,
        ("a cat", "a dog"),
        per_prompt=2,
        extra=(("prompt_2", ["a red circle", "a green square"]), ("negative_prompt", "")),
    ),
    SDXLCase("euler-nocfg-sizes", "euler", 0.0, extra=SIZES),
    SDXLCase("eulera-cfg-noise", "euler_ancestral", 5.0, height=96, steps=4),
    SDXLCase("turbo-eulera-1step", None, 0.0, steps=1, family="sdxl_turbo"),
    SDXLCase("turbo-eulera-4steps-b2", None, 0.0, ("a cat", "a dog"), steps=4, family="sdxl_turbo"),
]
CASES_BY_ID = {case.id: case for case in CASES}


def call_of(case: SDXLCase) -> tuple[np.ndarray, dict]:
    """The starting latents and the keyword arguments a case gives every pipeline (noise
    aside: each side draws it from a generator seeded with `NOISE_SEED`)."""
    latents, kwargs = parity_call(case, 8, seed=LATENT_SEED)
    return latents, {**kwargs, **dict(case.extra)}


def run_case(case: SDXLCase, ours: Pipeline, reference: Any) -> tuple[np.ndarray, np.ndarray]:
    """(fewstep's images, diffusers' images) of `case`: `ours` a fewstep Pipeline of the
    case's model, `reference` diffusers' SDXL pipeline of it with the case's scheduler."""
    latents, common = call_of(case)
    expected = reference(
        list(case.prompts),
        latents=torch.from_numpy(latents.copy()),
        generator=torch.Generator().manual_seed(NOISE_SEED),
        **common,
    ).images
    got = ours(
        list(case.prompts),
        latents=latents,
        generator=TorchNoise(NOISE_SEED),
        scheduler=case.sampler,
        **common,
    ).images
    batch = len(latents)
    assert got.shape == expected.shape == (batch, case.height, case.width, 3)
    assert float(expected.std()) > 1e-3, "reference image is flat: the test would prove nothing"
    return got, expected
