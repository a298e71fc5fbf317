"""Helpers the HTTP adapters' tests import: drain a stream, check a whole answer, and
learn when the fake saw its client leave."""

from __future__ import annotations

import asyncio

from chatgate.providers.base import Chunk, Provider, ProviderRequest
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, wait_until

POLL_BOUND_S = 5.0


async def collect(provider: Provider, req: ProviderRequest, into: list[Chunk] | None = None) -> list[Chunk]:
    chunks = [] if into is None else into
    async for chunk in provider.stream(req):
        chunks.append(chunk)
    return chunks


def assert_ten_tokens_then_stop(chunks: list[Chunk]) -> None:
    """A 10-token answer to MESSAGES: ten text chunks, then ``stop`` with the fake's usage."""
    *tokens, last = chunks
    assert "".join(c.text for c in chunks) == fake_reply(10)
    assert len(tokens) == 10 and all(c.text and c.finish_reason is None for c in tokens)
    assert last.finish_reason == "stop"
    assert last.usage is not None
    assert last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == 6  # words in MESSAGES, as the fake counts them


async def disconnected_at(fake: FakeLLM) -> float:
    """When the fake saw its last request's client go away. Polled from a thread, so
    this loop stays free to actually close the socket meanwhile."""
    at: float = await asyncio.to_thread(
        wait_until, lambda: fake.requests()[-1]["disconnected_at"], timeout=POLL_BOUND_S, what="upstream closed"
    )
    return at
