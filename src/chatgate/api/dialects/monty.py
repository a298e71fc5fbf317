"""The Monty gateway's protocol (seed ``000``): ``/chat/ws``, and ``/ws/chat`` when the
first frame looks like it.

Client: ``{"message": TEXT, "task_id": ID}`` — ``content`` or ``prompt`` may name the text
instead; a missing ``task_id`` is made up and echoed. Server, every event tagged with the
request's ``task_id``:

- ``{"task_id", "event_type": "content", "content": TOKEN}`` for each delta;
- ``{"task_id", "event_type": "completed", "content": ""}`` at the end. The answer has
  already arrived token by token, so ``completed`` carries no text: a client that appends
  every event's ``content`` shows the answer exactly once;
- ``{"task_id", "event_type": "error", "content": MESSAGE}`` for a refused message or a
  failed reply (after a partial answer too; the part that arrived is kept in history).

The seed kept history per connection; here each socket gets a conversation of its own.
"""

from __future__ import annotations

from typing import Any, Literal

from chatgate.api.dialects.base import (
    MAX_ID_CHARS,
    Chat,
    Command,
    Dialect,
    Frame,
    Outgoing,
    Peer,
    Reply,
    new_id,
    register_dialect,
    text_of,
)
from chatgate.chat.events import ChatError
from chatgate.chat.generation import Generation
from chatgate.chat.service import Turn

TEXT_KEYS = ("message", "content", "prompt")
TaskId = str | int | float | None
EventType = Literal["content", "completed", "error"]


@register_dialect("monty")
class MontyDialect(Dialect):
    def __init__(self, peer: Peer) -> None:
        super().__init__(peer)
        self.conversation_id = new_id()
        #: The client's task_id of each running request, by generation id.
        self._task_ids: dict[str, TaskId] = {}

    @classmethod
    def claims(cls, frame: dict[str, Any]) -> bool:
        return any(key in frame for key in TEXT_KEYS)

    async def decode(self, frame: dict[str, Any]) -> Command:
        task_id = frame.get("task_id")
        if not _valid_task_id(task_id):
            return Reply([_event(None, "error", "task_id must be a string or a number")])
        if task_id is None:
            task_id = new_id()
        try:
            message = text_of(frame, *TEXT_KEYS)
        except ChatError:
            return Reply([_event(task_id, "error", "message must be a non-empty string")])
        request_id = new_id()
        self._task_ids[request_id] = task_id
        return Chat(Turn(message=message, conversation_id=self.conversation_id, request_id=request_id))

    def encode(self, event: Outgoing, generation: Generation | None) -> list[Frame]:
        if event["type"] == "delta":
            return [_event(self._task_ids.get(event["id"]), "content", event["text"])]
        if event["type"] == "done":
            return [_event(self._task_ids.pop(event["id"], None), "completed", "")]
        if event["type"] == "error":
            request_id = event.get("id")
            task_id = self._task_ids.pop(request_id, None) if request_id is not None else None
            return [_event(task_id, "error", event.get("message", "error"))]
        return []  # start, pong and history_cleared have no Monty frame


def _valid_task_id(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return False
    return len(str(value)) <= MAX_ID_CHARS


def _event(task_id: TaskId, event_type: EventType, content: str) -> Frame:
    return {"task_id": task_id, "event_type": event_type, "content": content}
