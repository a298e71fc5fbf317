"""``chatgate_http_requests_total`` and ``chatgate_http_request_duration_seconds``: a pure
ASGI middleware labelling each request by the template of the route that served it
(``/v1/models/{model:path}``), never its raw path, which a client could make unbounded.

A WebSocket handshake counts under its route with method ``GET``: status 101 when
accepted, 403 when closed before, or the status of a refusal sent as an HTTP response;
its duration is the handshake's. A request refused before routing (a missing key, a
foreign Host) is matched against the routes afterwards, which costs only such requests;
one no route matches is ``unmatched``.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """Counts and times every HTTP request and WebSocket handshake of the app it wraps,
    into ``scope["app"].state.gateway.metrics`` (nothing before the gateway has started)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 0
        counted = False

        def count() -> None:
            nonlocal counted
            counted = True
            gateway = getattr(scope["app"].state, "gateway", None)
            if gateway is not None:
                method = "GET" if kind == "websocket" else scope["method"]
                gateway.metrics.request_done(
                    route_of(scope), method if method in METHODS else "other", status or 500,
                    time.perf_counter() - began,
                )

        async def watched_send(message: Message) -> None:
            nonlocal status
            if status == 0:
                what = message["type"]
                if what == "http.response.start" or what == "websocket.http.response.start":
                    status = message["status"]
                elif what == "websocket.accept" or what == "websocket.close":
                    # A socket may stay open for hours: its handshake counts when it ends.
                    status = 101 if what == "websocket.accept" else 403
                    count()
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            if not counted:
                count()


def route_of(scope: Scope) -> str:
    """The template of the route that served ``scope``."""
    route = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", UNMATCHED))
    params: dict[str, str] | None = scope.get("path_params")
    if scope["type"] == "websocket" and params is not None:
        # Served by the dialect paths (chatgate.api.ws), which set only the parameters.
        names = {value: name for name, value in params.items()}
        segments = scope["path"].split("/")
        return "/".join(f"{{{names[s]}}}" if s in names else s for s in segments)
    return _matching(getattr(getattr(scope["app"], "router", None), "routes", []), scope) or UNMATCHED


def _matching(routes: list[Any], scope: Scope) -> str | None:
    """The template of the first of ``routes`` that matches, looking into included
    routers (FastAPI keeps them whole as routes of their own)."""
    for candidate in routes:
        match, child = candidate.matches(scope)
        if match == Match.NONE:
            continue
        included = getattr(candidate, "original_router", None)
        if included is not None:
            found = _matching(included.routes, scope)
            if found is not None:
                return found
            continue
        path = getattr(child.get("route", candidate), "path", None)
        if path is not None:
            return str(path)
    return None
