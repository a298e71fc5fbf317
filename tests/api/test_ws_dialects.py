"""What every WebSocket dialect shares, run against each one over real sockets: bad frames
get the dialect's own error and the socket stays open, a dropped socket's reply outlives it
for the grace period and is then cancelled with its partial answer kept, ``?dialect=``
overrides a path's default, and an unknown dialect is refused clearly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chatgate.api.limits import SizeLimits
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway, wait_until

Frame = dict[str, Any]


@dataclass(frozen=True)
class Client:
    """How one seed's client talks: where it connects and what its frames look like."""

    dialect: str
    path: str
    ask: Callable[[str], Frame]
    bad_frame: str
    is_delta: Callable[[Frame], bool]
    #: The text a delta frame carries.
    text: Callable[[Frame], str]
    is_error: Callable[[Frame], bool]
    #: The last frame of a reply, whether it succeeded or failed.
    is_end: Callable[[Frame], bool]


CLIENTS = [
    Client(
        "native", "/ws", lambda m: {"type": "chat", "message": m}, '{"type": "chat"}',
        lambda f: f["type"] == "delta", lambda f: f["text"], lambda f: f["type"] == "error",
        lambda f: f["type"] in ("done", "error"),
    ),
    Client(
        "monty", "/chat/ws", lambda m: {"message": m, "task_id": "t-1"}, '{"task_id": "t-1"}',
        lambda f: f["event_type"] == "content", lambda f: f["content"], lambda f: f["event_type"] == "error",
        lambda f: f["event_type"] in ("completed", "error"),
    ),
    Client(
        "cs_agent", "/ws/chat", lambda m: {"messages": [{"role": "user", "content": m}]}, '{"messages": []}',
        lambda f: f["type"] == "delta", lambda f: f["text"], lambda f: f["type"] == "error",
        lambda f: f["type"] in ("done", "error"),
    ),
    Client(
        "sequential", "/ws?dialect=sequential", lambda m: {"type": "message", "content": m},
        '{"type": "message"}', lambda f: f["type"] == "message_chunk", lambda f: f["content"],
        lambda f: f["type"] == "error", lambda f: f["type"] == "typing_stop",
    ),
    Client(
        "workshop", "/ws/chat/session_1", lambda m: {"message": m, "agent": "default"}, '{"agent": "default"}',
        lambda f: f["type"] == "chunk", lambda f: f["content"], lambda f: f["type"] == "error",
        lambda f: f["type"] in ("done", "error"),
    ),
]
by_dialect = pytest.mark.parametrize("client", CLIENTS, ids=[c.dialect for c in CLIENTS])


async def recv(ws: ClientConnection, timeout: float = 10) -> Frame:
    frame: Frame = orjson.loads(await asyncio.wait_for(ws.recv(), timeout))
    return frame


async def reply(ws: ClientConnection, client: Client) -> list[Frame]:
    frames = [await recv(ws)]
    while not client.is_end(frames[-1]):
        frames.append(await recv(ws))
    return frames


def test_every_dialect_is_covered() -> None:
    from chatgate.api.dialects import dialect_names

    assert sorted(c.dialect for c in CLIENTS) == dialect_names()


@by_dialect
async def test_bad_frames_get_the_dialects_error_and_the_socket_stays_open(
    gw: RunningGateway, client: Client
) -> None:
    async with connect(gw.ws_url + client.path) as ws:
        # The largest frame the server reads at all; a larger one closes the socket (1009).
        largest = SizeLimits.of(gw.settings).history_bytes - 1024
        too_long, too_large = client.ask("x" * 20_000), client.ask("x" * largest)
        for bad in (client.bad_frame, "not json", "[1, 2]", *(orjson.dumps(f).decode() for f in (too_long, too_large))):
            await ws.send(bad)
            frames = await reply(ws, client)
            assert any(client.is_error(f) for f in frames), (bad, frames)
        await ws.send(orjson.dumps(client.ask("still there?")).decode())
        frames = await reply(ws, client)
    deltas = [f for f in frames if client.is_delta(f)]
    assert deltas and not any(client.is_error(f) for f in frames)
    assert "".join(client.text(d) for d in deltas) == fake_reply(40)


@by_dialect
async def test_a_dropped_socket_is_cancelled_after_the_grace_period_and_the_partial_kept(
    start_gateway: Any, fake: FakeLLM, client: Client
) -> None:
    fake.configure(tokens=1000, tps=50)
    with start_gateway(resume_grace_s=0.3) as gw:
        async with connect(gw.ws_url + client.path) as ws:
            await ws.send(orjson.dumps(client.ask("tell me everything")).decode())
            while not client.is_delta(await recv(ws)):
                pass
            dropped_at = time.monotonic()
        record = wait_until(
            lambda: next((r for r in fake.requests() if r["disconnected_at"]), None), timeout=5, what="cancel"
        )
        assert 0.25 < record["disconnected_at"] - dropped_at < 2.0
        assert not record["completed"]

        def stored() -> list[Frame] | None:
            conversations = httpx.get(f"{gw.url}/conversations").json()["conversations"]
            if not conversations:
                return None
            messages: list[Frame] = httpx.get(f"{gw.url}/conversations/{conversations[0]['id']}").json()["messages"]
            return messages if len(messages) == 2 else None

        user, assistant = wait_until(stored, timeout=2, what="partial answer stored")
    assert user["content"] == "tell me everything" and user["partial"] is False
    assert assistant["partial"] is True
    assert assistant["content"] and fake_reply(1000).startswith(assistant["content"])


@pytest.mark.parametrize(
    ("path", "frame", "expected_first_type"),
    [
        ("/ws?dialect=monty", {"message": "hi", "task_id": 7}, None),
        ("/chat/ws?dialect=native", {"type": "chat", "message": "hi"}, "start"),
        ("/ws/chat?dialect=workshop", {"message": "hi", "agent": "default"}, "chunk"),
        ("/ws/chat/s-9?dialect=cs_agent", {"messages": [{"role": "user", "content": "hi"}]}, "delta"),
        ("/ws/chat?dialect=sequential", {"message": "hi"}, "message_received"),
    ],
)
async def test_the_dialect_query_overrides_the_paths_default(
    gw: RunningGateway, fake: FakeLLM, path: str, frame: Frame, expected_first_type: str | None
) -> None:
    fake.configure(tokens=1)
    async with connect(gw.ws_url + path) as ws:
        await ws.send(orjson.dumps(frame).decode())
        first = await recv(ws)
    if expected_first_type is None:  # Monty frames have no type
        assert first == {"task_id": 7, "event_type": "content", "content": fake_reply(1)}
    else:
        assert first["type"] == expected_first_type


async def test_an_unknown_dialect_is_refused_with_a_reason(gw: RunningGateway) -> None:
    async with connect(gw.ws_url + "/ws?dialect=klingon") as ws:
        error = await recv(ws)
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
    assert error["type"] == "error" and error["code"] == "bad_request"
    assert "klingon" in error["message"] and "sequential" in error["message"]
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008 and "unknown dialect 'klingon'" in closed.value.rcvd.reason


async def test_ws_chat_answers_an_undecided_first_frame_in_every_clients_shape(gw: RunningGateway) -> None:
    async with connect(gw.ws_url + "/ws/chat") as ws:
        await ws.send('{"hello": "there"}')
        error = await recv(ws)
        assert error["type"] == "error" and error["event_type"] == "error" and error["task_id"] is None
        assert error["error"] == error["content"] and "cs_agent or sequential or monty" in error["error"]
        await ws.send(orjson.dumps({"type": "ping"}).decode())
        assert await recv(ws) == {"type": "pong"}


@pytest.mark.parametrize("path", ["/chat/ws", "/ws/chat", "/ws/chat/s-1", "/ws?dialect=sequential"])
async def test_foreign_origins_are_refused_on_every_path(gw: RunningGateway, path: str) -> None:
    with pytest.raises(Exception, match="403"):
        async with connect(gw.ws_url + path, origin="http://evil.example"):  # type: ignore[arg-type]
            pass
