"""CS_Agent's protocol (seed ``001``): ``/ws/chat`` when the first frame looks like it.

Client frames:

- ``{"messages": [{"role", "content"}, …], "model"?}`` — the last message is the user's new
  one. A single message continues the socket's conversation from server memory; a longer
  list is the client's own history for that turn, used instead of the stored window (only
  the new message and its answer are stored, so nothing is stored twice).
- ``{"type": "ping"}`` → ``{"type": "pong"}``; ``{"type": "clear_history"}`` →
  ``{"type": "history_cleared"}``.

Server frames: ``{"type": "delta", "text"}``, ``{"type": "done"}``,
``{"type": "error", "error": MESSAGE}``.

``MAX_MESSAGE_SIZE`` (``CHATGATE_MAX_MESSAGE_BYTES``) bounds the new message, as in every
dialect; a frame may be larger by the history it carries, as a stateless HTTP client's body may.
"""

from __future__ import annotations

from typing import Any, cast, get_args

from chatgate.api.dialects.base import (
    Chat,
    ClearHistory,
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
)
from chatgate.chat.agents import check_client_system
from chatgate.chat.generation import Generation
from chatgate.chat.service import Turn
from chatgate.vocabulary import Message, Role

ROLES: frozenset[str] = frozenset(get_args(Role))


@register_dialect("cs_agent")
class CsAgentDialect(Dialect):
    def __init__(self, peer: Peer) -> None:
        super().__init__(peer)
        self.conversation_id = new_id()

    @classmethod
    def claims(cls, frame: dict[str, Any]) -> bool:
        return "messages" in frame or frame.get("type") == "clear_history"

    def max_frame_bytes(self) -> int:
        return self.peer.limits.history_bytes

    async def decode(self, frame: dict[str, Any]) -> Command:
        kind = frame.get("type")
        if kind == "ping":
            return Ping()
        if kind == "clear_history":
            return ClearHistory(self.conversation_id)
        if kind is not None:
            raise bad(f"unknown type {kind!r}; expected ping, clear_history or a messages frame")
        messages = _messages(frame.get("messages"))
        history = messages[:-1]
        # A system message here replaces the agent's prompt: only where the agent allows it.
        check_client_system(self.peer.gateway.agents.get(None), history)
        return Chat(
            Turn(
                message=messages[-1]["content"],
                conversation_id=self.conversation_id,
                model=optional_str(frame, "model"),
                history=history or None,
                apply_agent_prompt=not any(m["role"] == "system" for m in history),
            )
        )

    def encode(self, event: Outgoing, generation: Generation | None) -> list[Frame]:
        if event["type"] == "delta":
            return [{"type": "delta", "text": event["text"]}]
        if event["type"] == "done":
            return [{"type": "done"}]
        if event["type"] == "error":
            return [{"type": "error", "error": event.get("message", "error")}]
        if event["type"] == "pong":
            return [{"type": "pong"}]
        if event["type"] == "history_cleared":
            return [{"type": "history_cleared"}]
        return []  # start


def _messages(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty list of {role, content} objects")
    messages: list[Message] = []
    for index, item in enumerate(value):
        role = item.get("role") if isinstance(item, dict) else None
        content = item.get("content") if isinstance(item, dict) else None
        # A role that is not a string (a dict, a list) cannot even be looked up in ROLES.
        if not isinstance(role, str) or role not in ROLES or not isinstance(content, str):
            raise bad(f"messages[{index}] must be {{role: system|user|assistant, content: string}}")
        messages.append({"role": cast(Role, role), "content": content})
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise bad("the last message must be a non-empty user message")
    return messages
