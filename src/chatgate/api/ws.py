"""The native WebSocket protocol on ``/ws`` (see SPEC "Native WebSocket protocol").

One receive loop per connection dispatches frames; each generation streaming to the
socket has its own pump task. When the socket drops, running generations are not
cancelled at once: they are orphaned for the resume grace period, so a client that
reconnects can ``resume`` them, and cancelled when nobody does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import orjson
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from chatgate import observability as obs
from chatgate.chat.events import ChatError, ErrorEvent, Event, error_event
from chatgate.chat.generation import Generation
from chatgate.chat.service import Turn
from chatgate.providers.base import GenerationOptions

if TYPE_CHECKING:
    from chatgate.app import Gateway

router = APIRouter()
log = logging.getLogger("chatgate.ws")

#: A client whose socket accepts no frame for this long is disconnected, not buffered.
SEND_TIMEOUT_S = 10.0
MAX_ID_CHARS = 128


def origin_allowed(websocket: WebSocket, allowed: list[str]) -> bool:
    """Browsers send Origin; only the same origin or a configured one may connect."""
    origin = websocket.headers.get("origin")
    if not origin or "*" in allowed or origin in allowed:
        return True
    return urlparse(origin).netloc == websocket.headers.get("host", "")


def _bad(message: str, id: str | None = None) -> ChatError:
    return ChatError("bad_request", message) if id is None else ChatError("bad_request", f"{message} (id {id})")


def _optional_str(frame: dict[str, Any], key: str) -> str | None:
    value = frame.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise _bad(f"{key} must be a non-empty string of at most {MAX_ID_CHARS} characters")
    return value


class NativeConnection:
    def __init__(self, websocket: WebSocket, gateway: Gateway, owner: str | None) -> None:
        self.websocket = websocket
        self.gateway = gateway
        self.owner = owner
        self.client = websocket.client.host if websocket.client else None
        self.pumps: dict[str, asyncio.Task[None]] = {}
        self.generations: dict[str, Generation] = {}
        self._send_lock = asyncio.Lock()
        self._handlers = {
            "chat": self._chat,
            "cancel": self._cancel,
            "resume": self._resume,
            "clear_history": self._clear_history,
            "ping": self._ping,
        }

    async def run(self) -> None:
        max_bytes = self.gateway.settings.max_message_bytes
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                raw = message.get("text")
                if raw is None:
                    raw_bytes = message.get("bytes") or b""
                    size = len(raw_bytes)
                else:
                    size = len(raw) if len(raw) * 4 <= max_bytes else len(raw.encode())
                if size > max_bytes:
                    await self.send(error_event("too_large", f"frame larger than {max_bytes} bytes"))
                    continue
                await self._dispatch(raw if raw is not None else raw_bytes)
        except WebSocketDisconnect:
            return
        finally:
            self._detach()

    async def _dispatch(self, raw: str | bytes) -> None:
        frame_id: str | None = None
        try:
            try:
                frame = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise _bad("frame is not valid JSON") from None
            if not isinstance(frame, dict):
                raise _bad("frame must be a JSON object")
            frame_id = frame.get("id") if isinstance(frame.get("id"), str) else None
            handler = self._handlers.get(frame.get("type"))  # type: ignore[arg-type]
            if handler is None:
                raise _bad(f"unknown frame type {frame.get('type')!r}; expected one of {', '.join(self._handlers)}")
            await handler(frame)
        except ChatError as exc:
            await self.send(exc.event(frame_id))
        except Exception:
            log.exception("frame handling failed", extra={"request_id": frame_id})
            await self.send(error_event("internal", "internal error", id=frame_id))

    async def _chat(self, frame: dict[str, Any]) -> None:
        request_id = _optional_str(frame, "id")
        message = frame.get("message")
        if not isinstance(message, str) or not message.strip():
            raise _bad("message must be a non-empty string")
        if request_id is not None and request_id in self.generations:
            raise _bad(f"a generation with id {request_id!r} is already running on this socket")
        options = frame.get("options")
        if options is not None and not isinstance(options, dict):
            raise _bad("options must be an object")
        try:
            parsed = GenerationOptions.from_mapping(options)
        except (TypeError, ValueError) as exc:
            raise _bad(f"bad options: {exc}") from None
        turn = Turn(
            message=message,
            conversation_id=_optional_str(frame, "conversation_id"),
            agent=_optional_str(frame, "agent"),
            model=_optional_str(frame, "model"),
            options=parsed,
            owner=self.owner,
            client=self.client,
            request_id=request_id,
        )
        generation = await self.gateway.service.start(turn)
        self._follow(generation, after=None)

    def _own(self, frame: dict[str, Any]) -> Generation:
        generation_id = _optional_str(frame, "id")
        if generation_id is None:
            raise _bad("id is required")
        generation = self.gateway.service.get(generation_id)
        if generation is None or generation.owner != self.owner:
            raise ChatError("not_found", f"no generation {generation_id!r}", status=404)
        return generation

    async def _cancel(self, frame: dict[str, Any]) -> None:
        self._own(frame).cancel()

    async def _resume(self, frame: dict[str, Any]) -> None:
        generation = self._own(frame)
        after = frame.get("after", 0)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise _bad("after must be a delta seq (an integer >= 0)")
        self.gateway.service.adopt(generation)
        old = self.pumps.pop(generation.id, None)
        if old is not None:
            old.cancel()
        self._follow(generation, after=after)

    async def _clear_history(self, frame: dict[str, Any]) -> None:
        conversation_id = _optional_str(frame, "conversation_id")
        if conversation_id is None:
            raise _bad("conversation_id is required")
        await self.gateway.service.clear_history(conversation_id, self.owner)
        await self.send({"type": "history_cleared", "conversation_id": conversation_id})

    async def _ping(self, frame: dict[str, Any]) -> None:
        await self.send({"type": "pong"})

    def _follow(self, generation: Generation, after: int | None) -> None:
        self.generations[generation.id] = generation
        self.pumps[generation.id] = asyncio.create_task(self._pump(generation, after))

    async def _pump(self, generation: Generation, after: int | None) -> None:
        try:
            async for event in generation.events(after):
                await self.send(event)
        except (WebSocketDisconnect, OSError, TimeoutError):
            pass
        finally:
            if self.pumps.get(generation.id) is asyncio.current_task():
                del self.pumps[generation.id]
                if generation.finished:
                    self.generations.pop(generation.id, None)

    async def send(self, event: Event | ErrorEvent | dict[str, Any]) -> None:
        frame = orjson.dumps(event).decode()
        async with self._send_lock:
            if self.websocket.application_state is not WebSocketState.CONNECTED:
                raise WebSocketDisconnect(1006)
            try:
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await self.websocket.send_text(frame)
            except TimeoutError:
                log.warning("client too slow; disconnecting", extra={"owner": self.owner})
                await self.websocket.close(code=1013)
                raise

    def _detach(self) -> None:
        for task in self.pumps.values():
            task.cancel()
        grace = self.gateway.settings.resume_grace_s
        for generation in self.generations.values():
            if not generation.finished:
                self.gateway.service.orphan(generation, grace)
        self.pumps.clear()
        self.generations.clear()


@router.websocket("/ws")
async def native_socket(websocket: WebSocket) -> None:
    gateway: Gateway = websocket.app.state.gateway
    await serve_socket(websocket, gateway)


async def serve_socket(websocket: WebSocket, gateway: Gateway) -> None:
    if not origin_allowed(websocket, gateway.settings.cors_origin_list):
        await websocket.close(code=1008, reason="origin not allowed")
        return
    await websocket.accept()
    limit = gateway.settings.max_connections
    if limit and gateway.websockets_open >= limit:
        busy = error_event("busy", f"the gateway holds its maximum of {limit} connections", retryable=True)
        await websocket.send_text(orjson.dumps(busy).decode())
        await websocket.close(code=1013, reason="too many connections")
        return
    gateway.websockets_open += 1
    obs.WS_CONNECTIONS.inc()
    try:
        try:
            owner = gateway.auth.identify(websocket)
        except ChatError as exc:
            await websocket.send_text(orjson.dumps(exc.event()).decode())
            await websocket.close(code=1008, reason=exc.message[:120])
            return
        await NativeConnection(websocket, gateway, owner).run()
    finally:
        gateway.websockets_open -= 1
        obs.WS_CONNECTIONS.dec()
