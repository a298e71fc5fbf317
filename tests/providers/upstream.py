"""Helpers the HTTP adapters' tests import: drain a stream, check a whole answer, and
learn when the fake saw its client leave."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from chatgate.providers.base import Chunk, Provider, ProviderRequest, PushedChunks
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, wait_until

POLL_BOUND_S = 5.0


async def collect(provider: Provider, req: ProviderRequest, into: list[Chunk] | None = None) -> list[Chunk]:
    """The answer's chunks, taken as the chat service takes them: the first by iterating,
    the rest pumped from the connection's callback when the stream offers that."""
    return await read_all(provider.stream(req), pumped=True, into=into)


async def read_all(stream: AsyncIterator[Chunk], *, pumped: bool, into: list[Chunk] | None = None) -> list[Chunk]:
    """Every chunk of ``stream``: iterated, or (``pumped``) the first iterated and the rest
    pumped; the stream is closed at the end, as the service closes it."""
    chunks = [] if into is None else into

    def sink(chunk: Chunk) -> bool:
        chunks.append(chunk)
        return False

    try:
        async for chunk in stream:
            chunks.append(chunk)
            if pumped and isinstance(stream, PushedChunks):
                await stream.pump(sink)
                break
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()
    return chunks


class RawLines:
    """A line decoder for :class:`chatgate.providers._http.LineStream` tests: each line is
    a chunk of its own text; one holding ``"done":true`` ends the answer, as does the body's end."""

    def decode(self, line: bytes) -> Sequence[Chunk]:
        if b'"done":true' in line:
            return (Chunk(line.decode(), finish_reason="stop"),)
        return (Chunk(line.decode()),)

    def end(self) -> Chunk:
        return Chunk("", finish_reason="stop")


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
