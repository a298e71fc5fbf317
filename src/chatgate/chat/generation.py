"""One generation's event log: written once by the chat service, read by any number of
subscribers, each from wherever it left off — the basis of reconnect-and-resume.

A subscriber either iterates :meth:`Generation.events`, or registers a callback with
:meth:`Generation.subscribe` that is told, synchronously, whenever the log has grown, and
reads what is new with :meth:`Generation.read_from` when it is ready to send it (the
WebSocket path: no task switch per token).

Tokens that arrive while the last delta is still waiting for its first reader join that
delta instead of making a new one, so a subscriber that falls behind (a busy gateway, a
slow socket) catches up in one frame rather than one frame per token, and none is ever
held back: a delta is handed out as soon as a reader asks. ``seq`` still rises by one per
delta; ``tokens`` counts what the upstream sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from chatgate.chat.events import DeltaEvent, Event, StartEvent, ToolCallEvent
from chatgate.vocabulary import ToolCall, ToolCallDelta

#: A waiting delta takes in further tokens up to this many characters.
MAX_COALESCED_CHARS = 8192
#: Told that a generation's log has grown; it reads the new events later, with read_from.
Listener = Callable[["Generation"], None]
log = logging.getLogger("chatgate.chat")


@dataclass(eq=False)
class Generation:
    id: str
    conversation_id: str
    agent: str
    model: str
    owner: str | None = None
    #: Where ``id`` is unique: the owner, or an anonymous caller's namespace.
    namespace: str = ""
    #: The conversation's key in the store (its id within the owner's namespace).
    conversation_key: str = ""
    log: list[Event] = field(default_factory=list)
    finished: bool = False
    text_parts: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    #: The task has begun :meth:`ChatService._run`; before that, a cancel is only noted.
    running: bool = False
    #: The answer is being stored: too late to cancel.
    ending: bool = False
    forgotten: bool = False
    limit_key: str = ""
    orphan_timer: asyncio.TimerHandle | None = None
    #: Tokens received, which may be more than deltas made.
    tokens: int = 0
    #: A copy of a generation another instance runs (:mod:`chatgate.chat.sharing`).
    replica: bool = False
    #: The process is stopping: the end is a retryable error, not a client's cancel.
    stopping: bool = False
    #: The tool calls so far, whole (their arguments as far as they have streamed).
    tool_calls: list[ToolCall] = field(default_factory=list)
    #: When (the service's monotonic clock) the turn was accepted, its first upstream
    #: attempt began and the upstream's first chunk arrived: where the time went.
    accepted_at: float = 0.0
    upstream_at: float | None = None
    first_chunk_at: float | None = None
    #: The trace this generation is part of (hex), when it is traced.
    trace_id: str | None = None
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)
    _ended: asyncio.Event = field(default_factory=asyncio.Event)
    _listeners: list[Listener] = field(default_factory=list)
    _seq: int = 0
    #: How many log entries some subscriber has read; later ones may still change.
    _handed: int = 0

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
        self.tokens += 1
        self.text_parts.append(text)
        if len(self.log) > self._handed:
            last = self.log[-1]
            if last["type"] == "delta" and len(last["text"]) < MAX_COALESCED_CHARS:
                last["text"] += text  # nobody has seen it yet: its readers are already woken
                return
        self._seq += 1
        event: DeltaEvent = {"type": "delta", "id": self.id, "seq": self._seq, "text": text}
        self._append(event)

    def emit_tool_call(self, piece: ToolCallDelta) -> None:
        """Log a piece of tool call ``piece.index`` (a new call when the index is new; one
        the upstream gave no id gets one, since its result must name it)."""
        self.tokens += 1
        if piece.id is None and piece.index >= len(self.tool_calls):
            piece = ToolCallDelta(piece.index, f"call_{self.id}_{piece.index}", piece.name, piece.arguments)
        self._gather(piece.index, piece.id, piece.name, piece.arguments)
        if len(self.log) > self._handed:
            last = self.log[-1]
            if (
                last["type"] == "tool_call"
                and last["index"] == piece.index
                and piece.id is None
                and piece.name is None
            ):
                last["arguments"] += piece.arguments
                return
        self._seq += 1
        event: ToolCallEvent = {
            "type": "tool_call", "id": self.id, "seq": self._seq, "index": piece.index,
            "arguments": piece.arguments,
        }
        if piece.id is not None:
            event["call_id"] = piece.id
        if piece.name is not None:
            event["name"] = piece.name
        self._append(event)

    def _gather(self, index: int, call_id: str | None, name: str | None, arguments: str) -> None:
        while len(self.tool_calls) <= index:
            self.tool_calls.append({"id": "", "name": "", "arguments": ""})
        call = self.tool_calls[index]
        if call_id:
            call["id"] = call_id
        if name:
            call["name"] = name
        call["arguments"] += arguments

    def emit(self, event: Event) -> None:
        self._append(event)

    def replay(self, event: Event) -> None:
        """Log an event exactly as the generation this one copies logged it (its deltas
        keep their seq); the terminal event ends this one too."""
        if event["type"] == "delta":
            self._seq = event["seq"]
            self.text_parts.append(event["text"])
        elif event["type"] == "tool_call":
            self._seq = event["seq"]
            self._gather(event["index"], event.get("call_id"), event.get("name"), event["arguments"])
        if event["type"] in ("done", "error"):
            self.finish(event)
        else:
            self._append(event)

    def finish(self, event: Event) -> None:
        self.finished = True
        self._append(event)
        self._listeners.clear()
        self._ended.set()

    async def wait_finished(self) -> None:
        """Return once the generation has logged its ``done`` or ``error``."""
        await self._ended.wait()

    def _append(self, event: Event) -> None:
        self.log.append(event)
        for listener in self._listeners:
            try:
                listener(self)
            except Exception:
                log.exception("a generation listener failed", extra={"request_id": self.id})
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def cancel(self) -> None:
        """Stop now: the task's cancellation closes the upstream request. A task that has
        not taken its first step yet sees the request when it does, and ends at once."""
        if (
            self.task is not None
            and not self.task.done()
            and not self.cancel_requested
            and not self.ending
        ):
            self.cancel_requested = True
            if self.running:
                self.task.cancel()

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(self)`` each time an event is logged, from the task logging it,
        until the generation ends or :meth:`unsubscribe`. It must not block."""
        if not self.finished and listener not in self._listeners:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def read_from(self, index: int) -> list[Event]:
        """The log from ``index`` on; those events are final from now on."""
        self._handed = len(self.log)
        return self.log[index:]

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
                if index > self._handed:
                    self._handed = index
                if seen_before(event, after):
                    continue
                yield event
                if event["type"] in ("done", "error"):
                    return
            if self.finished:
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


def seen_before(event: Event, after: int | None) -> bool:
    """Whether a subscriber resuming after delta ``after`` has this event already."""
    return after is not None and (
        event["type"] == "start"
        or ((event["type"] == "delta" or event["type"] == "tool_call") and event["seq"] <= after)
    )
