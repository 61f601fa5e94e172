"""A request's images as base64 PNGs, each with A1111's `parameters` text chunk (its
infotext): what both APIs answer with."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

from fewstep.batching import GenerationRequest, RequestImages
from fewstep.image_files import a1111_parameters, encode_image


def infotexts(
    images: RequestImages, request: GenerationRequest, model: str, model_hash: Any
) -> list[str]:
    """Each image's A1111 parameters text (its own seed), from what the pipeline resolved."""
    settings = images.settings
    guidance = settings["guidance_scale"]
    settings = {
        **settings,
        "guidance_scale": guidance[0] if isinstance(guidance, list) else guidance,
    }
    return [
        a1111_parameters(
            request.prompt, request.negative_prompt, {**settings, "seed": seed}, model, model_hash
        )
        for seed in request.seeds
    ]


def encode_pngs(images: Sequence[Any], texts: Sequence[str]) -> list[str]:
    """PIL `images` as base64 PNGs, each carrying its text as the `parameters` chunk."""
    encoded = []
    for image, text in zip(images, texts, strict=True):
        buffer = io.BytesIO()
        encode_image(image, "PNG", text, buffer)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def png_base64(
    images: RequestImages, request: GenerationRequest, model: str, model_hash: Any
) -> list[str]:
    """Each image as a base64 PNG with its A1111 `parameters` chunk."""
    return encode_pngs(images, infotexts(images, request, model, model_hash))
