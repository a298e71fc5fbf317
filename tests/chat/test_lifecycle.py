"""Generation lifecycle hooks: every started generation tells its observers of its first
token, its tokens (only to observers that want them) and exactly one end — finished,
failed or cancelled — after its turn is stored and before its terminal event is logged;
an observer that raises changes nothing for the generation."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import ClassVar

import pytest

from chatgate.chat.agents import AgentRegistry
from chatgate.chat.events import DoneEvent, ErrorEvent
from chatgate.chat.generation import Generation
from chatgate.chat.lifecycle import GenerationObserver
from chatgate.chat.service import ChatService, RetryPolicy, Turn
from chatgate.providers.base import Chunk, ProviderError, ProviderRequest, ProviderStreamError
from chatgate.store.base import StoreLimits
from chatgate.store.memory import MemoryStore
from chatgate.telemetry.metrics import Metrics
from chatgate.testing.providers import StubProvider

BOUND_S = 5.0
TOKENS = ["Once", " upon", " a", " time"]


class ScriptedProvider(StubProvider):
    """Streams ``TOKENS`` with a task switch between them, then ends, fails or hangs."""

    name: ClassVar[str] = "scripted"
    default_model = "scripted-model"

    def __init__(self, *, tokens: int = len(TOKENS), then: str = "stop") -> None:
        self.tokens = tokens
        #: ``stop``, ``fail`` (the upstream breaks off) or ``hang`` (until cancelled).
        self.then = then

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Chunk]:
        for text in TOKENS[: self.tokens]:
            await asyncio.sleep(0)
            yield Chunk(text)
        if self.then == "fail":
            raise ProviderStreamError("the upstream broke off", provider=self.name, retryable=False)
        if self.then == "hang":
            await asyncio.Event().wait()
        yield Chunk(finish_reason="stop")


class Recorder(GenerationObserver):
    """Writes down every hook it hears, and what the generation looked like then."""

    def __init__(self, *, wants_tokens: bool = True) -> None:
        self.wants_tokens = wants_tokens
        self.heard: list[str] = []
        self.texts: list[str] = []
        self.ends: list[DoneEvent | ErrorEvent] = []
        self.exc: BaseException | None = None
        #: At its end hook: had the generation logged its terminal event yet?
        self.finished_at_end: bool | None = None

    def started(self, generation: Generation) -> None:
        self.heard.append("started")

    def first_token(self, generation: Generation, ttft_s: float) -> None:
        assert ttft_s >= 0
        self.heard.append("first_token")

    def token(self, generation: Generation, text: str) -> None:
        self.heard.append("token")
        self.texts.append(text)

    def finished(self, generation: Generation, done: DoneEvent) -> None:
        self._end("finished", generation, done)

    def failed(self, generation: Generation, error: ErrorEvent, exc: BaseException | None) -> None:
        self.exc = exc
        self._end("failed", generation, error)

    def cancelled(self, generation: Generation, done: DoneEvent) -> None:
        self._end("cancelled", generation, done)

    def _end(self, hook: str, generation: Generation, event: DoneEvent | ErrorEvent) -> None:
        self.heard.append(hook)
        self.ends.append(event)
        self.finished_at_end = generation.finished


class Broken(GenerationObserver):
    """Raises from every hook."""

    wants_tokens = True

    def started(self, generation: Generation) -> None:
        raise RuntimeError("started")

    def first_token(self, generation: Generation, ttft_s: float) -> None:
        raise RuntimeError("first_token")

    def token(self, generation: Generation, text: str) -> None:
        raise RuntimeError("token")

    def finished(self, generation: Generation, done: DoneEvent) -> None:
        raise RuntimeError("finished")


def service_with(provider: ScriptedProvider, *observers: GenerationObserver) -> ChatService:
    store = MemoryStore(StoreLimits(), time.time)
    return ChatService(provider, store, AgentRegistry(), retry=RetryPolicy(attempts=1), observers=observers)


async def run_turn(service: ChatService, conversation_id: str = "conv-life") -> Generation:
    generation = await service.start(Turn("tell me a story", conversation_id=conversation_id))
    async with asyncio.timeout(BOUND_S):
        await generation.wait_finished()
    return generation


async def stored(service: ChatService, conversation_id: str = "conv-life") -> list[tuple[str, bool]]:
    conversation = await service.store.get(conversation_id)
    return [] if conversation is None else [(m.role, m.partial) for m in conversation.messages]


async def test_an_answer_is_started_first_token_tokens_then_finished() -> None:
    recorder = Recorder()
    service = service_with(ScriptedProvider(), recorder)
    try:
        generation = await run_turn(service)
        assert recorder.heard == ["started", "first_token", *["token"] * len(TOKENS), "finished"]
        assert recorder.texts == TOKENS
        [done] = recorder.ends
        assert done is generation.log[-1] and done["type"] == "done" and done["finish_reason"] == "stop"
        # Told after the turn was stored, before the end was logged.
        assert recorder.finished_at_end is False
        assert await stored(service) == [("user", False), ("assistant", False)]
    finally:
        await service.aclose()


@pytest.mark.parametrize("tokens", [0, 2], ids=["before-first-token", "after-first-token"])
async def test_an_upstream_failure_is_failed_once(tokens: int) -> None:
    recorder = Recorder()
    service = service_with(ScriptedProvider(tokens=tokens, then="fail"), recorder)
    try:
        generation = await run_turn(service)
        await asyncio.sleep(0)
        streamed = ["first_token", *["token"] * tokens] if tokens else []
        assert recorder.heard == ["started", *streamed, "failed"]
        [error] = recorder.ends
        assert error is generation.log[-1] and error["type"] == "error"
        assert error["code"] == "provider_error"
        assert isinstance(recorder.exc, ProviderError)
        assert recorder.finished_at_end is False
    finally:
        await service.aclose()
    assert recorder.heard.count("failed") == 1


async def test_a_cancel_is_cancelled_once() -> None:
    recorder = Recorder()
    service = service_with(ScriptedProvider(tokens=1, then="hang"), recorder)
    try:
        generation = await service.start(Turn("tell me a story", conversation_id="conv-life"))
        async with asyncio.timeout(BOUND_S):
            while "first_token" not in recorder.heard:
                await asyncio.sleep(0)
            generation.cancel()
            await generation.wait_finished()
        [done] = recorder.ends
        assert done["type"] == "done" and done["finish_reason"] == "cancelled"
        assert recorder.heard == ["started", "first_token", "token", "cancelled"]
        assert await stored(service) == [("user", False), ("assistant", True)]
    finally:
        await service.aclose()
    assert recorder.heard.count("cancelled") == 1


async def test_a_cancel_before_the_generation_ran_still_ends_it_once() -> None:
    recorder = Recorder()
    service = service_with(ScriptedProvider(), recorder)
    try:
        generation = await service.start(Turn("tell me a story", conversation_id="conv-life"))
        generation.cancel()  # its task has not taken a step yet
        async with asyncio.timeout(BOUND_S):
            await generation.wait_finished()
        assert recorder.heard == ["started", "cancelled"]
        assert generation.log[-1]["type"] == "done"
        # The conversation is free for the next turn.
        await run_turn(service)
        assert recorder.heard[-1] == "finished"
    finally:
        await service.aclose()


async def test_a_shutdown_is_failed_once() -> None:
    recorder = Recorder()
    service = service_with(ScriptedProvider(tokens=1, then="hang"), recorder)
    try:
        generation = await service.start(Turn("tell me a story", conversation_id="conv-life"))
        async with asyncio.timeout(BOUND_S):
            while "first_token" not in recorder.heard:
                await asyncio.sleep(0)
            assert generation.task is not None
            generation.task.cancel()  # what stopping the event loop does, unlike a client's cancel
            with pytest.raises(asyncio.CancelledError):
                await generation.task
        [error] = recorder.ends
        assert error["type"] == "error" and error["code"] == "internal" and error["retryable"] is True
        assert isinstance(recorder.exc, asyncio.CancelledError)
        assert recorder.heard == ["started", "first_token", "token", "failed"]
    finally:
        await service.aclose()


async def test_an_observer_that_raises_does_not_break_the_turn(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    service = service_with(ScriptedProvider(), Broken(), recorder)
    try:
        with caplog.at_level(logging.ERROR, logger="chatgate.chat"):
            generation = await run_turn(service)
        assert generation.log[-1]["type"] == "done"
        assert generation.text == "".join(TOKENS)
        assert recorder.heard == ["started", "first_token", *["token"] * len(TOKENS), "finished"]
        assert await stored(service) == [("user", False), ("assistant", False)]
        failures = [r for r in caplog.records if r.getMessage() == "a generation observer failed"]
        assert [r.__dict__["hook"] for r in failures] == [
            "started", "first_token", *["token"] * len(TOKENS), "finished"
        ]
    finally:
        await service.aclose()


async def test_without_an_observer_wanting_tokens_the_token_hook_is_never_called() -> None:
    recorder = Recorder(wants_tokens=False)
    service = service_with(ScriptedProvider(), recorder)
    try:
        await run_turn(service)
        assert recorder.heard == ["started", "first_token", "finished"]
        assert recorder.texts == []
    finally:
        await service.aclose()


async def test_metrics_count_each_end_in_their_own_registry() -> None:
    metrics, other = Metrics("scripted"), Metrics("scripted")
    service = service_with(ScriptedProvider(), metrics)
    failing = service_with(ScriptedProvider(tokens=2, then="fail"), metrics)
    try:
        await run_turn(service)
        await run_turn(failing)
    finally:
        await service.aclose()
        await failing.aclose()

    def sample(registry_of: Metrics, name: str, **labels: str) -> float | None:
        return registry_of.registry.get_sample_value(name, {"provider": "scripted", **labels})

    assert sample(metrics, "chatgate_generations_total", outcome="stop") == 1
    assert sample(metrics, "chatgate_generations_total", outcome="error") == 1
    model = {"model": "scripted-model"}
    assert sample(metrics, "chatgate_tokens_total", **model, direction="output") == len(TOKENS) + 2
    assert sample(metrics, "chatgate_time_to_first_token_seconds_count", **model) == 2
    assert sample(metrics, "chatgate_upstream_errors_total", kind="stream_error") == 1
    assert metrics.registry.get_sample_value("chatgate_generations_running") == 0
    assert sample(other, "chatgate_generations_total", outcome="stop") is None
