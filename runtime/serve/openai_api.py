"""OpenAI's Images API: `POST /v1/images/generations` and `GET /v1/models`.

Request fields: OpenAI's `prompt`, `model`, `n`, `size` ("WxH" or "auto"), `response_format`
("b64_json" only: no image URLs are kept); fewstep's own `seed` (image i uses seed + i, as
A1111 does; drawn at random when absent), `num_inference_steps`, `guidance_scale`,
`negative_prompt`, `scheduler` (the openai client sends these with `extra_body`). OpenAI fields
without a meaning here (`quality`, `style`, `user`, ...) are accepted and ignored; any other
field is refused, naming it. Each image comes back as a base64 PNG carrying A1111's
`parameters` text chunk.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fewstep.batching import GenerationRequest
from fewstep.serve.errors import APIError
from fewstep.serve.pngs import png_base64
from fewstep.serve.service import Service, read_json_body

# fewstep's fields of a generation request, besides OpenAI's prompt/model/n/size/response_format
FEWSTEP_FIELDS = ("seed", "num_inference_steps", "guidance_scale", "negative_prompt", "scheduler")
OPENAI_FIELDS = ("prompt", "model", "n", "size", "response_format")
# OpenAI's fields that change nothing here (quality, style, output options, moderation...)
IGNORED_OPENAI_FIELDS = (
    "quality",
    "style",
    "user",
    "background",
    "output_format",
    "output_compression",
    "moderation",
    "safety_identifier",
    "partial_images",
    "stream",
)
KNOWN_FIELDS = frozenset(OPENAI_FIELDS + FEWSTEP_FIELDS + IGNORED_OPENAI_FIELDS)
SIZE_PATTERN = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")


def parse_size(value: Any) -> tuple[int | None, int | None]:
    """ "WxH" → (height, width); None or "auto" → the model's default size."""
    if value is None or value == "auto":
        return None, None
    match = SIZE_PATTERN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise APIError(400, f'size must be "WIDTHxHEIGHT" such as "512x512", got {value!r}', "size")
    width, height = int(match.group(1)), int(match.group(2))
    return height, width


def param_of(message: str) -> str | None:
    """The request field a fewstep check's message names (it starts with the argument)."""
    name = re.split(r"[\s\[]", message, maxsplit=1)[0]
    if name in ("height", "width"):
        return "size"
    return name if name in KNOWN_FIELDS else None


def generation_request(body: dict[str, Any]) -> GenerationRequest:
    """A checked GenerationRequest from the body's fields (400 for any bad one)."""
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise APIError(
            400, f"unknown fields {unknown}; accepted: {sorted(KNOWN_FIELDS)}", unknown[0]
        )
    if "prompt" not in body:
        raise APIError(400, "prompt is required", "prompt")
    response_format = body.get("response_format")
    if response_format not in (None, "b64_json"):
        raise APIError(
            400,
            f'response_format must be "b64_json" (fewstep serves no image URLs), '
            f"got {response_format!r}",
            "response_format",
        )
    if body.get("stream") not in (None, False):
        raise APIError(400, "stream is not supported; leave it out or false", "stream")
    height, width = parse_size(body.get("size"))
    seed = body.get("seed")
    n = body.get("n")
    fields = {k: body[k] for k in FEWSTEP_FIELDS if body.get(k) is not None}
    try:
        return GenerationRequest(
            **{
                **fields,
                "prompt": body["prompt"],
                "n": 1 if n is None else n,
                "seed": secrets.randbelow(2**63) if seed is None else seed,
                "height": height,
                "width": width,
            }
        )
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), param_of(str(e))) from e


async def list_models(request: Request, service: Service) -> Response:
    data = [
        {"id": name, "object": "model", "created": service.created, "owned_by": "fewstep"}
        for name in service.models
    ]
    return JSONResponse({"object": "list", "data": data})


async def generate_images(request: Request, service: Service) -> Response:
    body = await read_json_body(request)
    model = service.model_named(body.get("model"))
    gen = generation_request(body)
    images = await service.generate(model, gen, request, param_of)
    pngs = await service.encode(model, png_base64, images, gen, model, service.model_hashes[model])
    return JSONResponse({"created": int(time.time()), "data": [{"b64_json": p} for p in pngs]})
