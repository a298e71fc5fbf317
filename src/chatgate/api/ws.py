"""WebSocket endpoints: the native protocol on ``/ws`` and the seed dialects on theirs.

One :class:`Connection` class serves every dialect (:mod:`chatgate.api.dialects`): its
receive loop hands each frame to the dialect's decoder and carries out the native command
that comes back. The generations it starts or resumes go to the client through the
runner every protocol shares (:mod:`chatgate.api.delivery`): flushed on the loop's next
turn, encoded by the dialect, written straight to the server's ASGI ``send``, and a
client that takes no frame for ``SEND_TIMEOUT_S`` is disconnected (close code 1013). When
the socket drops, running generations are not cancelled at once: they are orphaned for
the resume grace period, so a client that reconnects can ``resume`` them, and cancelled
when nobody does.

The native protocol starts each turn as its frame arrives (a second turn in a busy
conversation is refused as ``busy``). The seed dialects' clients were written for servers
that read their next frame only once an answer had ended, so their turns (and
``clear_history``) wait in a per-connection backlog of at most ``MAX_QUEUED_TURNS`` and are
answered one after another, in order.

Each path has a default dialect; ``?dialect=NAME`` on any of them picks another.

The handshakes on these paths are answered by :class:`WebSocketRoutes`, an ASGI middleware
in front of the framework's router: a socket lives as long as its client stays, so the
routing and dependency layers it would otherwise keep on its stack cost memory per idle
socket and time per handshake (bench/RESULTS.md). Frames go straight to the server's ASGI
``send``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import uuid
from typing import TYPE_CHECKING, assert_never

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from chatgate.api.auth import caller, refusal
from chatgate.api.browsers import BrowserBoundary, boundary_of
from chatgate.api.delivery import TEXT_FRAMES, Follower, Outbox
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
    from chatgate.gateway import Gateway

log = logging.getLogger("chatgate.ws")

#: Seed dialects answer messages one after another: at most this many wait behind the
#: one being answered; more are refused with an error frame in the dialect's shape.
MAX_QUEUED_TURNS = 8
#: Each path's dialect when the URL names none.
PATH_DIALECTS: dict[str, DialectFactory] = {
    "/ws": dialect_named("native"),
    "/chat/ws": dialect_named("monty"),
    "/ws/chat": first_frame("cs_agent", "sequential", "monty"),
    "/ws/chat/{session_id}": dialect_named("workshop"),
}


def origin_allowed(websocket: WebSocket, boundary: BrowserBoundary) -> bool:
    """Browsers send Origin: the page's own, a page of a served host (any port) or a
    configured origin may connect (:mod:`chatgate.api.browsers`). Programs send none."""
    origin = websocket.headers.get("origin")
    return origin is None or boundary.allows_origin(origin, websocket.headers.get("host", ""))


class Connection:
    def __init__(self, websocket: WebSocket, peer: Peer, dialect: Dialect) -> None:
        self.websocket = websocket
        self.peer = peer
        self.gateway = peer.gateway
        self.dialect = dialect
        self.outbox = Outbox(
            websocket._send,
            text_frames=websocket.scope["extensions"].get(TEXT_FRAMES) if "extensions" in websocket.scope else None,
            on_drained=self._caught_up,
            on_stuck=self._stuck,
        )
        self.follower = Follower(self.outbox, self._push)
        self._closing: asyncio.Task[None] | None = None
        #: Seed dialects' commands waiting for the answer before them to end, in order.
        self._backlog: list[Chat | ClearHistory] = []  # at most MAX_QUEUED_TURNS + 1
        self._turns: asyncio.Task[None] | None = None

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
            case Chat() | ClearHistory() if self.dialect.one_at_a_time:
                self._queue(command)
            case Chat(turn):
                self._follow(await self._start(turn), after=None)
            case Cancel(generation_id):
                (await self._own(generation_id)).cancel()
            case Resume(generation_id, after):
                self._resume(await self._own(generation_id), after)
            case ClearHistory(conversation_id):
                await self._clear(conversation_id)
            case Ping():
                await self.emit({"type": "pong"})
            case Reply(frames):
                for frame in frames:
                    await self.send(frame)
            case _:
                assert_never(command)

    async def _start(self, turn: Turn, *, wait: bool = False) -> Generation:
        self.gateway.refuse_if_draining()
        limit = self.peer.limits.message_bytes
        if len(turn.message) * 4 > limit and len(turn.message.encode()) > limit:
            # Frames may carry history besides the message (CS_Agent); the message has its own cap.
            raise ChatError("too_large", f"message larger than {limit} bytes")
        turn = dataclasses.replace(turn, owner=self.peer.owner, client=self.peer.client, scope=self.peer.scope)
        return await self.gateway.service.start(turn, wait=wait)

    async def _clear(self, conversation_id: str) -> None:
        await self.gateway.service.clear_history(self.peer.owner, conversation_id)
        await self.emit({"type": "history_cleared", "conversation_id": conversation_id})

    def _queue(self, command: Chat | ClearHistory) -> None:
        """The seed systems read a client's next frame only after answering the one
        before: a message sent during an answer is answered after it, in order."""
        if len(self._backlog) > MAX_QUEUED_TURNS:  # the first one is being answered
            raise ChatError(
                "busy",
                f"{MAX_QUEUED_TURNS} messages are already waiting for an answer; send this one later",
                retryable=True,
            )
        self._backlog.append(command)
        if self._turns is None:
            self._turns = asyncio.create_task(self._answer_in_order())

    async def _answer_in_order(self) -> None:
        try:
            while self._backlog and not self.outbox.broken:
                try:
                    await self._answer(self._backlog[0])
                finally:
                    if self._backlog:
                        del self._backlog[0]
        except WebSocketDisconnect:
            return
        finally:
            self._turns = None

    async def _answer(self, command: Chat | ClearHistory) -> None:
        """Carry out one queued command and return once its answer has ended."""
        try:
            if isinstance(command, ClearHistory):
                await self._clear(command.conversation_id)
                return
            generation = await self._start(command.turn, wait=True)
        except ChatError as exc:
            await self.emit(exc.event(_request_id(command)))
            return
        except WebSocketDisconnect:
            raise
        except Exception:
            log.exception("starting a turn failed", extra={"request_id": _request_id(command)})
            await self.emit(error_event("internal", "internal error", id=_request_id(command)))
            return
        self._follow(generation, after=None)
        await generation.wait_finished()

    async def _own(self, generation_id: str) -> Generation:
        return await self.gateway.service.find(self.peer.owner, generation_id, scope=self.peer.scope)

    def _resume(self, generation: Generation, after: int) -> None:
        self.gateway.service.adopt(generation, self.peer.scope)
        self._follow(generation, after=after)  # also on the socket already following it: replay

    def _follow(self, generation: Generation, after: int | None) -> None:
        self.follower.follow(generation, after=after)

    async def emit(self, event: Outgoing, generation: Generation | None = None) -> None:
        """Send ``event`` in the connection's dialect."""
        if self.outbox.broken:
            raise WebSocketDisconnect(1006)
        self._push(event, generation)

    async def send(self, frame: Frame) -> None:
        """Send one frame as it is (a dialect's own reply)."""
        if self.outbox.broken:
            raise WebSocketDisconnect(1006)
        self.outbox.write_text(orjson.dumps(frame))

    def _push(self, event: Outgoing, generation: Generation | None) -> None:
        for frame in self.dialect.encode(event, generation):
            self.outbox.write_text(orjson.dumps(frame))

    def _caught_up(self) -> None:
        self.follower.resume()

    def _stuck(self) -> None:
        """The client took no frame for the send timeout: let it go; its generations are
        orphaned, so it can resume them from a new socket."""
        log.warning("client too slow; disconnecting", extra={"owner": self.peer.owner})
        self._unfollow()
        # The close frame waits behind the same full buffer; the server's keep-alive ping
        # ends the connection if the client never reads again.
        self._closing = asyncio.create_task(self._close(1013))

    async def _close(self, code: int) -> None:
        with contextlib.suppress(Exception):
            await self.websocket.close(code=code)

    def _unfollow(self) -> None:
        """Stop following every generation; those still running are orphaned, so a new
        socket can resume them within the grace period."""
        grace = self.gateway.settings.resume_grace_s
        for generation in self.follower.stop():
            self.gateway.service.orphan(generation, grace)

    def _detach(self) -> None:
        self.outbox.close()
        self._backlog.clear()
        if self._turns is not None:
            self._turns.cancel()
        self._unfollow()


def _request_id(command: Command | None) -> str | None:
    """The request a refused command was about, for the error event's ``id``."""
    match command:
        case Chat(turn):
            return turn.request_id
        case Cancel(generation_id) | Resume(generation_id, _):
            return generation_id
        case ClearHistory(_, request_id):
            return request_id
    return None


async def serve_socket(websocket: WebSocket, gateway: Gateway, default: DialectFactory) -> None:
    if not origin_allowed(websocket, boundary_of(gateway.settings)):
        await websocket.close(code=1008, reason="origin not allowed")
        return
    instance = gateway.instance
    # Which instance answers: for operators behind a load balancer (and for tests).
    await websocket.accept(headers=[(b"x-chatgate-instance", instance.id.encode())] if instance else None)
    name = websocket.query_params.get("dialect")
    try:
        factory = dialect_named(name) if name is not None else default
    except ChatError as exc:
        await websocket.send_text(orjson.dumps(exc.event()).decode())
        await websocket.close(code=1008, reason=exc.message[:120])
        return
    peer = Peer(
        gateway,
        websocket.path_params,
        client=websocket.client.host if websocket.client else None,
        scope=uuid.uuid4().hex,
    )
    connection = Connection(websocket, peer, factory(peer))
    limit = gateway.settings.max_connections
    # This instance's own count first (no round trip when it alone is full), then, with
    # Redis, the sum over every instance.
    shared = gateway.shared_limits.connections if gateway.shared_limits is not None else None
    if limit and (gateway.websockets_open >= limit or (shared is not None and not await shared.try_open())):
        await connection.emit(
            error_event("busy", f"the gateway holds its maximum of {limit} connections", retryable=True)
        )
        await websocket.close(code=1013, reason="too many connections")
        return
    gateway.websockets_open += 1
    gateway.metrics.websocket_opened()
    try:
        refused = refusal(websocket)
        if refused is not None:
            await connection.emit(refused.event())
            await websocket.close(code=1008, reason=refused.message[:120])
            return
        peer.owner = caller(websocket)
        await connection.run()
    finally:
        gateway.websockets_open -= 1
        if shared is not None:
            shared.close()
        gateway.metrics.websocket_closed()


_EXACT_PATHS = {path: factory for path, factory in PATH_DIALECTS.items() if "{" not in path}
_PATTERN_PATHS = [
    (re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)), factory)
    for path, factory in PATH_DIALECTS.items()
    if "{" in path
]


def route(path: str) -> tuple[DialectFactory, dict[str, str]] | None:
    """The default dialect of a WebSocket path and its path parameters; ``None`` if unknown."""
    factory = _EXACT_PATHS.get(path)
    if factory is not None:
        return factory, {}
    for pattern, factory in _PATTERN_PATHS:
        match = pattern.fullmatch(path)
        if match is not None:
            return factory, match.groupdict()
    return None


class WebSocketRoutes:
    """Serve the dialect paths' WebSockets; everything else goes on to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = route(scope["path"]) if scope["type"] == "websocket" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        default, scope["path_params"] = found
        await serve_socket(WebSocket(scope, receive, send), scope["app"].state.gateway, default)
