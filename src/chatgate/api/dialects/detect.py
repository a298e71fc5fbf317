"""Paths that several seeds' clients share: the first frame's shape picks the dialect.

``/ws/chat`` is the Monty gateway's alias, CS_Agent's endpoint and where the
sequential-thinking client connects: a frame with ``messages`` (or ``type``
``clear_history``) is CS_Agent's, one with ``type`` ``message`` is the sequential client's,
one with ``message``, ``content`` or ``prompt`` is Monty's. A ``ping`` decides nothing and
is answered with CS_Agent's ``{"type": "pong"}``; until a frame has decided,
errors carry every candidate's fields at once (``{"type": "error", "error",
"task_id", "event_type", "content"}``), so whichever client it is understands them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatgate.api.dialects.base import (
    Command,
    Dialect,
    DialectFactory,
    Frame,
    Outgoing,
    Peer,
    Ping,
    bad,
    dialect_named,
)
from chatgate.chat.generation import Generation


class FirstFrameDialect(Dialect):
    name = "first-frame"

    def __init__(self, peer: Peer, candidates: Sequence[type[Dialect]]) -> None:
        super().__init__(peer)
        self.candidates = [cls(peer) for cls in candidates]
        self.chosen: Dialect | None = None

    def max_frame_bytes(self) -> int:
        if self.chosen is not None:
            return self.chosen.max_frame_bytes()
        return max(candidate.max_frame_bytes() for candidate in self.candidates)

    async def decode(self, frame: dict[str, Any]) -> Command:
        if self.chosen is None:
            if frame.get("type") == "ping":
                return Ping()  # every candidate has one
            self.chosen = next((c for c in self.candidates if c.claims(frame)), None)
            if self.chosen is None:
                names = " or ".join(c.name for c in self.candidates)
                raise bad(f"cannot tell which client this is ({names}) from the frame's fields")
        return await self.chosen.decode(frame)

    def encode(self, event: Outgoing, generation: Generation | None) -> list[Frame]:
        if self.chosen is not None:
            return self.chosen.encode(event, generation)
        if event["type"] == "pong":  # the shape of the first candidate that has one
            return next((f for c in self.candidates if (f := c.encode(event, generation))), [])
        merged: dict[str, Any] = {}
        for candidate in reversed(self.candidates):
            for frame in candidate.encode(event, generation):
                merged.update(frame)
        return [merged] if merged else []


def first_frame(*names: str) -> DialectFactory:
    """A factory choosing among the dialects ``names``, in that order of precedence."""
    candidates = [dialect_named(name) for name in names]

    def make(peer: Peer) -> Dialect:
        return FirstFrameDialect(peer, candidates)

    return make
