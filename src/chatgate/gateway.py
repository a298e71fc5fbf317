"""The per-process wiring: one :class:`Gateway` holds everything a request handler needs
(settings, provider and its HTTP session, store, agents, chat service, metrics),
opened once when the app starts and closed when it stops.

The wire layer (:mod:`chatgate.api`) depends on this module; :mod:`chatgate.app` only
assembles the routes around it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import redis.asyncio as aioredis

from chatgate import cluster
from chatgate.chat.agents import AgentRegistry
from chatgate.chat.breaker import CircuitBreaker
from chatgate.chat.events import ChatError
from chatgate.chat.generation import Generation
from chatgate.chat.limits import LocalLimits, RateLimiter
from chatgate.chat.service import ChatService
from chatgate.cluster.bus import RedisGenerations
from chatgate.cluster.instances import Instance
from chatgate.cluster.limits import RedisLimits
from chatgate.config import Settings
from chatgate.providers import build_provider
from chatgate.providers._http import close_session
from chatgate.providers.base import Provider
from chatgate.store import ConversationStore, StoreLimits, open_store
from chatgate.telemetry.datadog import LLMObsObserver, start_datadog, stop_datadog
from chatgate.telemetry.metrics import Metrics
from chatgate.telemetry.otel import export_for
from chatgate.telemetry.store_metrics import TimedStore
from chatgate.telemetry.turns import TurnLog

if TYPE_CHECKING:
    from chatgate.telemetry.otel_metrics import OtelMetrics
    from chatgate.telemetry.tracing import Tracing

log = logging.getLogger("chatgate")
PURGE_INTERVAL_S = 60.0
#: A drain looks this often whether it has been told to end at once: a signal handler
#: can only set a flag.
DRAIN_POLL_S = 0.1


@dataclass
class Gateway:
    """Everything a request handler needs, built once per process."""

    settings: Settings
    provider: Provider
    session: aiohttp.ClientSession
    store: ConversationStore
    agents: AgentRegistry
    service: ChatService
    metrics: Metrics
    #: With a Redis store: the client for what instances share, and this instance.
    redis: aioredis.Redis | None = None
    instance: Instance | None = None
    shared: RedisGenerations | None = None
    websockets_open: int = 0
    #: With a Redis store: client limits and the connection cap counted across instances.
    shared_limits: RedisLimits | None = None
    #: The server is shutting down: new turns are refused, ``/health`` says so.
    draining: bool = False
    #: OpenTelemetry traces, when the ``OTEL_*`` variables ask for them.
    tracing: Tracing | None = None
    #: Datadog LLM Observability, when ``DD_LLMOBS_ENABLED`` asks for it.
    datadog: LLMObsObserver | None = None

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise shutting_down()


def shutting_down() -> ChatError:
    """The refusal of a turn during the drain, which it might outlast: ``busy`` and
    retryable, so the client sends it again, to another instance behind a load balancer."""
    return ChatError(
        "busy", "the gateway is shutting down; send this again on a new connection",
        retryable=True, retry_after=1,
    )


async def open_gateway(settings: Settings, agents: AgentRegistry) -> Gateway:
    llmobs = start_datadog()  # first: a refusal leaves nothing open; ddtrace only when enabled
    store = open_store(
        settings.store_url,
        StoreLimits(ttl_s=settings.session_ttl_s, max_conversations=settings.max_conversations),
    )
    await store.open()
    redis, instance, shared = None, None, None
    if cluster.is_redis(settings.store_url):
        redis = cluster.connect(settings.store_url)
        instance = Instance(redis)
        await instance.start()
        shared = RedisGenerations(redis, instance, keep_finished_s=settings.resume_grace_s)
    redis_limits = None
    if redis is not None and instance is not None:
        redis_limits = RedisLimits(
            redis,
            instance,
            settings.store_url,
            rate=settings.rate,
            max_streams=settings.max_streams_per_client,
            max_connections=settings.max_connections,
        )
        await redis_limits.start()
    provider, session = await build_provider(settings)
    metrics = Metrics(provider.name, otel=_metrics_export())
    store = TimedStore(store, metrics)
    tracing = _start_tracing(settings, provider.name)
    datadog = LLMObsObserver(provider.name, llmobs) if llmobs is not None else None
    service = ChatService(
        provider,
        store,
        agents,
        memory_enabled=settings.enable_memory,
        max_turns=settings.memory_max_turns,
        fallback_models=settings.fallback_model_list,
        keep_finished_s=settings.resume_grace_s,
        checkpoint_s=settings.checkpoint_s,
        limits=redis_limits or LocalLimits(
            RateLimiter(*settings.rate) if settings.rate else None, settings.max_streams_per_client
        ),
        observers=[metrics, TurnLog(), *([tracing.observer] if tracing else []),
                   *([datadog] if datadog else [])],
        shared=shared,
        max_answer_tokens=settings.max_answer_tokens,
        max_answer_s=settings.max_answer_s,
        breaker=CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s),
    )
    metrics.watch_breaker(lambda: service.breaker.state)
    if shared is not None:
        await shared.start(service)
    return Gateway(
        settings, provider, session, store, agents, service, metrics, redis, instance, shared,
        shared_limits=redis_limits, tracing=tracing, datadog=datadog,
    )


def _metrics_export() -> OtelMetrics | None:
    export = export_for("metrics")
    if export is None:
        return None
    from chatgate.telemetry.otel_metrics import OtelMetrics  # the SDK only when metrics go out

    return OtelMetrics(export)


def _start_tracing(settings: Settings, provider_name: str) -> Tracing | None:
    export = export_for("traces")
    if export is None:
        return None
    from chatgate.telemetry.tracing import start_tracing  # OpenTelemetry only when traces go out

    return start_tracing(export, provider_name, trace_content=settings.trace_content)


async def close_gateway(gateway: Gateway) -> None:
    await gateway.service.aclose()
    if gateway.shared is not None:
        await gateway.shared.close()
    await gateway.provider.aclose()
    await close_session(gateway.session)
    await gateway.store.close()
    await gateway.metrics.aclose()
    if gateway.shared_limits is not None:
        await gateway.shared_limits.aclose()
    if gateway.instance is not None:
        await gateway.instance.stop()
    if gateway.redis is not None:
        await gateway.redis.aclose()
    if gateway.tracing is not None:
        await asyncio.to_thread(gateway.tracing.shutdown)  # flushes the spans still queued
    if gateway.datadog is not None:
        await asyncio.to_thread(stop_datadog, gateway.datadog)


async def drain_gateway(
    gateway: Gateway, limit_s: float, *, cut_short: Callable[[], bool] = lambda: False
) -> None:
    """Refuse new turns, let the running answers end by themselves for up to ``limit_s``
    seconds (stored as usual), then cut the rest as closing the gateway does: cancelled,
    the partial answer stored. Answers that start meanwhile (a request already under way)
    are waited for too.

    The server calls this before it closes its connections, so that every answer that
    ends here reaches its still-open socket or response first. ``cut_short`` ends the
    wait early (a second signal)."""
    gateway.draining = True
    loop = asyncio.get_running_loop()
    began = loop.time()
    running = _running(gateway.service)
    seen = set(running)
    answers = "answer" if len(running) == 1 else "answers"
    log.info(
        f"draining: waiting up to {limit_s:g} s for {len(running)} running {answers}",
        extra={"running": len(running), "drain_s": limit_s},
    )
    waiters: dict[Generation, asyncio.Task[None]] = {}
    try:
        while running and not cut_short():
            left = began + limit_s - loop.time()
            if left <= 0:
                break
            for generation in running:
                if generation not in waiters:
                    waiters[generation] = asyncio.create_task(generation.wait_finished())
            await asyncio.wait([waiters[g] for g in running], timeout=min(left, DRAIN_POLL_S))
            running = _running(gateway.service)
            seen.update(running)
    finally:
        for waiter in waiters.values():
            waiter.cancel()
    finished, cut = len(seen) - len(running), len(running)
    waited = round(loop.time() - began, 3)
    log.info(
        f"drained in {waited:g} s: {finished} finished, {cut} cut off",
        extra={"finished": finished, "cut": cut, "waited_s": waited},
    )
    await gateway.service.aclose()


def _running(service: ChatService) -> list[Generation]:
    return [generation for generation in service.generations() if not generation.finished]


async def purge_forever(store: ConversationStore) -> None:
    while True:
        await asyncio.sleep(PURGE_INTERVAL_S)
        try:
            await store.purge_expired()
        except Exception:
            log.exception("purging expired conversations failed")
