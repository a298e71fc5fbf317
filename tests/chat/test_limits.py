"""Rate and concurrency limits, unit level with an injected clock, and over real sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from chatgate.chat.agents import AgentRegistry
from chatgate.chat.events import ChatError
from chatgate.chat.limits import LocalLimits, RateLimiter, StreamCounter
from chatgate.chat.service import ChatService, Turn
from chatgate.providers.base import Chunk, ProviderRequest
from chatgate.store.base import StoreLimits
from chatgate.store.memory import MemoryStore
from chatgate.testing.providers import StubProvider
from chatgate.testing.servers import FakeLLM


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(3, 60.0, clock)
    for _ in range(3):
        limiter.acquire("a")
    with pytest.raises(ChatError) as refused:
        limiter.acquire("a")
    assert refused.value.code == "rate_limited" and refused.value.retryable
    assert refused.value.retry_after == pytest.approx(20.0)
    limiter.acquire("b")  # other clients are not affected
    clock.now += 20.0
    limiter.acquire("a")
    with pytest.raises(ChatError):
        limiter.acquire("a")


def test_stream_counter_caps_and_releases() -> None:
    counter = StreamCounter(2)
    counter.acquire("a")
    counter.acquire("a")
    with pytest.raises(ChatError):
        counter.acquire("a")
    counter.release("a")
    counter.acquire("a")
    StreamCounter(0).acquire("anyone")


async def test_local_limits_are_both_limits_of_one_process() -> None:
    limits = LocalLimits(RateLimiter(1, 60.0), max_streams=1)
    await limits.admit("a")
    with pytest.raises(ChatError) as refused:
        await limits.admit("a")
    assert refused.value.code == "rate_limited" and refused.value.retry_after == pytest.approx(60.0, abs=1)
    await limits.open_stream("a")
    with pytest.raises(ChatError) as refused:
        await limits.open_stream("a")
    assert refused.value.message == "at most 1 replies may stream at once per client"
    limits.close_stream("a")
    await limits.open_stream("a")
    unlimited = LocalLimits()
    for _ in range(100):
        await unlimited.admit("a")
        await unlimited.open_stream("a")


class OneToken(StubProvider):
    name: ClassVar[str] = "one-token"
    default_model = "one-token-model"

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Chunk]:
        yield Chunk("hi")
        yield Chunk(finish_reason="stop")


class GatedLimits:
    """Limits whose ``open_stream`` waits for the test, as one that asks Redis waits."""

    def __init__(self) -> None:
        self.gates: list[asyncio.Event] = []
        self.open = 0

    async def admit(self, client: str) -> None:
        pass

    async def open_stream(self, client: str) -> None:
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        self.open += 1

    def close_stream(self, client: str) -> None:
        self.open -= 1


async def test_a_turn_that_waited_on_its_limit_finds_the_conversation_taken() -> None:
    """While one turn waits for its reply slot, another turn of the same conversation may
    start: the first is then refused as ``busy`` and gives its slot back."""
    limits = GatedLimits()
    service = ChatService(OneToken(), MemoryStore(StoreLimits(), time.time), AgentRegistry(), limits=limits)
    try:
        first = asyncio.create_task(service.start(Turn("one", conversation_id="c")))
        second = asyncio.create_task(service.start(Turn("two", conversation_id="c")))
        async with asyncio.timeout(5):
            while len(limits.gates) < 2:
                await asyncio.sleep(0)
            limits.gates[1].set()
            generation = await second
            limits.gates[0].set()
            with pytest.raises(ChatError) as refused:
                await first
            assert refused.value.code == "busy"
            assert limits.open == 1
            assert generation.task is not None
            await generation.task
        assert limits.open == 0
    finally:
        await service.aclose()


def test_rate_limit_over_http_answers_429_with_retry_after(start_gateway: Any) -> None:
    with start_gateway(rate_limit="2/minute") as gw:
        statuses = [httpx.post(gw.url + "/chat", json={"message": "hi"}) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert statuses[2].json()["code"] == "rate_limited"
    assert 29 <= float(statuses[2].headers["retry-after"]) <= 31


async def test_streams_per_client_over_websocket(start_gateway: Any, fake: FakeLLM) -> None:
    fake.configure(tokens=400, tps=100)
    with start_gateway(max_streams_per_client=1) as gw:
        async with connect(gw.ws_url + "/ws") as ws:
            await ws.send(orjson.dumps({"type": "chat", "id": "one", "message": "a"}).decode())
            await ws.send(orjson.dumps({"type": "chat", "id": "two", "message": "b"}).decode())
            while True:
                frame = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                if frame["type"] == "error":
                    break
            assert frame["id"] == "two" and frame["code"] == "rate_limited" and frame["retryable"]


async def test_connection_cap_refuses_the_extra_socket(start_gateway: Any) -> None:
    with start_gateway(max_connections=1) as gw:
        async with connect(gw.ws_url + "/ws") as first:
            async with connect(gw.ws_url + "/ws") as second:
                refused = orjson.loads(await asyncio.wait_for(second.recv(), 5))
                assert refused["code"] == "busy" and refused["retryable"]
            await first.send('{"type": "ping"}')
            assert orjson.loads(await asyncio.wait_for(first.recv(), 5)) == {"type": "pong"}
