"""ChatService with an upstream whose tokens all arrive at once: they reach subscribers as
one delta, yet usage and the stored answer count and keep every token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import ClassVar

from chatgate.chat.agents import AgentRegistry
from chatgate.chat.service import ChatService, RetryPolicy, Turn
from chatgate.providers.base import Chunk, ProviderRequest, ProviderStreamError
from chatgate.store.base import StoreLimits
from chatgate.store.memory import MemoryStore
from chatgate.testing.fake_llm import fake_reply, fake_tokens
from chatgate.testing.providers import StubProvider

BOUND_S = 5.0


class BurstProvider(StubProvider):
    """Yields every token without waiting, reports no usage, and may break off after them."""

    name: ClassVar[str] = "burst"
    default_model = "burst-model"

    def __init__(self, tokens: int, *, then_fail: bool = False) -> None:
        self.tokens = tokens
        self.then_fail = then_fail

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Chunk]:
        for text in fake_tokens(self.tokens):
            yield Chunk(text)
        if self.then_fail:
            # Not retryable in itself: only the tokens already sent make the turn retryable.
            raise ProviderStreamError("the upstream broke off", provider=self.name, retryable=False)
        yield Chunk(finish_reason="stop")


async def answer(provider: BurstProvider) -> tuple[list[dict[str, object]], list[tuple[str, str, bool]]]:
    """Run one turn; its events as a subscriber saw them, and the stored messages."""
    store = MemoryStore(StoreLimits(), time.time)
    service = ChatService(provider, store, AgentRegistry(), retry=RetryPolicy(attempts=1))
    try:
        generation = await service.start(Turn("tell me", conversation_id="conv-burst"))
        async with asyncio.timeout(BOUND_S):
            events = [dict(e) async for e in generation.events()]
            assert generation.task is not None
            await generation.task
        conversation = await store.get("conv-burst")
        assert conversation is not None
        return events, [(m.role, m.content, m.partial) for m in conversation.messages]
    finally:
        await service.aclose()


async def test_a_burst_of_tokens_is_one_delta_and_usage_counts_every_token() -> None:
    events, stored = await answer(BurstProvider(40))
    assert [e["type"] for e in events] == ["start", "delta", "done"]
    assert (events[1]["seq"], events[1]["text"]) == (1, fake_reply(40))
    done = events[-1]
    assert done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 0, "completion_tokens": 40}
    assert stored == [("user", "tell me", False), ("assistant", fake_reply(40), False)]


async def test_a_failure_after_a_burst_is_retryable_and_keeps_every_token() -> None:
    events, stored = await answer(BurstProvider(7, then_fail=True))
    assert [e["type"] for e in events] == ["start", "delta", "error"]
    assert events[1]["text"] == fake_reply(7)
    error = events[-1]
    assert error["code"] == "provider_error" and error["retryable"] is True
    assert stored == [("user", "tell me", False), ("assistant", fake_reply(7), True)]


class RecordingProvider(BurstProvider):
    """A BurstProvider that remembers what each request sent."""

    def __init__(self) -> None:
        super().__init__(2)
        self.requests: list[ProviderRequest] = []

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        async for chunk in super().stream(request):
            yield chunk


async def test_a_conversation_idle_past_its_reset_starts_afresh() -> None:
    """The sequential seed's inactivity cleanup: time comes from the injected clocks."""
    now = [1_000_000.0]
    provider = RecordingProvider()
    store = MemoryStore(StoreLimits(ttl_s=1e9), lambda: now[0])
    service = ChatService(provider, store, AgentRegistry(), wall_clock=lambda: now[0])

    async def say(text: str) -> list[str]:
        generation = await service.start(Turn(text, conversation_id="s-idle", idle_reset_s=300))
        await generation.wait_finished()
        return [m["content"] for m in provider.requests[-1].messages if m["role"] != "system"]

    try:
        assert await say("remember this") == ["remember this"]
        now[0] += 299
        assert await say("still here?") == ["remember this", fake_reply(2), "still here?"]
        now[0] += 301
        assert await say("do you remember?") == ["do you remember?"]
        conversation = await store.get("s-idle")
        assert conversation is not None
        assert [m.content for m in conversation.messages] == ["do you remember?", fake_reply(2)]
    finally:
        await service.aclose()
