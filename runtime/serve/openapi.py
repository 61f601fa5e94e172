"""The service's OpenAPI 3.1 document, served at `GET /openapi.json`: written by hand as a
dict (no pydantic), for every route of the app.

Request bodies carry the types, ranges and enums the service enforces, taken from the served
models when the document is asked for: model names, steps and images per call up to the
largest of their `Limits`, sizes in multiples of their size multiple (the greatest common
divisor when several models differ). What one schema cannot say is answered with a 400 that
names the field: height × width above the pixel limit, seed + n - 1 past the largest seed, a
model's own limits when several models differ, an ancestral or SDE sampler's eta other than 1.

Every status a route can answer is listed with its body (errors in the service's error
shape, errors.py), `Retry-After` on 429; with an API key, the bearer scheme and its 401 on
every route but `/health` and `/`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import fewstep
from fewstep.inputs import MAX_GUIDANCE_SCALE, MAX_SEED
from fewstep.samplers import SAMPLERS
from fewstep.samplers.a1111 import A1111_SAMPLERS
from fewstep.serve import a1111_api, openai_api
from fewstep.serve.service import MAX_BODY_BYTES, MAX_IMAGE_BODY_BYTES, Service

JSON = "application/json"
FORM = "multipart/form-data"
ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_TEXT = {
    400: "a field is refused; `param` names it",
    401: "missing or wrong API key",
    404: "the model is not served",
    413: f"the request body is over {MAX_BODY_BYTES} bytes ({MAX_IMAGE_BODY_BYTES} bytes "
    "where it carries an input image)",
    429: "the model's queue is full; try again after Retry-After seconds",
    500: "an internal error; its id is logged",
    503: "not ready, or shutting down",
    504: "no images within the request timeout",
}
GENERATION_ERRORS = (400, 404, 413, 429, 500, 503, 504)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What the served models accept, together (the most any of them does)."""

    models: list[str]
    titles: list[str]
    max_steps: int
    max_images: int
    max_prompt_chars: int
    size_multiple: int
    max_side: int

    @classmethod
    def of(cls, service: Service) -> Bounds:
        pipes = list(service.models.values())
        multiple = math.gcd(*[p.info.size_multiple for p in pipes])
        return cls(
            models=list(service.models),
            titles=list(a1111_api.model_titles(service).values()),
            max_steps=max(p.limits.max_steps for p in pipes),
            max_images=max(p.limits.max_images for p in pipes),
            max_prompt_chars=max(p.limits.max_prompt_chars for p in pipes),
            size_multiple=multiple,
            # the other side is at least its multiple
            max_side=max(p.limits.max_pixels // p.info.size_multiple for p in pipes),
        )


# -- schemas ----------------------------------------------------------------------------------


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` or null (a field left at its default)."""
    return {"anyOf": [schema, {"type": "null"}]}


def integer(low: int, high: int | None = None, **more: Any) -> dict[str, Any]:
    schema = {"type": "integer", "minimum": low, **more}
    return schema if high is None else {**schema, "maximum": high}


def text(bounds: Bounds) -> dict[str, Any]:
    return {"type": "string", "maxLength": bounds.max_prompt_chars}


def side(bounds: Bounds) -> dict[str, Any]:
    multiple = bounds.size_multiple
    return integer(multiple, bounds.max_side, multipleOf=multiple)


GUIDANCE = {"type": "number", "minimum": 0, "maximum": MAX_GUIDANCE_SCALE}
ANY: dict[str, Any] = {"description": "accepted and ignored"}
ERROR = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def openai_request(bounds: Bounds) -> dict[str, Any]:
    ignored = {name: ANY for name in openai_api.IGNORED_OPENAI_FIELDS if name != "stream"}
    properties = {
        "prompt": text(bounds),
        "model": {"enum": [*bounds.models, None]},
        "n": nullable(integer(1, bounds.max_images)),
        "size": {
            "anyOf": [
                {"type": "string", "pattern": "^[0-9]{1,6}x[0-9]{1,6}$"},
                {"enum": ["auto", None]},
            ],
            "description": '"WIDTHxHEIGHT" in multiples of the model\'s size multiple',
        },
        "response_format": {"enum": ["b64_json", None]},
        "seed": nullable(integer(0, MAX_SEED, description="image i uses seed + i")),
        "num_inference_steps": nullable(integer(1, bounds.max_steps)),
        "guidance_scale": nullable(GUIDANCE),
        "negative_prompt": nullable(text(bounds)),
        "scheduler": {"enum": [*SAMPLERS, None]},
        "stream": {"enum": [False, None]},
        **ignored,
    }
    return {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": properties,
    }


def openai_edit_request(bounds: Bounds) -> dict[str, Any]:
    """The edits form: the generations fields, an image file and a strength."""
    generation = openai_request(bounds)
    properties = {
        **{name: schema for name, schema in generation["properties"].items() if name != "stream"},
        "image": {"type": "string", "format": "binary", "description": "a PNG, JPEG or WebP"},
        "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "input_fidelity": ANY,
    }
    return {**generation, "required": ["image", "prompt"], "properties": properties}


def a1111_img2img_request(bounds: Bounds) -> dict[str, Any]:
    properties = {
        **a1111_properties(
            bounds,
            a1111_api.IMG2IMG_IGNORED_FIELDS,
            a1111_api.IMG2IMG_UNSUPPORTED,
            a1111_api.TXT2IMG_ONLY,
        ),
        "init_images": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "string", "contentEncoding": "base64"},
            "description": "base64 image files (a data URL prefix allowed); the first is used",
        },
        "denoising_strength": nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "resize_mode": {"enum": [0, None], "description": "0: just resize"},
    }
    return {
        "type": "object",
        "required": ["init_images"],
        "additionalProperties": False,
        "properties": properties,
    }


def a1111_request(bounds: Bounds) -> dict[str, Any]:
    properties = a1111_properties(bounds, a1111_api.IGNORED_FIELDS, a1111_api.UNSUPPORTED)
    return {"type": "object", "additionalProperties": False, "properties": properties}


def a1111_properties(
    bounds: Bounds,
    ignored: tuple[str, ...],
    unsupported: dict[str, tuple[str, str]],
    left_out: tuple[str, ...] = (),
) -> dict[str, Any]:
    samplers = {"enum": [*A1111_SAMPLERS, None]}
    properties = {
        "prompt": nullable(text(bounds)),
        "negative_prompt": nullable(text(bounds)),
        "steps": nullable(integer(1, bounds.max_steps)),
        "cfg_scale": nullable(GUIDANCE),
        "width": nullable(side(bounds)),
        "height": nullable(side(bounds)),
        "seed": nullable(integer(-1, MAX_SEED, description="-1: random; image i uses seed + i")),
        "batch_size": nullable(integer(1, bounds.max_images)),
        "n_iter": nullable(integer(1, bounds.max_images)),
        "sampler_name": samplers,
        "sampler_index": samplers,
        "eta": nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "send_images": {"type": ["boolean", "null"]},
        "override_settings": nullable(
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "sd_model_checkpoint": {"enum": [*bounds.models, *bounds.titles, None]}
                },
            }
        ),
        **{name: ANY for name in ignored},
        **{name: a1111_api.NEUTRAL[neutral][1] for name, (_, neutral) in unsupported.items()},
    }
    return {name: schema for name, schema in properties.items() if name not in left_out}


def a1111_answer() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["images", "parameters", "info"],
        "properties": {
            "images": {
                "type": "array",
                "items": {"type": "string", "contentEncoding": "base64"},
                "description": "PNGs with their infotext as the `parameters` chunk",
            },
            "parameters": {"type": "object"},
            "info": {"type": "string", "description": "a JSON object, as text"},
        },
    }


def openai_answer() -> dict[str, Any]:
    image = {
        "type": "object",
        "required": ["b64_json"],
        "properties": {"b64_json": {"type": "string", "contentEncoding": "base64"}},
    }
    return {
        "type": "object",
        "required": ["created", "data"],
        "properties": {"created": {"type": "integer"}, "data": {"type": "array", "items": image}},
    }


def list_of(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item}


def strict(**properties: Any) -> dict[str, Any]:
    """An object with exactly these properties."""
    return {
        "type": "object",
        "required": list(properties),
        "additionalProperties": False,
        "properties": properties,
    }


STRING = {"type": "string"}
OPTIONAL_STRING = {"type": ["string", "null"]}


def models_answer() -> dict[str, Any]:
    model = strict(
        id=STRING, object={"const": "model"}, created={"type": "integer"}, owned_by=STRING
    )
    return strict(object={"const": "list"}, data=list_of(model))


def samplers_answer() -> dict[str, Any]:
    sampler = strict(
        name={"enum": list(A1111_SAMPLERS)}, aliases=list_of(STRING), options={"type": "object"}
    )
    return list_of(sampler)


def sd_models_answer() -> dict[str, Any]:
    return list_of(
        strict(
            title=STRING,
            model_name=STRING,
            hash=OPTIONAL_STRING,
            sha256=OPTIONAL_STRING,
            filename=STRING,
            config=OPTIONAL_STRING,
        )
    )


def page_settings_answer() -> dict[str, Any]:
    settings = strict(
        size=STRING,
        sizes=list_of(STRING),
        num_inference_steps={"type": "integer"},
        guidance_scale={"type": "number"},
        max_images={"type": "integer"},
    )
    return strict(models={"type": "object", "additionalProperties": settings})


# -- operations -------------------------------------------------------------------------------


def content(schema: dict[str, Any], media_type: str = JSON) -> dict[str, Any]:
    return {media_type: {"schema": schema}}


def error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {"description": ERROR_TEXT[status], "content": content(ERROR_REF)}
    if status == 429:
        response["headers"] = {
            "Retry-After": {
                "description": "seconds to wait",
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }
        }
    return response


def operation(
    summary: str,
    answer: dict[str, Any],
    errors: tuple[int, ...] = (500,),
    *,
    keyed: bool = True,
    key_set: bool = False,
    body: dict[str, Any] | None = None,
    body_type: str = JSON,
) -> dict[str, Any]:
    """One operation: 200 with `answer` (a response object), `errors` in the error shape,
    and 401 when it is keyed and the service has a key."""
    responses = {"200": answer}
    statuses = sorted({*errors, 401} if keyed and key_set else set(errors))
    responses.update({str(status): error_response(status) for status in statuses})
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": content(body, body_type)}
    if not keyed:
        op["security"] = []
    return op


def ok(description: str, schema: dict[str, Any], media_type: str = JSON) -> dict[str, Any]:
    return {"description": description, "content": content(schema, media_type)}


def document(service: Service) -> dict[str, Any]:
    """The OpenAPI 3.1 document of an app serving `service`'s models."""
    bounds = Bounds.of(service)
    key_set = service.api_key is not None

    def op(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return operation(*args, key_set=key_set, **kwargs)

    paths = {
        "/": {
            "get": op("The web page", ok("the page", STRING, "text/html"), (), keyed=False),
        },
        "/page/settings": {
            "get": op(
                "Each model's sizes and defaults, for the page",
                ok("the settings", page_settings_answer()),
            ),
        },
        "/health": {
            "get": op(
                "Whether the process answers",
                ok("it does", strict(status={"const": "ok"})),
                (),
                keyed=False,
            )
        },
        "/ready": {
            "get": op(
                "Whether every model's batcher runs",
                ok("ready", strict(status={"const": "ready"}, models=list_of(STRING))),
                (500, 503),
            )
        },
        "/metrics": {
            "get": op(
                "Prometheus metrics",
                ok("the metrics in Prometheus' text format", STRING, "text/plain"),
            )
        },
        "/v1/models": {"get": op("The served models (OpenAI)", ok("the models", models_answer()))},
        "/v1/images/generations": {
            "post": op(
                "Generate images (OpenAI's Images API)",
                ok("the images", openai_answer()),
                GENERATION_ERRORS,
                body=openai_request(bounds),
            )
        },
        "/v1/images/edits": {
            "post": op(
                "Edit an image: img2img (OpenAI's Images API; multipart/form-data)",
                ok("the images", openai_answer()),
                GENERATION_ERRORS,
                body=openai_edit_request(bounds),
                body_type=FORM,
            )
        },
        "/sdapi/v1/img2img": {
            "post": op(
                "Generate images from an image (A1111's img2img)",
                ok("the images, the parameters used and A1111's info", a1111_answer()),
                GENERATION_ERRORS,
                body=a1111_img2img_request(bounds),
            )
        },
        "/sdapi/v1/txt2img": {
            "post": op(
                "Generate images (A1111's txt2img)",
                ok("the images, the parameters used and A1111's info", a1111_answer()),
                GENERATION_ERRORS,
                body=a1111_request(bounds),
            )
        },
        "/sdapi/v1/samplers": {
            "get": op("A1111's names of the samplers", ok("the samplers", samplers_answer()))
        },
        "/sdapi/v1/sd-models": {
            "get": op("The served models (A1111)", ok("the models", sd_models_answer()))
        },
        "/openapi.json": {
            "get": op("This document", ok("the OpenAPI document", {"type": "object"}))
        },
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "fewstep", "version": fewstep.__version__},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR}},
    }
    if key_set:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


async def openapi_json(request: Request, service: Service) -> Response:
    return JSONResponse(document(service))
