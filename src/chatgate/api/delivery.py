"""Delivering generations to one client: the runner every protocol shares.

A :class:`Follower` follows one or more generations for one client. A generation tells
it, synchronously, when its log grows (:meth:`Generation.subscribe`); the follower then
flushes once, on the event loop's next turn, handing each new event to the protocol's
``deliver`` function, which encodes it (a codec: a WebSocket dialect, SSE, plain text,
OpenAI chunks, Ollama lines) and writes the result to the client's :class:`Outbox`.
There is no task switch per token, and tokens that arrived in the meantime have joined
one delta.

The :class:`Outbox` hands each ASGI message to the server at once while the client keeps
up. A message that cannot be written at once (the client reads slowly) waits in order,
drained by one task; meanwhile the follower holds back, so the tokens pile up in the
generation's log as fewer, larger deltas rather than as buffered frames. A client that
takes no message for ``SEND_TIMEOUT_S``, or has more than ``MAX_QUEUED_BYTES`` waiting
(replies to a client that keeps sending but never reads), is given up (``on_stuck``): the
same rule for WebSockets and HTTP streams. The server holds the same timeout on the socket
itself (:mod:`chatgate.guard`): a connection whose buffers stay full that long is reset.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from starlette.types import Message, Send

from chatgate.chat.events import Event
from chatgate.chat.generation import Generation, seen_before

log = logging.getLogger("chatgate.delivery")

#: A client that accepts nothing for this long is given up, not buffered for.
SEND_TIMEOUT_S = 10.0
#: What may wait for a slow client besides the socket's buffers (the tokens of the answers
#: it follows wait in their logs instead).
MAX_QUEUED_BYTES = 1 << 20
_MESSAGE_BYTES = 256
#: The ASGI scope extension through which a server that offers it takes WebSocket text
#: frames synchronously (:class:`chatgate.guard.GuardedWebSocketProtocol`): called with the
#: frame's UTF-8 payload, it writes the frame and returns ``True``, or writes nothing and
#: returns ``False`` when the frame must wait (the socket's buffers are full, or it is closing).
TEXT_FRAMES = "chatgate.text_frames"
#: Writes one event of ``generation`` to the client, encoded in its protocol.
Deliver = Callable[[Event, Generation], None]


class Outbox:
    """One client's outgoing ASGI messages, in order, with one bound on waiting."""

    def __init__(
        self,
        send: Send,
        *,
        text_frames: Callable[[bytes], bool] | None = None,
        on_drained: Callable[[], None] | None = None,
        on_stuck: Callable[[], None] | None = None,
    ) -> None:
        self._send = send
        self._text_frames = text_frames
        self._on_drained = on_drained
        self._on_stuck = on_stuck
        self._queue: deque[Message] | None = None  # made when a client first falls behind
        self._queued_bytes = 0
        self._drainer: asyncio.Task[None] | None = None
        self.broken = False

    @property
    def waiting(self) -> bool:
        """Whether the client is behind: a write is still in progress."""
        return self._drainer is not None

    def write(self, message: Message) -> None:
        """Hand ``message`` to the server now if nothing is queued before it.

        The server's ``send`` is a coroutine that, while the socket accepts data, writes
        and returns without ever waiting; it is run here up to its first wait, and only if
        it does wait (the client is slow) does a task take over, finishing it and then
        draining the queue."""
        if self.broken:
            return
        if self._drainer is not None:
            self._queued_bytes += _size(message)
            if self._queued_bytes > MAX_QUEUED_BYTES:
                self._give_up()
            else:
                if self._queue is None:
                    self._queue = deque()
                self._queue.append(message)
            return
        sending = self._send(message)
        rest: Awaitable[None] = sending
        if isinstance(sending, Coroutine):
            try:
                waiting_on = sending.send(None)
            except StopIteration:
                return
            except OSError:
                self.broken = True
                return
            rest = _finish(sending, waiting_on)
        self._drainer = asyncio.create_task(self._drain(rest))

    def write_text(self, payload: bytes) -> None:
        """A WebSocket text frame of ``payload`` (UTF-8): written by the server at once when
        it offers :data:`TEXT_FRAMES` and nothing waits before it, else as :meth:`write`."""
        if self._text_frames is not None and self._drainer is None and not self.broken:
            if self._text_frames(payload):
                return
        self.write({"type": "websocket.send", "text": payload.decode()})

    async def _drain(self, first: Awaitable[None]) -> None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await first
            while self._queue and not self.broken:
                message = self._queue.popleft()
                self._queued_bytes -= _size(message)
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await self._send(message)
        except TimeoutError:
            self._give_up()
            return
        except OSError:
            self.broken = True
            self._queue = None
            return
        finally:
            self._drainer = None
        if self._on_drained is not None and not self.broken:
            self._on_drained()

    def _give_up(self) -> None:
        if self.broken:
            return
        self.broken = True
        self._queue = None
        self._queued_bytes = 0
        if self._on_stuck is not None:
            self._on_stuck()

    def close(self) -> None:
        self.broken = True
        self._queue = None
        if self._drainer is not None:
            self._drainer.cancel()
        # The callbacks usually lead back to whoever owns this outbox: dropping them lets
        # reference counting free both, instead of leaving the cycle collector a cycle
        # per connection or response.
        self._on_drained = self._on_stuck = None
        self._text_frames = None


@dataclass(slots=True, eq=False)
class _Following:
    """How far the client has read one generation's log, and what it had already."""

    generation: Generation
    index: int = 0
    after: int | None = None


class Follower:
    """Follows generations to one client, flushing their new events through ``deliver``.

    A WebSocket follows several generations at once and flushes from a callback on the
    loop's next turn. An HTTP response follows one and flushes from its own task with
    :meth:`run`: the task was going to wake for the response anyway, and measured faster
    that way than a callback followed by a wake-up at the end (bench/CHANGES.md)."""

    def __init__(self, outbox: Outbox, deliver: Deliver) -> None:
        self.outbox = outbox
        self._deliver = deliver
        self._following: dict[Generation, _Following] = {}
        self._ready: dict[Generation, _Following] = {}
        self._flush_scheduled = False
        #: :meth:`run` flushes from its task; ``_waiter`` is set while it waits.
        self._running = False
        self._finished = False
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()  # kept: each get_running_loop() calls getpid()

    async def run(self) -> None:
        """Flush from this task whenever something is ready, until :meth:`finish`."""
        self._running = True
        try:
            while not self._finished:
                if self._ready and not self.outbox.waiting:
                    self._flush()
                    continue
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            self._running = False

    def finish(self) -> None:
        """Let :meth:`run` return."""
        self._finished = True
        self._wake()

    def follow(self, generation: Generation, *, index: int = 0, after: int | None = None) -> None:
        """Deliver ``generation``'s log from ``index`` on, skipping what a client resuming
        after delta ``after`` already has; following it again replays it that way."""
        following = _Following(generation, index=index, after=after)
        self._following[generation] = following
        self._ready.pop(generation, None)
        generation.subscribe(self._grown)
        self._grown(generation)

    def stop(self) -> list[Generation]:
        """Follow nothing more; returns the generations that are still running."""
        running = []
        for generation in self._following:
            generation.unsubscribe(self._grown)
            if not generation.finished:
                running.append(generation)
        self._following.clear()
        self._ready.clear()
        self._deliver = _deliver_nothing  # as for the outbox's callbacks: no cycle left
        return running

    def resume(self) -> None:
        """The outbox has caught up: deliver what the generations logged meanwhile."""
        if self._ready:
            self._wake()

    def _grown(self, generation: Generation) -> None:
        following = self._following.get(generation)
        if following is None:
            return
        self._ready[generation] = following
        self._wake()

    def _wake(self) -> None:
        if self._running:
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.outbox.waiting:
            return  # a slow client: its tokens wait in the logs, joining fewer, larger deltas
        ready, self._ready = self._ready, {}
        for following in ready.values():
            generation = following.generation
            events = generation.read_from(following.index)
            following.index += len(events)
            for event in events:
                if seen_before(event, following.after):
                    continue
                try:
                    self._deliver(event, generation)
                except Exception:
                    log.exception("delivering an event failed", extra={"request_id": generation.id})
                if event["type"] in ("done", "error"):
                    generation.unsubscribe(self._grown)
                    self._following.pop(generation, None)


def _size(message: Message) -> int:
    """About the memory ``message`` takes: its payload (a text frame's characters, for
    speed) and the message itself, a dict and a string of a few hundred bytes."""
    return _MESSAGE_BYTES + len(message.get("body") or message.get("text") or message.get("bytes") or b"")


def _deliver_nothing(event: Event, generation: Generation) -> None:
    """What a stopped follower delivers."""


def _settle(done: asyncio.Future[None], _: object) -> None:
    if not done.done():
        done.set_result(None)


async def _finish(coroutine: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    """Run a coroutine that was started by hand and is now waiting on ``waiting_on`` (what
    its first ``send(None)`` returned) to its end, as a task would have."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            if waiting_on is None:  # a bare yield: let the loop run once
                await asyncio.sleep(0)
            else:
                # Yielded to us as to a task, which takes it by clearing this flag (asyncio's
                # protocol between futures and tasks) and waits for it to be done; then the
                # coroutine is resumed and reads the outcome itself. Waiting through a future
                # of our own also serves servers whose awaitables are not asyncio futures.
                waiting_on._asyncio_future_blocking = False
                done = loop.create_future()
                waiting_on.add_done_callback(functools.partial(_settle, done))
                try:
                    await done
                except BaseException:
                    waiting_on.cancel()
                    raise
        except BaseException as exc:  # passed into the coroutine, as a task would
            try:
                waiting_on = coroutine.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waiting_on = coroutine.send(None)
        except StopIteration:
            return
