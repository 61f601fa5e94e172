"""fewstep's samplers: small, exact against diffusers, numpy and torch arrays alike.

``create_sampler(name, scheduler_config)`` picks one by our name (``SAMPLERS``, what
``Pipeline(…, scheduler=…)`` takes) or by the diffusers scheduler class a model package ships
(``_class_name`` of ``scheduler/scheduler_config.json``, ``SCHEDULER_CLASS_NAMES``). Either
way the config is read as that diffusers class reads it (its keys, its defaults).

A class name takes everything from the config. One of our names fixes what the name says
and takes the rest (spacing, prediction type, …) from the config:
- "<sampler>_karras" turns ``use_karras_sigmas`` on, and the plain name turns it off, for
  the samplers that take it (Euler, Euler-ancestral, Heun, DPM-Solver++, UniPC): what A1111's
  "DPM++ 2M" and "DPM++ 2M Karras" mean (fewstep.samplers.a1111);
- "dpmpp_2m" and "dpmpp_2m_sde" fix ``algorithm_type`` and ``solver_order`` 2, "unipc"
  ``solver_order`` 2;
- "plms" is PNDM with ``skip_prk_steps`` (Stable Diffusion's original PLMS), while "pndm"
  follows the config (the PRK warm-up unless it skips it).
A sampler's ``name`` is the one of ours that makes it again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .base import Sampler, SamplerOutput, SchedulerConfig
from .ddim import DDIMSampler
from .dpm_solver import DPMSolverMultistepSampler
from .euler import EulerAncestralSampler, EulerSampler
from .heun import HeunSampler
from .lcm import LCMSampler, guidance_scale_embedding
from .pndm import PNDMSampler
from .unipc import UniPCSampler

__all__ = [
    "SAMPLERS",
    "SCHEDULER_CLASS_NAMES",
    "DDIMSampler",
    "DPMSolverMultistepSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "HeunSampler",
    "LCMSampler",
    "PNDMSampler",
    "Sampler",
    "SamplerOutput",
    "SchedulerConfig",
    "UniPCSampler",
    "create_sampler",
    "guidance_scale_embedding",
    "sampler_name_for",
]

_FAMILIES: dict[str, type[Sampler]] = {
    cls.family: cls
    for cls in (
        DDIMSampler,
        LCMSampler,
        EulerSampler,
        EulerAncestralSampler,
        PNDMSampler,
        HeunSampler,
        DPMSolverMultistepSampler,
        UniPCSampler,
    )
}

# diffusers scheduler class name → the family of ours that mirrors it.
SCHEDULER_CLASS_NAMES = {
    "DDIMScheduler": "ddim",
    "LCMScheduler": "lcm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "PNDMScheduler": "pndm",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
}


def _our_names() -> dict[str, tuple[str, dict[str, Any]]]:
    """Our name → (family, the config values the name fixes)."""
    names: dict[str, tuple[str, dict[str, Any]]] = {
        "ddim": ("ddim", {}),
        "lcm": ("lcm", {}),
        "pndm": ("pndm", {}),
        "plms": ("pndm", {"skip_prk_steps": True}),
    }
    karras_takers: dict[str, tuple[str, dict[str, Any]]] = {
        "euler": ("euler", {}),
        "euler_ancestral": ("euler_ancestral", {}),
        "heun": ("heun", {}),
        "dpmpp_2m": ("dpmpp_2m", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "dpmpp_2m_sde": ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
        "unipc": ("unipc", {"solver_order": 2}),
    }
    for name, (family, fixed) in karras_takers.items():
        names[name] = (family, {**fixed, "use_karras_sigmas": False})
    for name, (family, fixed) in karras_takers.items():
        names[f"{name}_karras"] = (family, {**fixed, "use_karras_sigmas": True})
    return names


_NAMES = _our_names()
SAMPLERS = tuple(_NAMES)


def _family_and_fixed(name_or_class_name: str) -> tuple[str, dict[str, Any]]:
    if name_or_class_name in _NAMES:
        return _NAMES[name_or_class_name]
    if name_or_class_name in SCHEDULER_CLASS_NAMES:
        return SCHEDULER_CLASS_NAMES[name_or_class_name], {}
    raise ValueError(
        f"sampler must be one of {SAMPLERS} or a diffusers scheduler class "
        f"{tuple(SCHEDULER_CLASS_NAMES)}, got {name_or_class_name!r}"
    )


def sampler_name_for(
    name_or_class_name: str, config: SchedulerConfig | Mapping[str, Any] | None = None
) -> str:
    """Our name for one of ours, or for a diffusers scheduler class: with its `config`, the
    name that makes the same sampler ("dpmpp_2m_sde_karras"); without, the plain name of
    the family that mirrors the class ("dpmpp_2m")."""
    if name_or_class_name in _NAMES:
        return name_or_class_name
    family, _ = _family_and_fixed(name_or_class_name)
    if config is None:
        return family
    return create_sampler(name_or_class_name, config).name


def create_sampler(
    name_or_class_name: str, config: SchedulerConfig | Mapping[str, Any], **options: Any
) -> Sampler:
    """A fresh sampler (one per generation) for a diffusers scheduler config dict.

    ``options`` go to the sampler's constructor (``eta`` for DDIM).
    """
    family, fixed = _family_and_fixed(name_or_class_name)
    if not isinstance(config, SchedulerConfig):
        config = SchedulerConfig.from_dict(config, sampler=family)
    if fixed:
        config = dataclasses.replace(config, **fixed)
    return _FAMILIES[family](config, **options)
