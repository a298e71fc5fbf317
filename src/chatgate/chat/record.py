"""One turn written to the store while it happens, so that a process killed mid-answer
(``kill -9``, out of memory, a power cut) loses at most the last moment of it: the user's
message is stored when the turn starts, the answer so far at most every ``interval_s``
while it streams (a checkpoint, marked partial), and the answer when it ends.

The writes run beside the stream, never in its way: the upstream request does not wait
for the user's message to be stored, a checkpoint is skipped while the previous write is
still on its way, and only the end waits for the writes before it. A store that fails
costs the turn its record (logged once), not its answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from chatgate.chat.generation import Generation
from chatgate.store.base import ConversationStore, StoredMessage

log = logging.getLogger("chatgate.chat")


def turn_id(namespace: str, generation_id: str) -> str:
    """The store's name for the turn a generation answers."""
    return f"{namespace}/{generation_id}"


class TurnRecord:
    def __init__(
        self,
        store: ConversationStore,
        generation: Generation,
        *,
        owner: str | None,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._generation = generation
        self._key = generation.conversation_key
        self._turn = turn_id(generation.namespace, generation.id)
        self._owner = owner
        self._interval_s = interval_s
        self._clock = clock
        self._due = clock() + interval_s
        self._writing: asyncio.Task[None] | None = None
        self._failed = False

    def begin(self, message: StoredMessage) -> None:
        """Store what the turn adds before its answer (the user's message, or tool results)."""
        self._start(
            self._store.begin_turn(self._key, self._turn, message, owner=self._owner, agent=self._generation.agent)
        )

    def progress(self) -> None:
        """Called as tokens arrive: checkpoint the answer when one is due."""
        now = self._clock()
        if now < self._due or (self._writing is not None and not self._writing.done()):
            return
        self._due = now + self._interval_s
        self._start(self._store.checkpoint(self._key, self._turn, self._generation.text))

    async def end(self, answer: StoredMessage | None) -> None:
        """Close the turn with ``answer``, or take it back (``None``: nothing answered)."""
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
        await self._store.end_turn(self._key, self._turn, answer)

    def _start(self, write: Coroutine[Any, Any, None]) -> None:
        self._writing = asyncio.create_task(self._quietly(write))

    async def _quietly(self, write: Coroutine[Any, Any, None]) -> None:
        try:
            await write
        except Exception as exc:
            if not self._failed:
                log.warning(
                    "could not record the turn as it happens: %s", exc,
                    extra={"request_id": self._generation.id},
                )
            self._failed = True
