"""A turn is in the store while it is answered: the user's message from the start, the
answer so far at each checkpoint, the answer at the end; and nothing when nothing was
answered. A turn whose process died is reported as interrupted, not as unknown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ClassVar

import pytest

from chatgate.chat.agents import AgentRegistry
from chatgate.chat.events import ChatError
from chatgate.chat.service import ChatService, RetryPolicy, Turn
from chatgate.providers.base import Chunk, ProviderRequest
from chatgate.store.base import StoredMessage, StoreLimits
from chatgate.store.memory import MemoryStore
from chatgate.testing.providers import StubProvider

BOUND_S = 5.0


class SteppedProvider(StubProvider):
    """Yields the tokens a test puts in its queue, and ends at ``None``."""

    name: ClassVar[str] = "stepped"
    default_model = "stepped-model"

    def __init__(self) -> None:
        self.tokens: asyncio.Queue[str | None] = asyncio.Queue()

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Chunk]:
        while (text := await self.tokens.get()) is not None:
            yield Chunk(text)
        yield Chunk(finish_reason="stop")


async def eventually(check: Callable[[], object], what: str) -> None:
    """Poll ``check`` (its result awaited when it is awaitable) until it is true, within
    the bound; the store's writes run beside the stream, on their own tasks."""
    async with asyncio.timeout(BOUND_S):
        while True:
            value = check()
            if isinstance(value, Awaitable):
                value = await value
            if value:
                return
            await asyncio.sleep(0.005)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(StoreLimits(), time.time)


def service_for(provider: SteppedProvider, store: MemoryStore, clock: Clock) -> ChatService:
    return ChatService(provider, store, AgentRegistry(), retry=RetryPolicy(attempts=1), checkpoint_s=1.0, clock=clock)


def shown(messages: list[StoredMessage]) -> list[tuple[str, str, bool]]:
    return [(m.role, m.content, m.partial) for m in messages]


async def test_the_turn_is_in_history_while_it_is_answered(store: MemoryStore, clock: Clock) -> None:
    provider = SteppedProvider()
    service = service_for(provider, store, clock)
    try:
        generation = await service.start(Turn("question", conversation_id="c"))

        async def window() -> list[tuple[str, str, bool]]:
            return shown(await store.window("c", 10))

        await eventually(window, "the user's message stored")
        assert await window() == [("user", "question", False)]
        provider.tokens.put_nowait("Hello")
        await eventually(lambda: generation.tokens == 1, "a token")
        assert await window() == [("user", "question", False)]  # no checkpoint due yet
        clock.now += 1.5
        provider.tokens.put_nowait(" world")
        checkpointed = [("user", "question", False), ("assistant", "Hello world", True)]
        await eventually(lambda: _equals(window(), checkpointed), "a checkpoint")
        provider.tokens.put_nowait(None)
        await generation.wait_finished()
        assert await window() == [("user", "question", False), ("assistant", "Hello world", False)]
    finally:
        await service.aclose()


async def _equals(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


async def test_a_turn_cancelled_before_its_first_token_is_taken_back(store: MemoryStore, clock: Clock) -> None:
    service = service_for(SteppedProvider(), store, clock)
    try:
        generation = await service.start(Turn("never mind", conversation_id="c"))
        await eventually(lambda: store.window("c", 10), "the user's message stored")
        generation.cancel()
        await generation.wait_finished()
        assert await store.get("c") is None
    finally:
        await service.aclose()


async def test_resuming_a_turn_whose_process_died_is_a_retryable_error(store: MemoryStore, clock: Clock) -> None:
    # What a killed process leaves: a turn begun, checkpointed and never ended.
    await store.begin_turn("c", "~/dead-generation", StoredMessage("user", "hello"))
    await store.checkpoint("c", "~/dead-generation", "Hel")
    service = service_for(SteppedProvider(), store, clock)
    try:
        with pytest.raises(ChatError) as raised:
            await service.find(None, "dead-generation")
        assert raised.value.code == "internal" and raised.value.retryable
        assert "send the message again" in raised.value.message
        with pytest.raises(ChatError) as unknown:
            await service.find(None, "never-started")
        assert unknown.value.code == "not_found"
    finally:
        await service.aclose()
