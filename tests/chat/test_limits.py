"""Rate and concurrency limits, unit level with an injected clock, and over real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from chatgate.chat.events import ChatError
from chatgate.chat.limits import RateLimiter, StreamCounter
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
