"""A1111's sampler names, as its UI, its API (`sampler_name`) and its infotexts write them,
and the fewstep `scheduler=` value each means: one table the CLI, the server and the image
metadata share."""

from __future__ import annotations

A1111_SAMPLERS = {
    "DDIM": "ddim",
    "LCM": "lcm",
    "Euler": "euler",
    "Euler a": "euler_ancestral",
}


def scheduler_for_a1111(name: str, field: str = "sampler_name") -> str:
    """fewstep's scheduler for A1111's sampler `name`; ValueError naming `field` otherwise."""
    if not isinstance(name, str) or name not in A1111_SAMPLERS:
        raise ValueError(f"{field} must be one of {list(A1111_SAMPLERS)}, got {name!r}")
    return A1111_SAMPLERS[name]
