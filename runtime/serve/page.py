"""The service's web page: `GET /` serves index.html, `GET /page/settings` what it offers.

index.html is plain HTML with one inline script and one inline style: no build step, nothing
fetched from elsewhere. It lists the models from `GET /v1/models`, asks `GET /page/settings`
for each model's sizes and defaults, and generates through `POST /v1/images/generations`
like any other client; when the service answers 401 it asks for the API key and keeps it in
the page's memory only.

`GET /` holds no data, so it needs no key; `GET /page/settings` names the models, so it does
(app.py wraps it like the other keyed endpoints). The page is sent with a
Content-Security-Policy that allows only its own inline script and style (by their SHA-256
hashes, computed from the file when first served), images from this origin or data: URLs,
requests to this origin only, and no framing.

Limits: the sizes offered are a short list around the model's default (its default size,
portrait and landscape at half as tall or wide again, and twice the default), within the
pipeline's pixel limit; other sizes go through the API.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fewstep.inputs import Limits
from fewstep.package import ModelInfo
from fewstep.serve.service import Service

PAGE_FILE = "index.html"


def inline_hashes(html: str, tag: str) -> list[str]:
    """CSP sources ('sha256-…') for the text of each `<tag>` element without attributes,
    hashed as the browser does: its UTF-8 bytes, newlines as read (text mode gives \\n)."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in bodies
    ]


def content_security_policy(html: str) -> str:
    """Only the page's own inline script and style run; images from here or data: URLs
    (the generated PNGs); fetch to this origin only; no plugins, forms, base or framing."""
    scripts = " ".join(inline_hashes(html, "script")) or "'none'"
    styles = " ".join(inline_hashes(html, "style")) or "'none'"
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {scripts}",
            f"style-src {styles}",
            "img-src 'self' data:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


@functools.cache
def page() -> tuple[str, dict[str, str]]:
    """index.html and its response headers, read once from the package."""
    html = importlib.resources.files("fewstep.serve").joinpath(PAGE_FILE).read_text("utf-8")
    headers = {
        "Content-Security-Policy": content_security_policy(html),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",  # frame-ancestors for browsers without CSP level 2
        "Cache-Control": "no-cache",  # revalidate: a new version shows at the next load
    }
    return html, headers


async def index(request: Request) -> Response:
    html, headers = page()
    return Response(html, media_type="text/html; charset=utf-8", headers=headers)


def offered_sizes(info: ModelInfo, limits: Limits) -> list[str]:
    """The sizes ("WxH") the page offers: the default, portrait and landscape (one side ×1.5),
    twice the default; multiples of the model's size multiple, and beyond the default only
    those within `limits`."""
    width, height, multiple = info.default_width, info.default_height, info.size_multiple

    def half_again(side: int) -> int:
        return max(multiple, side * 3 // 2 // multiple * multiple)

    others = [
        (width, half_again(height)),
        (half_again(width), height),
        (2 * width, 2 * height),
    ]
    sizes = [f"{width}x{height}"]  # always: it is what "auto" means
    for w, h in others:
        size = f"{w}x{h}"
        if w * h <= limits.max_pixels and size not in sizes:
            sizes.append(size)
    return sizes


def model_settings(info: ModelInfo, limits: Limits) -> dict[str, Any]:
    return {
        "size": f"{info.default_width}x{info.default_height}",
        "sizes": offered_sizes(info, limits),
        "num_inference_steps": info.default_num_inference_steps,
        "guidance_scale": info.default_guidance_scale,
        "max_images": limits.max_images,
    }


async def settings(request: Request, service: Service) -> Response:
    """Each served model's sizes and defaults, by name (the names of GET /v1/models)."""
    models = {name: model_settings(pipe.info, pipe.limits) for name, pipe in service.models.items()}
    return JSONResponse({"models": models})
