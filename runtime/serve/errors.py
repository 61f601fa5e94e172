"""Errors answered in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, by every
endpoint of the service (the A1111 routes too: its clients read the status and the message)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

logger = logging.getLogger("fewstep.serve")

STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class APIError(Exception):
    """An error answered in OpenAI's shape with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


class ClientGone(Exception):
    """The client disconnected before its images were ready; nothing is sent back."""


def error_response(error: APIError) -> JSONResponse:
    body = {
        "error": {
            "message": error.message,
            "type": STATUS_TYPES.get(error.status, "invalid_request_error"),
            "param": error.param,
            "code": error.code,
        }
    }
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def answered_in_error_shape(
    endpoint: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """`endpoint` with APIErrors answered in OpenAI's shape and anything else as a 500 whose
    id is logged with the traceback (the client sees only the id)."""

    async def handle(request: Request) -> Response:
        try:
            return await endpoint(request)
        except APIError as e:
            return error_response(e)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the access log shows it
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            logger.exception("internal error %s on %s %s", error_id, request.method, request.url)
            return error_response(APIError(500, f"internal error (id {error_id})"))

    return handle


async def http_error(request: Request, exc: Any) -> Response:
    """Starlette's own errors (unknown path, wrong method) in OpenAI's shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else None  # 405's Allow
    message = f"{detail}: {request.method} {request.url.path}"
    return error_response(APIError(status, message, headers=headers))
