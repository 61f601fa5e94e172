"""PNG files with the A1111-style `parameters` text chunk that image tools read back.

Format: `<prompt>\\nNegative prompt: <neg>\\nSteps: 20, Sampler: Euler a, CFG scale: 7,
Seed: 123, Size: 512x512, Model hash: …, Model: …` (the negative line only when set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SAMPLER_LABELS = {
    "DDIMSampler": "DDIM",
    "LCMSampler": "LCM",
    "EulerSampler": "Euler",
    "EulerAncestralSampler": "Euler a",
}


def a1111_parameters(
    prompt: str,
    negative_prompt: str,
    settings: dict[str, Any],
    model_name: str,
    model_hash: str | None = None,
) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = [
        f"Steps: {settings['num_inference_steps']}",
        f"Sampler: {SAMPLER_LABELS.get(settings['sampler'], settings['sampler'])}",
        f"CFG scale: {settings['guidance_scale']:g}",
        f"Seed: {settings['seed']}",
        f"Size: {settings['width']}x{settings['height']}",
    ]
    if model_hash:
        fields.append(f"Model hash: {model_hash[:10]}")
    fields.append(f"Model: {model_name}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def save_png(image: Any, path: str | Path, parameters: str) -> Path:
    """Write a PIL image as PNG with a `parameters` tEXt chunk (atomically)."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    meta = PngInfo()
    meta.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=meta)
    tmp.replace(path)
    return path
