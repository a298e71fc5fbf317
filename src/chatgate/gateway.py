"""The per-process wiring: one :class:`Gateway` holds everything a request handler needs
(settings, provider and its HTTP session, store, agents, chat service, metrics),
opened once when the app starts and closed when it stops.

The wire layer (:mod:`chatgate.api`) depends on this module; :mod:`chatgate.app` only
assembles the routes around it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
import redis.asyncio as aioredis

from chatgate import cluster
from chatgate.cluster.instances import Instance

from chatgate.chat.agents import AgentRegistry
from chatgate.chat.limits import RateLimiter
from chatgate.chat.service import ChatService
from chatgate.config import Settings
from chatgate.observability import Metrics
from chatgate.providers import build_provider
from chatgate.providers.base import Provider
from chatgate.store import ConversationStore, StoreLimits, open_store

log = logging.getLogger("chatgate")
PURGE_INTERVAL_S = 60.0


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
    websockets_open: int = 0


async def open_gateway(settings: Settings, agents: AgentRegistry) -> Gateway:
    store = open_store(
        settings.store_url,
        StoreLimits(ttl_s=settings.session_ttl_s, max_conversations=settings.max_conversations),
    )
    await store.open()
    redis, instance = None, None
    if cluster.is_redis(settings.store_url):
        redis = cluster.connect(settings.store_url)
        instance = Instance(redis)
        await instance.start()
    provider, session = await build_provider(settings)
    metrics = Metrics(provider.name)
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
        observers=[metrics],
    )
    return Gateway(settings, provider, session, store, agents, service, metrics, redis, instance)


async def close_gateway(gateway: Gateway) -> None:
    await gateway.service.aclose()
    await gateway.provider.aclose()
    await gateway.session.close()
    await gateway.store.close()
    if gateway.instance is not None:
        await gateway.instance.stop()
    if gateway.redis is not None:
        await gateway.redis.aclose()


async def purge_forever(store: ConversationStore) -> None:
    while True:
        await asyncio.sleep(PURGE_INTERVAL_S)
        try:
            await store.purge_expired()
        except Exception:
            log.exception("purging expired conversations failed")
