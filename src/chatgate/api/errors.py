"""Errors on the wire: the one table from the chat core's error codes to HTTP statuses,
and the error shape of each HTTP API.

The core raises :class:`ChatError` with a native code and knows nothing of HTTP. Here a
code becomes a status, and an error becomes a body in the shape its API's clients
parse: the native ``{"detail", "code"}`` (``POST /chat``, ``/conversations``, …),
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` under ``/v1`` and Ollama's
``{"error": MESSAGE}`` under ``/api``. WebSocket clients get the same codes in ``error``
events, which their dialects encode.
"""

from __future__ import annotations

import math
from typing import Any, Final, Literal

import orjson
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from chatgate.chat.events import ChatError, ErrorCode

STATUS: Final[dict[ErrorCode, int]] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "busy": 409,
    "too_large": 413,
    "rate_limited": 429,
    "internal": 500,
    "provider_unavailable": 502,
    "provider_error": 502,
    "timeout": 502,
}
#: ``POST /chat`` (the Pi Agent server's contract) answers every failure of the upstream,
#: a model it does not have included, with 502.
UPSTREAM_FAILURE = 502
#: The OpenAI error ``code`` for the native codes that OpenAI names otherwise.
_OPENAI_CODES: Final[dict[str, str]] = {"not_found": "model_not_found", "unauthorized": "invalid_api_key"}

Shape = Literal["native", "openai", "ollama"]


class RequestError(ChatError):
    """A request refused as malformed or unsupported; ``param`` names the field."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__("bad_request", message)
        self.param = param


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def status_of(code: ErrorCode) -> int:
    return STATUS.get(code, 500)


def shape_of(path: str) -> Shape:
    """Which API a path belongs to, and so the error shape its clients expect."""
    if path == "/v1" or path.startswith("/v1/"):
        return "openai"
    if path == "/api" or path.startswith("/api/"):
        return "ollama"
    return "native"


def openai_error(code: str, message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """The inner object of OpenAI's ``{"error": …}``."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"message": message, "type": kind, "param": param, "code": _OPENAI_CODES.get(code, code)}


def error_body(exc: ChatError, shape: Shape, status: int) -> dict[str, Any]:
    if shape == "openai":
        param = exc.param if isinstance(exc, RequestError) else "model" if exc.code == "not_found" else None
        return {"error": openai_error(exc.code, exc.message, status, param)}
    if shape == "ollama":
        return {"error": exc.message}
    return {"detail": exc.message, "code": exc.code}


def error_response(
    exc: ChatError, shape: Shape, *, status: int | None = None, headers: dict[str, str] | None = None
) -> Response:
    status = status_of(exc.code) if status is None else status
    response = ORJSONResponse(error_body(exc, shape, status), status_code=status, headers=headers)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(math.ceil(exc.retry_after))
    return response


async def handle_chat_error(request: Request, exc: Exception) -> Response:
    """The application's handler for every :class:`ChatError` a route raises."""
    assert isinstance(exc, ChatError)
    return error_response(exc, shape_of(request.url.path))


#: Routing's own refusals (no such route, a route without that method), by their status:
#: OpenAI's ``code`` (it answers an unknown path with ``null``) and the message.
_ROUTING: Final[dict[int, tuple[str | None, str]]] = {
    404: (None, "Invalid URL ({method} {path})"),
    405: ("method_not_allowed", "Method {method} is not allowed for {path}"),
}


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Routing's 404 and 405 under ``/v1`` and ``/api`` in that API's shape, so its clients
    raise their usual errors (``openai.NotFoundError``, ``ollama.ResponseError``); every
    other path and status keeps FastAPI's ``{"detail"}``."""
    assert isinstance(exc, HTTPException)
    shape = shape_of(request.url.path)
    routing = _ROUTING.get(exc.status_code)
    if shape == "native" or routing is None:
        return await http_exception_handler(request, exc)
    code, template = routing
    message = template.format(method=request.method, path=request.url.path)
    body: dict[str, Any] = (
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        if shape == "openai"
        else {"error": message}
    )
    return ORJSONResponse(body, status_code=exc.status_code, headers=exc.headers)
