"""The workshop chatbot's protocol (seed ``004``): ``/ws/chat/{session_id}``.

Client: ``{"message": TEXT, "agent": NAME}``; ``agent`` ``"default"`` (or none) is
chatgate's default agent, any other name one of ``CHATGATE_AGENTS_DIR``'s.
Server: ``{"type": "chunk", "content": TEXT, "agent": NAME}`` for each delta, then
``{"type": "done", "agent": NAME}``, with ``agent`` the name the client sent;
``{"type": "error", "content": MESSAGE}`` for a refused message or a failed reply.

The URL's session id is the conversation id: each browser tab (``session_<ms>``) keeps its
own history, which a reconnect to the same URL continues. With ``?dialect=workshop`` on a
path without a session id, the socket gets one of its own.
"""

from __future__ import annotations

from typing import Any

from chatgate.api.dialects.base import (
    MAX_ID_CHARS,
    Chat,
    Command,
    Dialect,
    Frame,
    Outgoing,
    Peer,
    bad,
    new_id,
    register_dialect,
    text_of,
)
from chatgate.chat.generation import Generation
from chatgate.chat.service import Turn

DEFAULT_AGENT = "default"


@register_dialect("workshop")
class WorkshopDialect(Dialect):
    def __init__(self, peer: Peer) -> None:
        super().__init__(peer)
        self.session_id = peer.path_params.get("session_id") or new_id()
        #: The agent name each running request was sent with, by generation id.
        self._agents: dict[str, str] = {}

    async def decode(self, frame: dict[str, Any]) -> Command:
        message = text_of(frame, "message")
        agent = frame.get("agent") or DEFAULT_AGENT
        if not isinstance(agent, str) or len(agent) > MAX_ID_CHARS:
            raise bad(f"agent must be a string of at most {MAX_ID_CHARS} characters")
        request_id = new_id()
        self._agents[request_id] = agent
        return Chat(
            Turn(
                message=message,
                conversation_id=self.session_id,
                agent=None if agent == DEFAULT_AGENT else agent,
                request_id=request_id,
            )
        )

    def encode(self, event: Outgoing, generation: Generation | None) -> list[Frame]:
        if event["type"] == "delta":
            return [{"type": "chunk", "content": event["text"], "agent": self._agents.get(event["id"])}]
        if event["type"] == "done":
            return [{"type": "done", "agent": self._agents.pop(event["id"], DEFAULT_AGENT)}]
        if event["type"] == "error":
            self._agents.pop(event.get("id", ""), None)
            return [{"type": "error", "content": event.get("message", "error")}]
        return []  # start, pong and history_cleared have no workshop frame
