"""WebSocket endpoints: the native protocol on ``/ws`` and the seed dialects on theirs.

One :class:`Connection` class serves every dialect (:mod:`chatgate.api.dialects`): its
receive loop hands each frame to the dialect's decoder and carries out the native command
that comes back; each generation streaming to the socket has its own pump task, which
passes the native events through the dialect's encoder. When the socket drops, running
generations are not cancelled at once: they are orphaned for the resume grace period, so
a client that reconnects can ``resume`` them, and cancelled when nobody does.

Each path has a default dialect; ``?dialect=NAME`` on any of them picks another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, assert_never
from urllib.parse import urlparse

import orjson
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from chatgate import observability as obs
from chatgate.api.dialects import Dialect, DialectFactory, Peer, dialect_named, first_frame
from chatgate.api.dialects.base import (
    Cancel,
    Chat,
    ClearHistory,
    Command,
    Frame,
    Outgoing,
    Ping,
    Reply,
    Resume,
    bad,
)
from chatgate.chat.events import ChatError, error_event
from chatgate.chat.generation import Generation
from chatgate.chat.service import Turn

if TYPE_CHECKING:
    from chatgate.app import Gateway

router = APIRouter()
log = logging.getLogger("chatgate.ws")

#: A client whose socket accepts no frame for this long is disconnected, not buffered.
SEND_TIMEOUT_S = 10.0
#: Each path's dialect when the URL names none.
PATH_DIALECTS: dict[str, DialectFactory] = {
    "/ws": dialect_named("native"),
    "/chat/ws": dialect_named("monty"),
    "/ws/chat": first_frame("cs_agent", "monty"),
    "/ws/chat/{session_id}": dialect_named("workshop"),
}


def origin_allowed(websocket: WebSocket, allowed: list[str]) -> bool:
    """Browsers send Origin; only the same origin or a configured one may connect."""
    origin = websocket.headers.get("origin")
    if not origin or "*" in allowed or origin in allowed:
        return True
    return urlparse(origin).netloc == websocket.headers.get("host", "")


class Connection:
    def __init__(self, websocket: WebSocket, peer: Peer, dialect: Dialect) -> None:
        self.websocket = websocket
        self.peer = peer
        self.gateway = peer.gateway
        self.dialect = dialect
        self.pumps: dict[str, asyncio.Task[None]] = {}
        self.generations: dict[str, Generation] = {}
        self._send_lock = asyncio.Lock()

    async def run(self) -> None:
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                max_bytes = self.dialect.max_frame_bytes()
                raw = message.get("text")
                if raw is None:
                    raw_bytes = message.get("bytes") or b""
                    size = len(raw_bytes)
                else:
                    size = len(raw) if len(raw) * 4 <= max_bytes else len(raw.encode())
                if size > max_bytes:
                    await self.emit(error_event("too_large", f"frame larger than {max_bytes} bytes"))
                    continue
                await self._handle(raw if raw is not None else raw_bytes)
        except WebSocketDisconnect:
            return
        finally:
            self._detach()

    async def _handle(self, raw: str | bytes) -> None:
        command: Command | None = None
        try:
            try:
                frame = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise bad("frame is not valid JSON") from None
            if not isinstance(frame, dict):
                raise bad("frame must be a JSON object")
            command = await self.dialect.decode(frame)
            await self._execute(command)
        except ChatError as exc:
            await self.emit(exc.event(_request_id(command)))
        except WebSocketDisconnect:
            raise
        except Exception:
            request_id = _request_id(command)
            log.exception("frame handling failed", extra={"request_id": request_id})
            await self.emit(error_event("internal", "internal error", id=request_id))

    async def _execute(self, command: Command) -> None:
        match command:
            case Chat(turn):
                await self._chat(turn)
            case Cancel(generation_id):
                self._own(generation_id).cancel()
            case Resume(generation_id, after):
                self._resume(self._own(generation_id), after)
            case ClearHistory(conversation_id):
                await self.gateway.service.clear_history(conversation_id, self.peer.owner)
                await self.emit({"type": "history_cleared", "conversation_id": conversation_id})
            case Ping():
                await self.emit({"type": "pong"})
            case Reply(frames):
                for frame in frames:
                    await self.send(frame)
            case _:
                assert_never(command)

    async def _chat(self, turn: Turn) -> None:
        if turn.request_id is not None and turn.request_id in self.generations:
            raise bad(f"a generation with id {turn.request_id!r} is already running on this socket")
        limit = self.gateway.settings.max_message_bytes
        if len(turn.message) * 4 > limit and len(turn.message.encode()) > limit:
            # Frames may carry history besides the message (CS_Agent); the message has its own cap.
            raise ChatError("too_large", f"message larger than {limit} bytes")
        turn = dataclasses.replace(turn, owner=self.peer.owner, client=self.peer.client)
        generation = await self.gateway.service.start(turn)
        self._follow(generation, after=None)

    def _own(self, generation_id: str) -> Generation:
        generation = self.gateway.service.get(generation_id)
        if generation is None or generation.owner != self.peer.owner:
            raise ChatError("not_found", f"no generation {generation_id!r}", status=404)
        return generation

    def _resume(self, generation: Generation, after: int) -> None:
        self.gateway.service.adopt(generation)
        old = self.pumps.pop(generation.id, None)
        if old is not None:
            old.cancel()
        self._follow(generation, after=after)

    def _follow(self, generation: Generation, after: int | None) -> None:
        self.generations[generation.id] = generation
        self.pumps[generation.id] = asyncio.create_task(self._pump(generation, after))

    async def _pump(self, generation: Generation, after: int | None) -> None:
        try:
            async for event in generation.events(after):
                await self.emit(event, generation)
        except WebSocketDisconnect:
            pass
        finally:
            if self.pumps.get(generation.id) is asyncio.current_task():
                del self.pumps[generation.id]
                if generation.finished:
                    self.generations.pop(generation.id, None)

    async def emit(self, event: Outgoing, generation: Generation | None = None) -> None:
        """Send ``event`` in the connection's dialect."""
        for frame in self.dialect.encode(event, generation):
            await self.send(frame)

    async def send(self, frame: Frame) -> None:
        """Send one frame; a socket that is gone, or too slow, raises WebSocketDisconnect."""
        text = orjson.dumps(frame).decode()
        async with self._send_lock:
            if self.websocket.application_state is not WebSocketState.CONNECTED:
                raise WebSocketDisconnect(1006)
            try:
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await self.websocket.send_text(text)
            except TimeoutError:
                log.warning("client too slow; disconnecting", extra={"owner": self.peer.owner})
                await self.websocket.close(code=1013)
                raise WebSocketDisconnect(1013) from None
            except OSError as exc:
                raise WebSocketDisconnect(1006) from exc

    def _detach(self) -> None:
        for task in self.pumps.values():
            task.cancel()
        grace = self.gateway.settings.resume_grace_s
        for generation in self.generations.values():
            if not generation.finished:
                self.gateway.service.orphan(generation, grace)
        self.pumps.clear()
        self.generations.clear()


def _request_id(command: Command | None) -> str | None:
    """The request a refused command was about, for the error event's ``id``."""
    match command:
        case Chat(turn):
            return turn.request_id
        case Cancel(generation_id) | Resume(generation_id, _):
            return generation_id
    return None


async def serve_socket(websocket: WebSocket, gateway: Gateway, default: DialectFactory) -> None:
    if not origin_allowed(websocket, gateway.settings.cors_origin_list):
        await websocket.close(code=1008, reason="origin not allowed")
        return
    await websocket.accept()
    name = websocket.query_params.get("dialect")
    try:
        factory = dialect_named(name) if name is not None else default
    except ChatError as exc:
        await websocket.send_text(orjson.dumps(exc.event()).decode())
        await websocket.close(code=1008, reason=exc.message[:120])
        return
    peer = Peer(gateway, dict(websocket.path_params), client=websocket.client.host if websocket.client else None)
    connection = Connection(websocket, peer, factory(peer))
    limit = gateway.settings.max_connections
    if limit and gateway.websockets_open >= limit:
        await connection.emit(
            error_event("busy", f"the gateway holds its maximum of {limit} connections", retryable=True)
        )
        await websocket.close(code=1013, reason="too many connections")
        return
    gateway.websockets_open += 1
    obs.WS_CONNECTIONS.inc()
    try:
        try:
            peer.owner = gateway.auth.identify(websocket)
        except ChatError as exc:
            await connection.emit(exc.event())
            await websocket.close(code=1008, reason=exc.message[:120])
            return
        await connection.run()
    finally:
        gateway.websockets_open -= 1
        obs.WS_CONNECTIONS.dec()


def _endpoint(default: DialectFactory) -> Callable[[WebSocket], Awaitable[None]]:
    async def endpoint(websocket: WebSocket) -> None:
        await serve_socket(websocket, websocket.app.state.gateway, default)

    return endpoint


for _path, _default in PATH_DIALECTS.items():
    router.add_api_websocket_route(_path, _endpoint(_default))
