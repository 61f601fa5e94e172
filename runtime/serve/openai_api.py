"""OpenAI's Images API: `POST /v1/images/generations`, `POST /v1/images/edits` and
`GET /v1/models`.

Request fields: OpenAI's `prompt`, `model`, `n`, `size` ("WxH" or "auto"), `response_format`
("b64_json" only: no image URLs are kept); fewstep's own `seed` (image i uses seed + i, as
A1111 does; drawn at random when absent), `num_inference_steps`, `guidance_scale`,
`negative_prompt`, `scheduler` (the openai client sends these with `extra_body`). OpenAI fields
without a meaning here (`quality`, `style`, `user`, ...) are accepted and ignored; any other
field is refused, naming it. Each image comes back as a base64 PNG carrying A1111's
`parameters` text chunk.

Edits (img2img) come as OpenAI sends them, multipart/form-data: an `image` file (PNG, JPEG or
WebP; one image, used for all n images; `image[]` as the client names a list, of one),
`prompt`, `model`, `n`, `size` (absent: the image's size rounded down to the model's size
multiple; given: the image is resized to it), `response_format`; fewstep's fields as above
plus `strength` (default 0.8, SDXL 0.3, as diffusers'), as form fields (the client's `extra_body`).
`mask` is refused: fewstep does no inpainting. The body is bounded by `MAX_IMAGE_BODY_BYTES`
(413 beyond), its parts by `MAX_FORM_FILES` and `MAX_FORM_FIELDS`.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fewstep.batching import GenerationRequest
from fewstep.serve.errors import APIError
from fewstep.serve.pngs import png_base64
from fewstep.serve.service import (
    MAX_IMAGE_BODY_BYTES,
    Service,
    decode_image,
    read_body,
    read_json_body,
)

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
# edits: the form's fields, besides the image and the generation fields
EDIT_IMAGE_FIELDS = ("image", "image[]")
EDIT_KNOWN_FIELDS = KNOWN_FIELDS | {"strength", "mask", "input_fidelity", *EDIT_IMAGE_FIELDS}
# form fields are text: these are numbers
INTEGER_FIELDS = ("n", "seed", "num_inference_steps")
NUMBER_FIELDS = ("guidance_scale", "strength")
MAX_FORM_FILES = 2  # the image (a second one is refused by name, not by the parser)
MAX_FORM_FIELDS = 32
MAX_FORM_FIELD_BYTES = 64 * 1024  # a text field's (the prompt's); the image file is bounded
# by the body's limit
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
    return name if name in EDIT_KNOWN_FIELDS else None


def generation_request(
    body: dict[str, Any], known: frozenset[str] = KNOWN_FIELDS, **img2img: Any
) -> GenerationRequest:
    """A checked GenerationRequest from the body's fields (400 for any bad one); edits
    add the `image` and its `strength`."""
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(400, f"unknown fields {unknown}; accepted: {sorted(known)}", unknown[0])
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
                **img2img,
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


async def read_form(request: Request) -> FormData:
    """The multipart (or urlencoded) form, its body read at most MAX_IMAGE_BODY_BYTES far."""
    data = await read_body(request, MAX_IMAGE_BODY_BYTES)

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": data, "more_body": False}

    try:
        return await Request(request.scope, replay).form(
            max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FORM_FIELD_BYTES
        )
    except HTTPException as e:  # the form parser's refusals (too many parts, bad multipart)
        raise APIError(400, f"the request body is not a valid form: {e.detail}") from e


def form_fields(form: FormData) -> tuple[dict[str, Any], UploadFile]:
    """The form's text fields (numbers parsed) and its one image file; 400 naming a field
    given twice, a number that is none, a mask, or an image missing or not a file."""
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name in fields or (name in EDIT_IMAGE_FIELDS and fields.keys() & EDIT_IMAGE_FIELDS):
            raise APIError(400, f"{name} must be given once (one image per request)", name)
        fields[name] = value
    if "mask" in fields:
        raise APIError(400, "mask: fewstep does no inpainting; leave mask out", "mask")
    image = fields.pop("image", None)
    image = fields.pop("image[]", None) if image is None else image
    if not isinstance(image, UploadFile):
        raise APIError(400, "image must be an image file (multipart/form-data)", "image")
    for name, value in fields.items():
        if isinstance(value, UploadFile):
            raise APIError(400, f"{name} must be a text field, got a file", name)
        if name in INTEGER_FIELDS or name in NUMBER_FIELDS:
            fields[name] = form_number(name, value)
    return fields, image


def form_number(name: str, value: str) -> int | float:
    """A form field's number: an integer field's integer, else a finite float."""
    try:
        return int(value) if name in INTEGER_FIELDS else float(value)
    except ValueError as e:
        kind = "an integer" if name in INTEGER_FIELDS else "a number"
        raise APIError(400, f"{name} must be {kind}, got {value!r:.80}", name) from e


async def edit_images(request: Request, service: Service) -> Response:
    form = await read_form(request)
    try:
        fields, upload = form_fields(form)
        model = service.model_named(fields.get("model"))
        unknown = sorted(set(fields) - EDIT_KNOWN_FIELDS)  # before the image is decoded
        if unknown:
            accepted = sorted(EDIT_KNOWN_FIELDS)
            raise APIError(400, f"unknown fields {unknown}; accepted: {accepted}", unknown[0])
        data = await upload.read()
    finally:
        await form.close()
    image = await decode_image(data, "image", service.models[model])
    strength = fields.pop("strength", None)
    gen = generation_request(fields, EDIT_KNOWN_FIELDS, image=image, strength=strength)
    images = await service.generate(model, gen, request, param_of)
    pngs = await service.encode(model, png_base64, images, gen, model, service.model_hashes[model])
    return JSONResponse({"created": int(time.time()), "data": [{"b64_json": p} for p in pngs]})
