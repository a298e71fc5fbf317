"""Two gateways on one Redis are one service for generations too: an answer started on
one instance is resumed, followed and cancelled from the other, every delta exactly
once and in order."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import connect

from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.frames import recv, send, until
from chatgate.testing.servers import FakeLLM, RedisServer, RunningGateway, run_gateway, wait_until

DB = 11
KEY = {"Authorization": "Bearer k1"}


@pytest.fixture(params=["k1,k2"])
def pair(
    request: pytest.FixtureRequest, fake: FakeLLM, redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[RunningGateway, RunningGateway]]:
    """Two instances on one Redis; with API keys unless the test asks for none."""
    redis.Redis.from_url(f"{redis_server.url}/{DB}").flushdb()
    settings: dict[str, Any] = {
        "provider": "ollama", "ollama_host": fake.url, "model": "fake-model",
        "store": f"{redis_server.url}/{DB}", "api_keys": request.param, "resume_grace_s": 30.0,
    }
    with ExitStack() as stack:
        a = stack.enter_context(run_gateway(data_dir=tmp_path / "a", **settings))
        b = stack.enter_context(run_gateway(data_dir=tmp_path / "b", **settings))
        yield a, b


@pytest.mark.parametrize(
    ("pair", "identity"),
    [("k1,k2", "key"), ("", "anonymous-server-id"), ("", "anonymous-own-id")],
    indirect=["pair"],
)
async def test_an_answer_resumes_on_the_other_instance(
    pair: tuple[RunningGateway, RunningGateway], fake: FakeLLM, identity: str
) -> None:
    a, b = pair
    fake.configure(tokens=80, tps=100)
    headers = KEY if identity == "key" else {}
    chat: dict[str, Any] = {"type": "chat", "message": "a long answer please"}
    if identity == "anonymous-own-id":
        chat["id"] = "my-own-id"
    async with connect(a.ws_url + "/ws", additional_headers=headers) as ws:
        await send(ws, chat)
        start = await recv(ws)
        received = [await recv(ws) for _ in range(3)]
    assert [f["type"] for f in received] == ["delta"] * 3
    async with connect(b.ws_url + "/ws", additional_headers=headers) as ws:
        await send(ws, {"type": "resume", "id": start["id"], "after": received[-1]["seq"]})
        done, rest = await until(ws, "done")
    assert done["finish_reason"] == "stop" and done["usage"]["completion_tokens"] == 80
    deltas = received + rest
    assert [f["type"] for f in rest] == ["delta"] * len(rest)
    assert [f["seq"] for f in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(f["text"] for f in deltas) == fake_reply(80)
    # The instance that ran it stored it once.
    stored = httpx.get(f"{b.url}/conversations/{start['conversation_id']}", headers=headers).json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][1]["content"] == fake_reply(80)


async def test_a_finished_answer_replays_on_the_other_instance(
    pair: tuple[RunningGateway, RunningGateway], fake: FakeLLM
) -> None:
    a, b = pair
    fake.configure(tokens=30)
    async with connect(a.ws_url + "/ws", additional_headers=KEY) as ws:
        await send(ws, {"type": "chat", "message": "short"})
        start = await recv(ws)
        first, _ = await until(ws, "done")
    async with connect(b.ws_url + "/ws", additional_headers=KEY) as ws:
        await send(ws, {"type": "resume", "id": start["id"], "after": 0})
        done, deltas = await until(ws, "done")
    assert done == first
    assert "".join(f["text"] for f in deltas) == fake_reply(30)


async def test_another_key_cannot_resume_or_cancel_it(
    pair: tuple[RunningGateway, RunningGateway], fake: FakeLLM
) -> None:
    a, b = pair
    fake.configure(tokens=200, tps=100)
    async with connect(a.ws_url + "/ws", additional_headers=KEY) as ws:
        await send(ws, {"type": "chat", "message": "mine"})
        start = await recv(ws)
        async with connect(b.ws_url + "/ws", additional_headers={"Authorization": "Bearer k2"}) as other:
            for frame in ({"type": "resume", "id": start["id"], "after": 0}, {"type": "cancel", "id": start["id"]}):
                await send(other, frame)
                error = await recv(other)
                assert error["type"] == "error" and error["code"] == "not_found"
        await send(ws, {"type": "cancel", "id": start["id"]})
        done, _ = await until(ws, "done")
    assert done["finish_reason"] == "cancelled"


async def test_a_cancel_from_the_other_instance_stops_the_upstream(
    pair: tuple[RunningGateway, RunningGateway], fake: FakeLLM
) -> None:
    a, b = pair
    fake.configure(tokens=1000, tps=50)
    async with connect(a.ws_url + "/ws", additional_headers=KEY) as ws:
        await send(ws, {"type": "chat", "message": "go on and on"})
        start = await recv(ws)
        await recv(ws)
        async with connect(b.ws_url + "/ws", additional_headers=KEY) as other:
            await send(other, {"type": "cancel", "id": start["id"]})
            done, _ = await until(ws, "done")
    assert done["finish_reason"] == "cancelled"
    record = wait_until(
        lambda: next((r for r in fake.requests() if r["disconnected_at"]), None), timeout=5, what="upstream closed"
    )
    assert record["tokens_sent"] < 1000
