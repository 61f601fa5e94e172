"""Helpers shared by the pipeline-vs-diffusers parity tests (any backend).

`TorchNoise` feeds fewstep the same noise a torch.Generator gives diffusers; `load_diffusers`
loads the reference pipeline of a tiny model with the named scheduler.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "lcm": "LCMScheduler",
}
IMAGE_TOLERANCE = 1e-3  # max abs difference on a 0..1 scale


class TorchNoise:
    """Draws from a torch.Generator so fewstep and diffusers see the same noise."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, size, dtype=np.float32):
        return torch.randn(size, generator=self.generator, dtype=torch.float32).numpy()


def load_diffusers(folder, family, sampler):
    if family == "lcm":
        pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    cls = getattr(diffusers, SCHEDULER_CLASSES[sampler])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe
