"""The WebSocket connection's writing: frames go out from the flush without a task switch
while the client reads, wait in order behind a slow one (whose tokens meanwhile join fewer,
larger deltas), and a client that stops reading for SEND_TIMEOUT_S is disconnected.

The gateway's parts are real (settings, chat service, the fake upstream over HTTP); only
the socket is an ASGI stand-in whose client reads when the test says so, since a real
client that stops reading takes megabytes of kernel buffers to notice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from starlette.websockets import WebSocket

from chatgate.api import delivery, ws
from chatgate.api.delivery import TEXT_FRAMES
from chatgate.api.dialects import Peer, dialect_named
from chatgate.chat.agents import load_agents
from chatgate.config import load_settings
from chatgate.gateway import Gateway, close_gateway, open_gateway
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM

BOUND_S = 5.0


async def wait_until(condition: Callable[[], object], bound_s: float = BOUND_S) -> None:
    """Poll ``condition`` on this loop (the gateway shares it) for at most ``bound_s``."""
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


class ClientSide:
    """The client end of one ASGI WebSocket: frames it sends, frames it has read, and
    whether it is reading (a send to it waits while it is not)."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.frames: list[dict[str, Any]] = []
        #: Frames that came through the server's synchronous text-frame writer, if offered.
        self.offers_text_frames = False
        self.direct = 0
        self.closed_with: int | None = None
        self.reading = asyncio.Event()
        self.reading.set()

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def send(self, message: dict[str, Any]) -> None:
        await self.reading.wait()
        if message["type"] == "websocket.send":
            self.frames.append(orjson.loads(message["text"]))
        elif message["type"] == "websocket.close":
            self.closed_with = message.get("code", 1000)
            self.inbox.put_nowait({"type": "websocket.disconnect", "code": self.closed_with})

    def text_frames(self, payload: bytes) -> bool:
        """The server's synchronous writer (:data:`TEXT_FRAMES`): it takes a frame only
        while the client reads, as a socket with room in its buffers does."""
        if not self.reading.is_set():
            return False
        self.frames.append(orjson.loads(payload))
        self.direct += 1
        return True

    def say(self, frame: dict[str, Any]) -> None:
        self.inbox.put_nowait({"type": "websocket.receive", "text": orjson.dumps(frame).decode()})

    def deltas(self, generation_id: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "delta" and f.get("id") == generation_id]

    def done(self, generation_id: str) -> bool:
        return any(f.get("type") == "done" and f.get("id") == generation_id for f in self.frames)


@pytest.fixture
async def gateway(fake: FakeLLM) -> AsyncIterator[Gateway]:
    settings = load_settings(provider="ollama", ollama_host=fake.url, model="fake-model", store="memory")
    opened = await open_gateway(settings, load_agents(None))
    try:
        yield opened
    finally:
        await close_gateway(opened)


@pytest.fixture(params=["asgi-send", "text-frames"])
async def client(gateway: Gateway, request: pytest.FixtureRequest) -> AsyncIterator[ClientSide]:
    """A client behind a server that takes every frame through ASGI ``send``, or one that
    also offers the synchronous text-frame writer (chatgate's own, under ``chatgate serve``)."""
    side = ClientSide()
    side.offers_text_frames = request.param == "text-frames"
    scope: dict[str, Any] = {
        "type": "websocket", "path": "/ws", "headers": [], "query_string": b"", "client": ("127.0.0.1", 9),
        "extensions": {TEXT_FRAMES: side.text_frames} if side.offers_text_frames else {},
    }
    socket = WebSocket(scope, side.receive, side.send)  # type: ignore[arg-type]
    side.inbox.put_nowait({"type": "websocket.connect"})
    await asyncio.wait_for(socket.accept(), BOUND_S)
    peer = Peer(gateway, {}, client="127.0.0.1")
    connection = ws.Connection(socket, peer, dialect_named("native")(peer))
    running = asyncio.create_task(connection.run())
    yield side
    side.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
    side.reading.set()
    await asyncio.wait_for(running, BOUND_S)


async def test_a_reading_client_gets_every_token_in_order(client: ClientSide) -> None:
    client.say({"type": "chat", "id": "g1", "message": "hi"})
    await wait_until(lambda: client.done("g1"))
    deltas = client.deltas("g1")
    assert "".join(d["text"] for d in deltas) == fake_reply(40)
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert [f["type"] for f in client.frames] == ["start", *["delta"] * len(deltas), "done"]
    if client.offers_text_frames:
        assert client.direct == len(client.frames)  # none waited for ASGI send


async def test_a_slow_client_gets_everything_in_order_in_fewer_frames(
    client: ClientSide, fake: FakeLLM, gateway: Gateway
) -> None:
    fake.configure(tokens=60, tps=200)
    client.say({"type": "chat", "id": "g1", "message": "hi"})
    await wait_until(lambda: client.deltas("g1"))
    client.reading.clear()  # the client stops reading for a while
    generation = next(g for g in gateway.service.generations() if g.id == "g1")
    await wait_until(lambda: generation.tokens >= 40)
    client.say({"type": "ping"})  # answered in order, after what was already waiting
    client.reading.set()
    await wait_until(lambda: client.done("g1"))
    deltas = client.deltas("g1")
    assert "".join(d["text"] for d in deltas) == fake_reply(60)
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert len(deltas) < 40  # what piled up while it did not read went out as a few deltas
    await wait_until(lambda: {"type": "pong"} in client.frames)
    if client.offers_text_frames:  # written directly until the client fell behind, then in order by send
        assert 0 < client.direct < len(client.frames)


async def test_a_client_that_stops_reading_is_disconnected_and_its_answer_kept(
    client: ClientSide, fake: FakeLLM, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "SEND_TIMEOUT_S", 0.3)
    fake.configure(tokens=150, tps=100)
    client.say({"type": "chat", "id": "g1", "conversation_id": "c-slow", "message": "hi"})
    await wait_until(lambda: client.deltas("g1"))
    generation = next(g for g in gateway.service.generations() if g.id == "g1")
    client.reading.clear()
    await wait_until(lambda: generation.orphan_timer is not None)  # given up: a new socket may resume it
    client.reading.set()  # the close frame was waiting behind the full buffer
    await wait_until(lambda: client.closed_with is not None)
    assert client.closed_with == 1013
    await wait_until(lambda: generation.finished)
    stored = await gateway.store.window("c-slow", 10)
    assert [m.content for m in stored] == ["hi", fake_reply(150)]


class ForeignAwaitable:
    """What an ASGI server written in another language may hand its ``send`` coroutine to
    wait on (granian does): one object that is its own iterator, yields itself until done,
    and does not raise asyncio's "blocking" flag again when awaited a second time."""

    def __init__(self, future: asyncio.Future[None]) -> None:
        self._future = future
        self._asyncio_future_blocking = True

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._future.get_loop()

    def add_done_callback(self, callback: Callable[[Any], object], *, context: Any = None) -> None:
        self._future.add_done_callback(lambda _: callback(self), context=context)

    def cancel(self) -> bool:
        return self._future.cancel()

    def __await__(self) -> ForeignAwaitable:
        return self

    def __iter__(self) -> ForeignAwaitable:
        return self

    def __next__(self) -> ForeignAwaitable:
        if self._future.done():
            raise StopIteration(self._future.result())
        return self


async def test_a_server_whose_send_waits_on_a_foreign_awaitable_gets_every_message_in_order() -> None:
    """A send that cannot finish at once is handed to a task; what it waits on need not be
    an asyncio future."""
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    sent: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        await ForeignAwaitable(gate)
        sent.append(message["text"])

    drained = asyncio.Event()
    outbox = delivery.Outbox(send, on_drained=drained.set)  # type: ignore[arg-type]
    for text in ("a", "b", "c"):
        outbox.write({"type": "websocket.send", "text": text})
    assert outbox.waiting and sent == []
    for _ in range(3):  # loop turns (no time passes): the drainer takes up its wait first
        await asyncio.sleep(0)
    gate.set_result(None)
    await asyncio.wait_for(drained.wait(), BOUND_S)
    assert sent == ["a", "b", "c"] and not outbox.broken
