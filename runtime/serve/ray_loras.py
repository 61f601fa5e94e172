"""LoRA variants of the served models, for Ray Serve's multiplexing (fewstep.serve.ray_app).

A generation request asks for LoRAs with A1111's prompt syntax, `<lora:NAME:SCALE>` (SCALE
defaults to 1; the tags are taken out of the prompt, as A1111 does), or, on the OpenAI route,
with the field `loras`: {"NAME": SCALE, ...}. NAME is a file `NAME.safetensors` in the
replica's LoRA folder (kohya or PEFT layout). A model with a set of LoRAs is a *variant*,
named `MODEL+NAME:SCALE+...` (names sorted, scales as `%g`; that name is also its Ray
multiplexed model id). `LoraVariants`, an ASGI layer in front of the app, has the variant
loaded (the LoRAs folded into a copy of the model's weights, `Pipeline.from_pretrained(...,
loras=...)`) and sends the request to it as to any served model, with its own batcher;
requests without LoRAs go to the model itself. The answer names the variant in
`X-Fewstep-Variant`; a client that sends that name as Ray's `serve_multiplexed_model_id`
header is routed to a replica that has the variant loaded.

Limits: the prompt's tags are the positive prompt's only; A1111's two-scale form
(`<lora:NAME:TE:UNET>`) is refused; a variant holds a full copy of the model's folded
weights, so `max_variants` bounds the memory; the variants loaded are listed in
`/v1/models` and each has its own metrics labels.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from fewstep.serve.a1111_api import chosen_model
from fewstep.serve.errors import APIError, error_response
from fewstep.serve.service import MAX_BODY_BYTES, Service

LORA_TAG = re.compile(r"<lora:([^<>]*)>")
LORA_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\- ]{0,127}")
MAX_SCALE = 10.0
MAX_LORAS = 8  # per request
OPENAI_ROUTE = "/v1/images/generations"
A1111_ROUTE = "/sdapi/v1/txt2img"
VARIANT_HEADER = b"x-fewstep-variant"

LoraSet = tuple[tuple[str, float], ...]  # (name, scale), sorted by name


def lora_scale(value: Any, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise APIError(400, f"{where}: the scale must be a number, got {value!r:.40}", where)
    if abs(value) > MAX_SCALE:
        raise APIError(400, f"{where}: the scale must be within ±{MAX_SCALE:g}, got {value}", where)
    return float(value)


def lora_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or LORA_NAME.fullmatch(value) is None:
        raise APIError(
            400,
            f"{where}: a LoRA name is letters, digits, '_', '-', '.' and spaces (no path), "
            f"got {value!r:.60}",
            where,
        )
    return value


def prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:NAME:SCALE>` tags, and the tags' (name, scale)."""
    loras = []
    for match in LORA_TAG.finditer(prompt):
        name, *scales = match.group(1).split(":")
        if len(scales) > 1:
            raise APIError(
                400, f"prompt: <lora:NAME:SCALE> takes one scale, got {match.group()!r}", "prompt"
            )
        scale = lora_scale(scales[0], "prompt") if scales else 1.0
        loras.append((lora_name(name, "prompt"), scale))
    return LORA_TAG.sub("", prompt), loras


def field_loras(value: Any) -> list[tuple[str, float]]:
    """The OpenAI route's `loras` field: {"NAME": SCALE, ...}."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise APIError(
            400, f'loras must be an object {{"NAME": SCALE}}, got {value!r:.60}', "loras"
        )
    return [(lora_name(k, "loras"), lora_scale(v, "loras")) for k, v in value.items()]


def lora_set(loras: list[tuple[str, float]]) -> LoraSet:
    """Sorted by name, scale-0 LoRAs dropped; a name twice or more than MAX_LORAS refused."""
    names = [name for name, _ in loras]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise APIError(
            400, f"a LoRA may be asked for once per request, got {twice} twice", "prompt"
        )
    if len(loras) > MAX_LORAS:
        raise APIError(400, f"at most {MAX_LORAS} LoRAs per request, got {len(loras)}", "prompt")
    return tuple(sorted((name, scale) for name, scale in loras if scale != 0))


def variant_name(model: str, loras: LoraSet) -> str:
    return "+".join([model, *(f"{name}:{scale:g}" for name, scale in loras)])


class LoraVariants:
    """ASGI layer sending generation requests that ask for LoRAs to their model's variant
    (module docstring). `load(variant, model, loras)` makes sure the variant is served
    (Ray's multiplexed loader, which may unload the least recently used one)."""

    def __init__(
        self,
        app: Any,
        service: Service,
        lora_dir: Path,
        load: Callable[[str, str, LoraSet], Awaitable[Any]],
    ):
        self.app, self.service, self.lora_dir, self.load = app, service, lora_dir, load
        self.state = app.state
        self.models = list(service.models)  # LoRAs go on these, not on a loaded variant

    def add_exception_handler(self, *args: Any) -> None:
        self.app.add_exception_handler(*args)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
        elif route in (OPENAI_ROUTE, A1111_ROUTE):
            await self._generation(scope, receive, send, route)
        else:
            await self.app(scope, receive, send)

    async def _generation(self, scope: Scope, receive: Receive, send: Send, route: str) -> None:
        try:
            self.service.check_key(Request(scope))
        except APIError:  # the app answers 401, before the body is read
            await self.app(scope, receive, send)
            return
        messages, complete = await read_up_to(receive, MAX_BODY_BYTES)
        body = json_object(b"".join(m.get("body", b"") for m in messages)) if complete else None
        if body is None:  # too big or not a JSON object: the app answers as it does
            await self.app(scope, replay(messages, receive), send)
            return
        try:
            variant, body = await self._variant_of(body, route)
        except APIError as e:
            await error_response(e)(scope, receive, send)
            return
        if variant is None:
            await self.app(scope, replay(messages, receive), send)
            return
        payload = json.dumps(body).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(payload)).encode())]}
        rewritten: list[Message] = [{"type": "http.request", "body": payload, "more_body": False}]
        await self.app(scope, replay(rewritten, receive), naming(send, variant))

    async def _variant_of(self, body: dict[str, Any], route: str) -> tuple[str | None, Any]:
        """The variant the request asks for (None: no LoRAs), and the body for the app."""
        prompt, loras = body.get("prompt"), list[tuple[str, float]]()
        if isinstance(prompt, str):
            prompt, loras = prompt_loras(prompt)
        if route == OPENAI_ROUTE:
            loras += field_loras(body.get("loras"))
        chosen = lora_set(loras)
        if not chosen:
            if route == OPENAI_ROUTE and "loras" in body:
                return "", {k: v for k, v in body.items() if k != "loras"}
            return None, body
        if route == OPENAI_ROUTE:
            model = self.service.model_named(body.get("model"))
        else:
            model = chosen_model(self.service, body.get("override_settings"))
        if model not in self.models:
            raise APIError(
                400, f"LoRAs go on a served model {self.models}, not on {model!r}", "model"
            )
        for name, _ in chosen:
            if not (self.lora_dir / f"{name}.safetensors").is_file():
                where = "loras" if name in (body.get("loras") or {}) else "prompt"
                raise APIError(404, f"LoRA {name!r} is not served", where, "lora_not_found")
        variant = variant_name(model, chosen)
        try:
            await self.load(variant, model, chosen)
        except ValueError as e:  # a LoRA that does not fit the model
            raise APIError(400, f"LoRAs {list(dict(chosen))} on {model!r}: {e}", "prompt") from e
        body = {**body, "prompt": prompt}
        if route == OPENAI_ROUTE:
            body = {k: v for k, v in body.items() if k != "loras"} | {"model": variant}
        else:
            settings = body.get("override_settings") or {}
            body["override_settings"] = {**settings, "sd_model_checkpoint": variant}
        return variant, body


async def read_up_to(receive: Receive, limit: int) -> tuple[list[Message], bool]:
    """The body's messages, read until its end (True) or past `limit` bytes or a disconnect
    (False)."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, False
        size += len(message.get("body", b""))
        if size > limit:
            return messages, False
        if not message.get("more_body", False):
            return messages, True


def json_object(data: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def replay(messages: list[Message], receive: Receive) -> Receive:
    """`receive` giving `messages` first (what was read of the body), then its own."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def naming(send: Send, variant: str) -> Send:
    async def send_named(message: Message) -> None:
        if message["type"] == "http.response.start" and variant:
            headers = [*message.get("headers", []), (VARIANT_HEADER, variant.encode())]
            message = {**message, "headers": headers}
        await send(message)

    return send_named


__all__ = ["LoraVariants", "field_loras", "lora_set", "prompt_loras", "variant_name"]
