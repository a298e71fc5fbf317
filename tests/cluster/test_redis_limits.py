"""Client limits on one Redis count for the sum over instances: unit level with two limit
objects standing for two instances, then end to end with two real gateways."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from limits.aio.storage import RedisStorage
from websockets.asyncio.client import connect

from chatgate import cluster
from chatgate.chat.events import ChatError
from chatgate.cluster.instances import ALIVE_TTL_MS, Instance, alive_key
from chatgate.cluster.limits import KEY_TTL_MS, RedisLimits, limits_url
from chatgate.testing.servers import (
    FakeLLM,
    RedisServer,
    RunningGateway,
    free_port,
    run_gateway,
    serve_process,
    wait_until,
)

DB = 9


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    url = f"{redis_server.url}/{DB}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@asynccontextmanager
async def running(url: str, instance_id: str, **limits: Any) -> AsyncIterator[RedisLimits]:
    """One instance: its own client, heartbeat and limits."""
    client = cluster.connect(url)
    instance = Instance(client, instance_id)
    await instance.start()
    shared = RedisLimits(client, instance, url, **limits)
    await shared.start()
    try:
        yield shared
    finally:
        await shared.aclose()
        await instance.stop()
        await client.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.01)


def test_the_store_url_is_spelled_for_limits() -> None:
    cases = {
        "redis://127.0.0.1:6379/9": "async+redis://127.0.0.1:6379/9",
        "rediss://:secret@cache.example:6380/0": "async+rediss://:secret@cache.example:6380/0",
        "unix:///run/redis.sock?db=9": "async+redis+unix:///run/redis.sock?db=9",
    }
    for store_url, expected in cases.items():
        assert limits_url(store_url) == expected
        RedisStorage(expected, implementation="redispy")  # and limits takes it
    with pytest.raises(ValueError):
        limits_url("sqlite:///chatgate.db")


# Rate ------------------------------------------------------------------------------------


async def test_the_rate_counts_turns_on_every_instance(url: str) -> None:
    async with running(url, "a", rate=(5, 60.0)) as a, running(url, "b", rate=(5, 60.0)) as b:
        for limits in (a, a, a, b, b):
            await limits.admit("client")
        for limits in (a, b):
            with pytest.raises(ChatError) as refused:
                await limits.admit("client")
            assert refused.value.code == "rate_limited" and refused.value.retryable
            assert refused.value.retry_after is not None and 55 < refused.value.retry_after <= 60
        await b.admit("someone else")


# Concurrent replies ------------------------------------------------------------------------


async def test_streams_per_client_count_on_every_instance(url: str) -> None:
    async with running(url, "a", max_streams=2) as a, running(url, "b", max_streams=2) as b:
        await a.open_stream("client")
        await b.open_stream("client")
        for limits in (a, b):
            with pytest.raises(ChatError) as refused:
                await limits.open_stream("client")
            assert refused.value.code == "rate_limited" and refused.value.retryable
            assert refused.value.message == "at most 2 replies may stream at once per client"
        await b.open_stream("someone else")

        a.close_stream("client")
        counts, key = a.streams.redis, a.streams.key("client")

        async def given_back() -> bool:
            return not await counts.hexists(key, "a")

        await eventually(given_back)
        await b.open_stream("client")
        assert await counts.hgetall(key) == {b"b": b"2"}
        assert 0 < await counts.pttl(key) <= KEY_TTL_MS


async def test_a_dead_instances_streams_stop_counting(url: str) -> None:
    """The dead instance never said goodbye: its count stays in Redis until its heartbeat
    key expires (as it does some 6 s after a ``kill -9``); from then on it counts no more."""
    dead_client = cluster.connect(url)
    await dead_client.set(alive_key("dead"), b"1", px=ALIVE_TTL_MS)  # it was alive
    dead = RedisLimits(dead_client, Instance(dead_client, "dead"), url, max_streams=2)
    await dead.open_stream("client")
    await dead.open_stream("client")
    await dead_client.aclose()  # and is gone, without closing anything

    async with running(url, "b", max_streams=2) as b:
        with pytest.raises(ChatError):
            await b.open_stream("client")  # its heartbeat has not expired yet
        await b.streams.redis.delete(alive_key("dead"))  # now it has
        await b.open_stream("client")
        await b.open_stream("client")
        assert await b.streams.redis.hgetall(b.streams.key("client")) == {b"b": b"2"}


async def test_a_count_that_went_astray_is_rewritten(url: str) -> None:
    """A field lost while this instance's own heartbeat lapsed (another one pruned it) or
    a give-back that never reached Redis: the next resync writes the count as it is."""
    async with running(url, "a", max_streams=3) as a:
        await a.open_stream("client")
        await a.open_stream("other")
        key = a.streams.key("client")
        await a.streams.redis.hdel(key, "a")
        await a.streams.redis.hset(a.streams.key("other"), "a", 7)
        await a.streams.resync()
        assert await a.streams.redis.hget(key, "a") == b"1"
        assert await a.streams.redis.hget(a.streams.key("other"), "a") == b"1"
        a.close_stream("client")
        a.close_stream("other")
    with redis.Redis.from_url(url) as client:
        assert client.keys("chatgate:open:*") == []  # nothing left once all is closed


# WebSocket connections ---------------------------------------------------------------------


async def test_the_connection_cap_counts_sockets_on_every_instance(url: str) -> None:
    async with running(url, "a", max_connections=2) as a, running(url, "b", max_connections=2) as b:
        assert await a.connections.try_open()
        assert await b.connections.try_open()
        assert not await a.connections.try_open()
        assert not await b.connections.try_open()
        b.connections.close()
        await eventually(a.connections.try_open)
        assert a.connections.here() == 2


# Redis unreachable ---------------------------------------------------------------------------


@asynccontextmanager
async def unreachable(url: str, **limits: Any) -> AsyncIterator[RedisLimits]:
    client = cluster.connect(url)
    try:
        yield RedisLimits(client, Instance(client, "lonely"), url, **limits)
    finally:
        await client.aclose()


async def test_with_redis_gone_each_instance_enforces_its_own_limits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="chatgate.cluster")
    async with unreachable(f"redis://127.0.0.1:{free_port()}/{DB}", rate=(2, 60.0), max_streams=1,
                           max_connections=1) as limits:
        await limits.admit("client")
        await limits.admit("client")
        with pytest.raises(ChatError) as refused:
            await limits.admit("client")
        assert refused.value.code == "rate_limited" and 29 < (refused.value.retry_after or 0) <= 30
        await limits.open_stream("client")
        with pytest.raises(ChatError):
            await limits.open_stream("client")
        limits.close_stream("client")
        await limits.open_stream("client")
        assert await limits.connections.try_open()
        assert not await limits.connections.try_open()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot reach Redis" in r.message]
    assert len(warnings) == 1


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that takes connections and never answers, like a Redis behind a dead link."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/{DB}"


async def test_a_redis_that_never_answers_delays_a_turn_by_the_check_timeout_only(silent_server: str) -> None:
    async with unreachable(silent_server, rate=(5, 60.0), max_streams=1) as limits:
        started = time.monotonic()
        await limits.admit("client")
        await limits.open_stream("client")
        assert time.monotonic() - started < 2 * 1.0 + 1.0


# Two real gateways -------------------------------------------------------------------------


Pair = Callable[..., tuple[ExitStack, RunningGateway, RunningGateway]]


@pytest.fixture
def two_gateways(fake: FakeLLM, url: str, tmp_path: Path) -> Pair:
    """``stack, a, b = two_gateways(**settings)``: two instances on one Redis."""

    def start(**overrides: Any) -> tuple[ExitStack, RunningGateway, RunningGateway]:
        settings = {"provider": "ollama", "ollama_host": fake.url, "model": "fake-model", "store": url,
                    **overrides}
        stack = ExitStack()
        a = stack.enter_context(run_gateway(data_dir=tmp_path / "a", **settings))
        b = stack.enter_context(run_gateway(data_dir=tmp_path / "b", **settings))
        return stack, a, b

    return start


def test_the_rate_limit_holds_for_the_sum_over_two_gateways(
    two_gateways: Pair, fake: FakeLLM
) -> None:
    fake.configure(tokens=3)
    stack, a, b = two_gateways(rate_limit="5/minute")
    with stack:
        turns = [httpx.post(f"{gw.url}/chat", json={"message": "hi"}) for gw in (a, a, a, b, b)]
        assert [t.status_code for t in turns] == [200] * 5, turns[-1].text
        for gw in (b, a):
            refused = httpx.post(f"{gw.url}/chat", json={"message": "one too many"})
            assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
            assert 55 <= int(refused.headers["retry-after"]) <= 60


async def test_the_stream_cap_holds_across_two_gateways(
    two_gateways: Pair, fake: FakeLLM
) -> None:
    fake.configure(tokens=400, tps=100)
    stack, a, b = two_gateways(max_streams_per_client=1)
    with stack:
        async with connect(a.ws_url + "/ws") as ws:
            await ws.send(orjson.dumps({"type": "chat", "id": "long", "message": "a long one"}).decode())
            await _frame(ws, "delta")  # streaming on A
            refused = httpx.post(f"{b.url}/chat", json={"message": "and one on B"})
            assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
            await ws.send(orjson.dumps({"type": "cancel", "id": "long"}).decode())
            await _frame(ws, "done")
        fake.configure(tokens=3, tps=0)
        wait_until(
            lambda: httpx.post(f"{b.url}/chat", json={"message": "now?"}).status_code == 200,
            timeout=10, interval=0.05, what="B to take a reply once A's ended",
        )


async def test_the_connection_cap_holds_across_two_gateways(two_gateways: Pair) -> None:
    stack, a, b = two_gateways(max_connections=1)
    with stack:
        async with connect(a.ws_url + "/ws") as first:
            # The handshake ends before A counts the socket; a pong comes after.
            await first.send('{"type": "ping"}')
            assert orjson.loads(await asyncio.wait_for(first.recv(), 5)) == {"type": "pong"}
            async with connect(b.ws_url + "/ws") as second:
                refused = orjson.loads(await asyncio.wait_for(second.recv(), 5))
                assert refused["code"] == "busy" and refused["retryable"]
            await first.send('{"type": "ping"}')
            assert orjson.loads(await asyncio.wait_for(first.recv(), 5)) == {"type": "pong"}


async def test_a_killed_gateways_replies_stop_counting(
    fake: FakeLLM, url: str, tmp_path: Path
) -> None:
    """``kill -9`` runs no shutdown code: the dead instance's reply is still counted in
    Redis, until its heartbeat key expires; then the other instance takes the client's
    reply again."""
    fake.configure(tokens=3000, tps=200)
    env = {"OLLAMA_HOST": fake.url, "CHATGATE_STORE": url, "CHATGATE_DATA_DIR": str(tmp_path / "a"),
           "CHATGATE_MAX_STREAMS_PER_CLIENT": "1"}
    with serve_process(env) as a, run_gateway(
        provider="ollama", ollama_host=fake.url, model="fake-model", store=url, data_dir=tmp_path / "b",
        max_streams_per_client=1,
    ) as b:
        # A short close: the dead peer never answers the closing handshake, and the frames
        # left unread keep the client from seeing the connection's end until it gives up.
        async with connect(a.ws_url + "/ws", close_timeout=0.5) as ws:
            await ws.send(orjson.dumps({"type": "chat", "message": "a long one"}).decode())
            await _frame(ws, "delta")
            assert httpx.post(f"{b.url}/chat", json={"message": "on B"}).status_code == 429
            a.process.send_signal(signal.SIGKILL)
            a.process.wait(timeout=10)
            fake.configure(tokens=3, tps=0)
            # Well inside ALIVE_TTL_MS of the last heartbeat.
            assert httpx.post(f"{b.url}/chat", json={"message": "on B"}).status_code == 429  # not yet
        wait_until(
            lambda: httpx.post(f"{b.url}/chat", json={"message": "on B"}).status_code == 200,
            timeout=ALIVE_TTL_MS / 1000 + 10, interval=0.2, what="the dead instance's reply to stop counting",
        )


async def _frame(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame["type"] == kind:
            return frame
        assert frame["type"] != "error", frame
