"""create_app(settings): the FastAPI application; its lifespan wires everything."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from chatgate import __version__
from chatgate.api import http, ollama_compat, openai_compat, ws
from chatgate.api.auth import Authenticator
from chatgate.api.limits import BodySizeLimit
from chatgate.chat.agents import AgentRegistry, load_agents
from chatgate.chat.limits import RateLimiter
from chatgate.chat.service import ChatService
from chatgate.config import Settings
from chatgate.providers import build_provider
from chatgate.providers.base import Provider
from chatgate.store import ConversationStore, StoreLimits, open_store

log = logging.getLogger("chatgate")
PURGE_INTERVAL_S = 60.0
#: OpenAI and Ollama clients resend the conversation each turn: allow this many messages' worth.
HISTORY_BODY_FACTOR = 64
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


@dataclass
class Gateway:
    """Everything a request handler needs, built once per process."""

    settings: Settings
    provider: Provider
    session: aiohttp.ClientSession
    store: ConversationStore
    agents: AgentRegistry
    service: ChatService
    auth: Authenticator
    websockets_open: int = 0


async def open_gateway(settings: Settings, agents: AgentRegistry) -> Gateway:
    store = open_store(
        settings.store_url,
        StoreLimits(ttl_s=settings.session_ttl_s, max_conversations=settings.max_conversations),
    )
    await store.open()
    provider, session = await build_provider(settings)
    service = ChatService(
        provider,
        store,
        agents,
        memory_enabled=settings.enable_memory,
        max_turns=settings.memory_max_turns,
        fallback_models=settings.fallback_model_list,
        keep_finished_s=settings.resume_grace_s,
        rate_limiter=RateLimiter(*settings.rate) if settings.rate else None,
        max_streams_per_client=settings.max_streams_per_client,
    )
    return Gateway(settings, provider, session, store, agents, service, Authenticator(settings.api_key_set()))


async def close_gateway(gateway: Gateway) -> None:
    await gateway.service.aclose()
    await gateway.provider.aclose()
    await gateway.session.close()
    await gateway.store.close()


async def _purge_forever(store: ConversationStore) -> None:
    while True:
        await asyncio.sleep(PURGE_INTERVAL_S)
        try:
            await store.purge_expired()
        except Exception:
            log.exception("purging expired conversations failed")


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
        purger = asyncio.create_task(_purge_forever(gateway.store))
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
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Conversation-Id"],
        )
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_message_bytes + 4096,
        history_max_bytes=HISTORY_BODY_FACTOR * settings.max_message_bytes,
    )
    app.add_middleware(ws.WebSocketRoutes)
    http.install_error_handlers(app)
    app.include_router(http.router)
    app.include_router(openai_compat.router)
    app.include_router(ollama_compat.router)
    return app


def app_from_environment() -> FastAPI:
    """uvicorn's factory: settings come from the environment (the CLI put its flags there)."""
    from chatgate.config import load_settings
    from chatgate.observability import setup_logging

    settings = load_settings()
    setup_logging(settings.log_level)
    return create_app(settings, own_process=True)
