"""Who is calling, decided once per request by one middleware in front of every route.

An API key comes from ``Authorization: Bearer``, ``X-API-Key`` or (for browsers'
WebSockets, which cannot set headers) the ``api_key`` query parameter. The owner recorded
on conversations is a digest of the key, never the key itself. Handlers read the result
with :func:`caller`; with no keys configured every caller is anonymous (``None``).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from chatgate.api.errors import error_response, shape_of
from chatgate.chat.events import ChatError

#: Routes that answer without a key when keys are on.
PUBLIC_PATHS = frozenset(
    {"/", "/health", "/health/live", "/health/ready", "/agents", "/metrics",
     "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/api/version", "/api/ps"}
)


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def caller(connection: HTTPConnection) -> str | None:
    """The owner the middleware identified for this request; ``None`` when anonymous."""
    owner: str | None = connection.scope.get("state", {}).get("owner")
    return owner


def refusal(connection: HTTPConnection) -> ChatError | None:
    """Why a WebSocket handshake was not authenticated; its dialect says so to the client."""
    refused: ChatError | None = connection.scope.get("state", {}).get("refused")
    return refused


class Authentication:
    """Identify every HTTP request and WebSocket handshake; answer 401 (in the route's
    API shape) to an HTTP request without a valid key, except on public paths. A refused
    WebSocket is let through, marked: it is told in its own dialect and closed."""

    def __init__(self, app: ASGIApp, keys: frozenset[str], public_paths: frozenset[str] = PUBLIC_PATHS) -> None:
        self.app = app
        self._keys = keys
        self._public = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        try:
            state["owner"] = self._identify(scope)
        except ChatError as exc:
            state["owner"] = None
            if scope["type"] == "websocket":
                state["refused"] = exc
            elif scope["path"] not in self._public:
                await error_response(exc, shape_of(scope["path"]))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _identify(self, scope: Scope) -> str | None:
        if not self._keys:
            return None
        key = _presented_key(scope)
        if key is not None and any(hmac.compare_digest(key, k) for k in self._keys):
            return owner_of(key)
        raise ChatError("unauthorized", "a valid API key is required")


def _presented_key(scope: Scope) -> str | None:
    headers = Headers(scope=scope)
    header = headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    key = headers.get("x-api-key")
    if key:
        return key
    query = scope.get("query_string", b"").decode("latin-1")
    return next((value for name, value in parse_qsl(query) if name == "api_key"), None)
