"""One log line per turn, when it ends: who answered, how fast, how much, and how it ended.

The line is ``turn`` on the ``chatgate.turns`` logger at ``info``, with the fields
``request_id`` (the generation's id), ``conversation_id``, ``agent``, ``model`` (the one that
answered), ``ttft_ms`` (null when no token came), ``duration_ms``, ``input_tokens``,
``output_tokens``, ``outcome`` (the finish reason — ``stop``, ``length``, ``tool_calls``,
``cancelled`` — or ``error``, then with ``error_code``) and ``trace_id`` when the turn is
traced. Never message text, tool arguments or keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from chatgate.chat.events import DoneEvent, ErrorEvent
from chatgate.chat.generation import Generation
from chatgate.chat.lifecycle import GenerationObserver

log = logging.getLogger("chatgate.turns")


class TurnLog(GenerationObserver):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        #: The chat service's clock: the generation's times are read against it.
        self._clock = clock

    def finished(self, generation: Generation, done: DoneEvent) -> None:
        self._log(generation, done["finish_reason"], done)

    def cancelled(self, generation: Generation, done: DoneEvent) -> None:
        self._log(generation, "cancelled", done)

    def failed(self, generation: Generation, error: ErrorEvent, exc: BaseException | None) -> None:
        self._log(generation, "error", None, error)

    def _log(
        self, generation: Generation, outcome: str, done: DoneEvent | None, error: ErrorEvent | None = None
    ) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        fields: dict[str, Any] = {
            "request_id": generation.id,
            "conversation_id": generation.conversation_id,
            "agent": generation.agent,
            "model": generation.model,
            "ttft_ms": _ttft_ms(generation, done),
            "duration_ms": round((self._clock() - generation.accepted_at) * 1000, 3) if generation.accepted_at else None,
            "input_tokens": done["usage"]["prompt_tokens"] if done else None,
            "output_tokens": done["usage"]["completion_tokens"] if done else generation.tokens,
            "outcome": outcome,
            "trace_id": generation.trace_id,
        }
        if error is not None:
            fields["error_code"] = error.get("code")
        log.info("turn", extra=fields)


def _ttft_ms(generation: Generation, done: DoneEvent | None) -> float | None:
    if done is not None:
        return done["timings"]["ttft_ms"]
    if generation.first_chunk_at is not None and generation.upstream_at is not None:
        return round((generation.first_chunk_at - generation.upstream_at) * 1000, 3)
    return None
