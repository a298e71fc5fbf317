"""Helpers the HTTP adapters' tests import: drain a stream, and learn when the fake saw
its client leave."""

from __future__ import annotations

import asyncio

from chatgate.providers.base import Chunk, Provider, ProviderRequest
from chatgate.testing.servers import FakeLLM, wait_until

POLL_BOUND_S = 5.0


async def collect(provider: Provider, req: ProviderRequest, into: list[Chunk] | None = None) -> list[Chunk]:
    chunks = [] if into is None else into
    async for chunk in provider.stream(req):
        chunks.append(chunk)
    return chunks


async def disconnected_at(fake: FakeLLM) -> float:
    """When the fake saw its last request's client go away. Polled from a thread, so
    this loop stays free to actually close the socket meanwhile."""
    at: float = await asyncio.to_thread(
        wait_until, lambda: fake.requests()[-1]["disconnected_at"], timeout=POLL_BOUND_S, what="upstream closed"
    )
    return at
