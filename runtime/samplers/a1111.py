"""A1111's sampler names, as its UI, its API (`sampler_name`) and its infotexts write them,
and the fewstep `scheduler=` value each means: one table the CLI, the server and the image
metadata share.

A1111 names a Karras schedule in the sampler's name ("DPM++ 2M Karras"), and so does fewstep
("dpmpp_2m_karras"); the plain names run without it. "PLMS" is PNDM without its Runge-Kutta
warm-up, as in Stable Diffusion's original sampler. A1111 runs its samplers through
k-diffusion, fewstep through diffusers' schedulers of the same names: the same methods, not
always the same images (diffusers' DPM++ 2M, for one, ends with a first-order step).
"""

from __future__ import annotations

A1111_SAMPLERS = {
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
    "Euler": "euler",
    "Euler a": "euler_ancestral",
    "Heun": "heun",
    "PLMS": "plms",
    "UniPC": "unipc",
    "DDIM": "ddim",
    "LCM": "lcm",
}


def scheduler_for_a1111(name: str, field: str = "sampler_name") -> str:
    """fewstep's scheduler for A1111's sampler `name`; ValueError naming `field` otherwise."""
    if not isinstance(name, str) or name not in A1111_SAMPLERS:
        raise ValueError(f"{field} must be one of {list(A1111_SAMPLERS)}, got {name!r}")
    return A1111_SAMPLERS[name]
