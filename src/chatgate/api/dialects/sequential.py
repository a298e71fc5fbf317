"""The sequential-thinking integration's protocol (seed ``002``).

Client: ``{"type": "message", "content": TEXT}`` or ``{"message": TEXT}``, each with an
optional ``session_id``; ``{"type": "ping"}`` → ``{"type": "pong"}``.

The session id is the conversation id, so a client that reconnects with it continues the
conversation (the last ``CHATGATE_MEMORY_MAX_TURNS`` messages, 20 by default, go to the
model). Without one, the URL's ``{session_id}`` is used, or one is made for the socket and
named to the client in ``message_received`` (and every frame but the chunks).

Each message is answered with, in order: ``message_received`` → ``typing_start`` →
``message_start`` → ``message_chunk`` for each delta (``role``, ``content``,
``accumulated_content``, ``model_used``, ``timestamp``) → ``message_complete`` (the whole
``content``) → ``typing_stop``. A failure is ``{"type": "error", "content", "message",
"code", "timestamp"}`` — a sentence for the user in ``content`` and ``message`` — then
``typing_stop``. ``model_used`` names the model that answered: a fallback model
(``CHATGATE_FALLBACK_MODELS``) once it has taken over.

Inactivity cleanup: a session idle for longer than ``CHATGATE_SEQUENTIAL_SESSION_TTL_S``
(300 s, the seed's five minutes) starts afresh — the chat service clears its history
before the next message's turn (``Turn.idle_reset_s``). The check is made when the session
is used again, against the store's ``updated_at``, so it holds across reconnects and
worker processes; sessions nobody returns to are purged by the store's own expiry
(``CHATGATE_SESSION_TTL_S``).

Selected with ``?dialect=sequential`` on any path, and on ``/ws/chat`` by its first
frame's shape (``{"type": "message", …}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatgate.api.dialects.base import (
    Chat,
    Command,
    Dialect,
    Frame,
    Outgoing,
    Peer,
    Ping,
    bad,
    new_id,
    optional_str,
    register_dialect,
    text_of,
    utc_timestamp,
)
from chatgate.chat.events import ErrorCode, ErrorEvent
from chatgate.chat.generation import Generation
from chatgate.chat.service import Turn

FRIENDLY: dict[ErrorCode, str] = {
    "provider_unavailable": "The AI service is not reachable right now. Please try again in a moment.",
    "provider_error": "The AI service could not answer this time. Please try again.",
    "timeout": "The AI service took too long to answer. Please try again.",
    "not_found": "That model or assistant is not available.",
    "busy": "Still answering your previous message; please wait for it to finish.",
    "rate_limited": "You are sending messages too quickly. Please wait a moment.",
    "internal": "Something went wrong on our side. Please try again.",
}


@dataclass
class _Reply:
    """One message being answered: what the frames of its reply need to remember."""

    session_id: str
    #: The answer so far (``accumulated_content``: the protocol itself is quadratic).
    text: str = ""
    started: bool = False


@register_dialect("sequential")
class SequentialDialect(Dialect):
    def __init__(self, peer: Peer) -> None:
        super().__init__(peer)
        self.session_id = peer.path_params.get("session_id") or new_id()
        self._replies: dict[str, _Reply] = {}

    @classmethod
    def claims(cls, frame: dict[str, Any]) -> bool:
        return frame.get("type") == "message"

    async def decode(self, frame: dict[str, Any]) -> Command:
        kind = frame.get("type", "message")
        if kind == "ping":
            return Ping()
        if kind != "message":
            raise bad(f"unknown type {kind!r}; expected message or ping")
        message = text_of(frame, "content", "message")
        session_id = optional_str(frame, "session_id") or self.session_id
        self.session_id = session_id
        request_id = new_id()
        self._replies[request_id] = _Reply(session_id)
        return Chat(
            Turn(
                message=message,
                conversation_id=session_id,
                request_id=request_id,
                idle_reset_s=self.peer.gateway.settings.sequential_session_ttl_s,
            )
        )

    def encode(self, event: Outgoing, generation: Generation | None) -> list[Frame]:
        now = utc_timestamp()
        if event["type"] == "error":
            reply = self._replies.pop(event.get("id", ""), None)
            session_id = reply.session_id if reply is not None else self.session_id
            return [_error(event, now), {"type": "typing_stop", "session_id": session_id, "timestamp": now}]
        if event["type"] == "pong":
            return [{"type": "pong", "timestamp": now}]
        if event["type"] == "history_cleared" or event["type"] == "tool_call":
            return []  # its clients offer no tools
        reply = self._replies.get(event["id"])
        if reply is None or generation is None:
            return []
        if event["type"] == "start":
            return [
                {"type": "message_received", "session_id": reply.session_id, "timestamp": now},
                {"type": "typing_start", "session_id": reply.session_id, "timestamp": now},
            ]
        frames = self._begin(reply, generation, now)
        if event["type"] == "delta":
            reply.text += event["text"]
            frames.append({
                "type": "message_chunk",
                "role": "assistant",
                "content": event["text"],
                "accumulated_content": reply.text,
                "model_used": generation.model,
                "timestamp": now,
            })
            return frames
        del self._replies[event["id"]]
        frames.append({
            "type": "message_complete",
            "role": "assistant",
            "content": reply.text,
            "model_used": generation.model,
            "session_id": reply.session_id,
            "finish_reason": event["finish_reason"],
            "timestamp": now,
        })
        frames.append({"type": "typing_stop", "session_id": reply.session_id, "timestamp": now})
        return frames

    @staticmethod
    def _begin(reply: _Reply, generation: Generation, now: str) -> list[Frame]:
        """``message_start`` before the first chunk: the model that answers is known then."""
        if reply.started:
            return []
        reply.started = True
        return [{
            "type": "message_start",
            "role": "assistant",
            "session_id": reply.session_id,
            "model_used": generation.model,
            "timestamp": now,
        }]


def _error(event: ErrorEvent, now: str) -> Frame:
    code = event.get("code", "internal")
    text = FRIENDLY.get(code) or event.get("message", "error")
    return {"type": "error", "content": text, "message": text, "code": code, "timestamp": now}
