"""create_app(settings): the FastAPI application, assembled around a :class:`Gateway`
that its lifespan opens and closes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from chatgate import __version__
from chatgate.api import (
    embeddings,
    http,
    ollama_compat,
    openai_compat,
    openai_completions,
    openai_responses,
    ws,
)
from chatgate.api.auth import Access, Authentication
from chatgate.api.browsers import AllowedHosts, JsonBodiesOnly, boundary_of
from chatgate.api.errors import error_response, handle_chat_error, handle_http_exception, shape_of
from chatgate.api.limits import BodySizeLimit, SizeLimits
from chatgate.chat.agents import load_agents
from chatgate.chat.events import ChatError
from chatgate.config import Settings
from chatgate.gateway import close_gateway, open_gateway, purge_forever, shutting_down
from chatgate.guard import guarded_server
from chatgate.telemetry.http_metrics import RequestMetrics
from chatgate.telemetry.otel import export_for

log = logging.getLogger("chatgate")
#: A served gateway makes and drops many short-lived objects per token; collecting the
#: youngest generation every 700 allocations (Python's default) cost about a third of its
#: throughput in the benchmark. Reference counting frees nearly all of them anyway; the
#: collector is only there for cycles. Much higher thresholds make each collection a pause
#: that every open stream feels: 10,000 kept the p99 token gap of 2,000 streams at 67 ms
#: where 50,000 gave 88 ms, at the same throughput (bench/RESULTS.md).
GC_THRESHOLDS = (10_000, 20, 100)
#: How uvicorn serves the app, for ``chatgate serve`` and the test servers alike: httptools,
#: websockets' sans-I/O protocol, and no permessage-deflate, which would compress every
#: few-byte token frame for nothing (and keep a compressor per socket).
SERVER_OPTIONS: dict[str, Any] = {
    "http": "httptools",
    "ws": "websockets-sansio",
    "ws_per_message_deflate": False,
    "access_log": False,
    "log_config": None,
}


def server_options(settings: Settings) -> dict[str, Any]:
    """:data:`SERVER_OPTIONS` with ``settings``' connection limits: the same two protocols,
    guarded (:mod:`chatgate.guard`), the keep-alive timeout and the WebSocket frame size."""
    return {**SERVER_OPTIONS, **guarded_server(settings)}


def tune_gc() -> None:
    """For a process that only serves the gateway: collect rarely, and move everything that
    exists after start-up (modules, settings, the app) out of the collector's sight for good."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.collect()
    gc.freeze()


def create_app(settings: Settings, *, own_process: bool = False) -> FastAPI:
    """``own_process``: the app is all this process runs (``chatgate serve``), so it may tune
    process-wide things such as the garbage collector."""
    agents = load_agents(settings.agents_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = await open_gateway(settings, agents)
        app.state.gateway = gateway
        if own_process:
            tune_gc()
        purger = asyncio.create_task(purge_forever(gateway.store))
        # "chatgate ready" comes from the server once its socket listens (chatgate.serve).
        log.debug(
            "gateway started",
            extra={"provider": gateway.provider.name, "model": gateway.provider.default_model,
                   "store": gateway.store.name},
        )
        try:
            yield
        finally:
            purger.cancel()
            await close_gateway(gateway)

    app = FastAPI(
        title="chatgate",
        version=__version__,
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry layer asks on every request whether a provider is
        # configured (~2 % of a busy gateway's time); chatgate reports through its own metrics.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.add_middleware(BodySizeLimit, limits=SizeLimits.of(settings))
    app.add_middleware(ws.WebSocketRoutes)
    app.state.access = Access.of(settings)  # also read by POST /auth/ticket
    app.add_middleware(Authentication, access=app.state.access)
    app.add_middleware(RefuseWhileDraining)
    # Outermost, in this order: the Host check, CORS (preflights answered before auth;
    # refusals carry CORS headers), then the JSON-body check (chatgate.api.browsers).
    boundary = boundary_of(settings)
    app.add_middleware(JsonBodiesOnly)
    app.add_middleware(CORSMiddleware, **boundary.cors_options())
    app.add_middleware(AllowedHosts, boundary=boundary)
    app.add_middleware(RequestMetrics)  # around the refusals too, counted by route
    if export_for("traces") is not None:
        from chatgate.telemetry.tracing import ServerSpans  # OpenTelemetry only when traces go out

        app.add_middleware(ServerSpans)  # outermost: a refused request is traced too
    app.add_exception_handler(ChatError, handle_chat_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.include_router(http.router)
    app.include_router(embeddings.router)  # before the compat APIs' unknown-path routes
    app.include_router(openai_responses.router)
    app.include_router(openai_completions.router)
    app.include_router(openai_compat.router)
    app.include_router(ollama_compat.router)
    return app


class RefuseWhileDraining:
    """During the drain (:mod:`chatgate.serve`) the listener is closed, but connections
    opened before it may still send requests. A WebSocket handshake is accepted and closed
    at once with 1012 (service restart: connect again, to another instance); an HTTP POST
    (every route that starts a turn is one) is refused as ``busy`` and its connection
    closed, so a proxy stops reusing it. Reads (health, conversations) are served."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = getattr(scope["app"].state, "gateway", None) if scope["type"] != "lifespan" else None
        if gateway is None or not gateway.draining:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1012, "reason": "service restart"})
        elif scope["method"] == "POST":
            response = error_response(shutting_down(), shape_of(scope["path"]), headers={"Connection": "close"})
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def app_from_environment() -> FastAPI:
    """uvicorn's factory: settings come from the environment (the CLI put its flags there)."""
    from chatgate.config import load_settings
    from chatgate.telemetry.logs import setup_logging

    settings = load_settings()
    setup_logging(settings.log_level)
    return create_app(settings, own_process=True)
