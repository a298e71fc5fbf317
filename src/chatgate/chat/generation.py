"""One generation's event log: written once by the chat service, read by any number of
subscribers, each from wherever it left off — the basis of reconnect-and-resume."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from chatgate.chat.events import DeltaEvent, Event, StartEvent


@dataclass(eq=False)
class Generation:
    id: str
    conversation_id: str
    agent: str
    model: str
    owner: str | None = None
    log: list[Event] = field(default_factory=list)
    finished: bool = False
    text_parts: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    forgotten: bool = False
    limit_key: str = ""
    orphan_timer: asyncio.TimerHandle | None = None
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)
    _seq: int = 0

    @property
    def seq(self) -> int:
        """The seq of the last delta so far."""
        return self._seq

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def start_event(self) -> StartEvent:
        return {
            "type": "start",
            "id": self.id,
            "conversation_id": self.conversation_id,
            "model": self.model,
            "agent": self.agent,
        }

    def emit_delta(self, text: str) -> None:
        self._seq += 1
        self.text_parts.append(text)
        event: DeltaEvent = {"type": "delta", "id": self.id, "seq": self._seq, "text": text}
        self._append(event)

    def emit(self, event: Event) -> None:
        self._append(event)

    def finish(self, event: Event) -> None:
        self.finished = True
        self._append(event)

    def _append(self, event: Event) -> None:
        self.log.append(event)
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def cancel(self) -> None:
        """Stop now: the task's cancellation closes the upstream request."""
        if self.task is not None and not self.task.done() and not self.cancel_requested:
            self.cancel_requested = True
            self.task.cancel()

    async def events(self, after: int | None = None) -> AsyncIterator[Event]:
        """Every event in order, then live ones until the generation ends.

        With ``after`` (a delta seq), skip the start event and deltas up to that seq.
        A subscriber only ever costs a future while it waits; all deltas that are already
        waiting are handed out without yielding to the loop in between.
        """
        index = 0
        while True:
            while index < len(self.log):
                event = self.log[index]
                index += 1
                if after is not None and (
                    event["type"] == "start" or (event["type"] == "delta" and event["seq"] <= after)
                ):
                    continue
                yield event
                if event["type"] in ("done", "error"):
                    return
            if self.finished:
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
