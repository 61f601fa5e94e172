"""fewstep's samplers: small, exact against diffusers, numpy and torch arrays alike.

``create_sampler(name, scheduler_config)`` picks one by our name or by the
diffusers scheduler class a model package ships (``_class_name`` of
``scheduler/scheduler_config.json``). ``PNDMScheduler`` configs get DDIM: PNDM
is not implemented, and DDIM on the same schedule is its deterministic
stand-in (the same ᾱ and timesteps; a first-order instead of a pseudo
linear-multistep update, so images differ slightly from diffusers' PNDM). The
stand-in takes PNDM's defaults for absent keys (``set_alpha_to_one=False``,
no ``clip_sample``), not DDIMScheduler's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .base import Sampler, SamplerOutput, SchedulerConfig
from .ddim import DDIMSampler
from .euler import EulerAncestralSampler, EulerSampler
from .lcm import LCMSampler, guidance_scale_embedding

__all__ = [
    "SAMPLERS",
    "SCHEDULER_CLASS_NAMES",
    "DDIMSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "LCMSampler",
    "Sampler",
    "SamplerOutput",
    "SchedulerConfig",
    "create_sampler",
    "guidance_scale_embedding",
    "sampler_name_for",
]

logger = logging.getLogger(__name__)

SAMPLERS = ("ddim", "lcm", "euler", "euler_ancestral")

# diffusers scheduler class name → our sampler name.
SCHEDULER_CLASS_NAMES = {
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "ddim",  # stand-in, see the module docstring
    "LCMScheduler": "lcm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
}

_SAMPLER_CLASSES: dict[str, type[Sampler]] = {
    "ddim": DDIMSampler,
    "lcm": LCMSampler,
    "euler": EulerSampler,
    "euler_ancestral": EulerAncestralSampler,
}
assert tuple(_SAMPLER_CLASSES) == SAMPLERS

_warned_pndm = False


def sampler_name_for(class_name: str) -> str:
    """Our sampler name for one of ours or for a diffusers scheduler class name."""
    global _warned_pndm
    if class_name in SAMPLERS:
        return class_name
    if class_name in SCHEDULER_CLASS_NAMES:
        if class_name == "PNDMScheduler" and not _warned_pndm:
            _warned_pndm = True
            logger.warning(
                "PNDMScheduler is not implemented; sampling with DDIM on the same schedule "
                "(deterministic, close to but not identical with diffusers' PNDM)"
            )
        return SCHEDULER_CLASS_NAMES[class_name]
    raise ValueError(
        f"sampler must be one of {SAMPLERS} or a diffusers scheduler class "
        f"{tuple(SCHEDULER_CLASS_NAMES)}, got {class_name!r}"
    )


def create_sampler(
    name_or_class_name: str, config: SchedulerConfig | Mapping[str, Any], **options: Any
) -> Sampler:
    """A fresh sampler (one per generation) for a diffusers scheduler config dict.

    ``options`` go to the sampler's constructor (``eta`` for DDIM).
    """
    name = sampler_name_for(name_or_class_name)
    if not isinstance(config, SchedulerConfig):
        defaults = "pndm" if name_or_class_name == "PNDMScheduler" else name
        config = SchedulerConfig.from_dict(config, sampler=defaults)
    return _SAMPLER_CLASSES[name](config, **options)
