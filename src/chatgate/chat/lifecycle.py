"""Lifecycle hooks on generations, for what watches them from outside the chat core:
metrics, traces, the per-turn log line, Datadog.

:class:`ChatService` tells each :class:`GenerationObserver` it was given when a
generation starts, when its first token and (for observers that ask) each token
arrives, and how it ended — exactly one of ``finished``, ``failed`` or ``cancelled``
per started generation, also when the process is shutting down. The end hooks run
after the turn is stored and just before the terminal event is logged, so a client
that has seen a generation end also finds it in the metrics.

Before the first token an upstream attempt may fail and be tried again (``retried``) or
the next fallback model tried (``fell_back``). An observer that sets
``provides_context`` is asked for the context the generation's task runs in
(``task_context``), so that what it makes current there (a span) is current while the
upstream is called.

Hooks run synchronously on the generation's task: they must be cheap and must not
block. One that raises is logged and skipped; it never breaks the generation or keeps
the other observers from being told.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Sequence

from chatgate.chat.events import DoneEvent, ErrorEvent
from chatgate.chat.generation import Generation
from chatgate.providers.base import ProviderError, ProviderRequest

log = logging.getLogger("chatgate.chat")


class GenerationObserver:
    """Told about every generation of a :class:`ChatService`; override the hooks you need.

    Every hook does nothing here, so an observer only writes what it watches.
    """

    #: Whether :meth:`token` is called. Per-token calls sit on the hot path, so the
    #: service skips them altogether unless some observer sets this.
    wants_tokens: bool = False
    #: Whether :meth:`task_context` is called.
    provides_context: bool = False

    def task_context(
        self, generation: Generation, request: ProviderRequest, context: contextvars.Context
    ) -> contextvars.Context:
        """The context the generation's task is to run in, given ``context`` (a copy of the
        caller's, or what an earlier observer returned). Called just before the task is
        created, after :meth:`started`; only when :attr:`provides_context` is set."""
        return context

    def started(self, generation: Generation) -> None:
        """The turn was accepted: its ``start`` event is logged and its task created."""

    def first_token(self, generation: Generation, ttft_s: float) -> None:
        """The first text arrived from the upstream, ``ttft_s`` seconds after the
        generation began streaming (the ``timings.ttft_ms`` of its ``done``). Called just
        before that text is logged, and before :meth:`token` for it."""

    def token(self, generation: Generation, text: str) -> None:
        """A token from the upstream is logged (``generation.tokens`` already counts it).
        Only called when :attr:`wants_tokens` is set."""

    def finished(self, generation: Generation, done: DoneEvent) -> None:
        """The answer is complete (any finish reason but ``cancelled``)."""

    def failed(self, generation: Generation, error: ErrorEvent, exc: BaseException | None) -> None:
        """It ended in ``error``: the upstream failed (before or after the first token),
        the service crashed, or the process is shutting down. ``exc`` is what was raised;
        ``None`` when the generation was stopped before its task ran at all."""

    def cancelled(self, generation: Generation, done: DoneEvent) -> None:
        """A client cancelled it (or cleared its conversation, or it lost its socket and
        nobody resumed it); ``done`` has ``finish_reason`` ``cancelled``."""

    def retried(self, generation: Generation, model: str, attempt: int, exc: ProviderError) -> None:
        """Attempt ``attempt`` (1, 2…) of ``model`` failed before its first token with
        ``exc``, and will be tried again after a backoff."""

    def fell_back(self, generation: Generation, failed: str, model: str, exc: ProviderError) -> None:
        """Model ``failed`` gave up with ``exc`` before its first token; fallback ``model``
        is tried next."""

    def embedded(self, outcome: str) -> None:
        """An embeddings request ended: ``ok``, or the native error code it failed with.
        Not a generation: embeddings are answered whole, with no log or events."""


class Observers:
    """The observers of one service, each hook called on all of them in order."""

    def __init__(self, observers: Sequence[GenerationObserver] = ()) -> None:
        self._all = tuple(observers)
        self._token_observers = tuple(observer for observer in self._all if observer.wants_tokens)
        self._context_observers = tuple(observer for observer in self._all if observer.provides_context)
        #: Whether any observer gives the generation's task its context.
        self.provides_context = bool(self._context_observers)
        #: Checked by the service once per generation, so that without such observers
        #: no token costs more than that one test.
        self.wants_tokens = bool(self._token_observers)

    def started(self, generation: Generation) -> None:
        for observer in self._all:
            try:
                observer.started(generation)
            except Exception:
                _report(observer, "started", generation)

    def task_context(self, generation: Generation, request: ProviderRequest) -> contextvars.Context:
        context = contextvars.copy_context()
        for observer in self._context_observers:
            try:
                context = observer.task_context(generation, request, context)
            except Exception:
                _report(observer, "task_context", generation)
        return context

    def retried(self, generation: Generation, model: str, attempt: int, exc: ProviderError) -> None:
        for observer in self._all:
            try:
                observer.retried(generation, model, attempt, exc)
            except Exception:
                _report(observer, "retried", generation)

    def fell_back(self, generation: Generation, failed: str, model: str, exc: ProviderError) -> None:
        for observer in self._all:
            try:
                observer.fell_back(generation, failed, model, exc)
            except Exception:
                _report(observer, "fell_back", generation)

    def first_token(self, generation: Generation, ttft_s: float) -> None:
        for observer in self._all:
            try:
                observer.first_token(generation, ttft_s)
            except Exception:
                _report(observer, "first_token", generation)

    def token(self, generation: Generation, text: str) -> None:
        for observer in self._token_observers:
            try:
                observer.token(generation, text)
            except Exception:
                _report(observer, "token", generation)

    def ended(self, generation: Generation, end: DoneEvent | ErrorEvent, exc: BaseException | None) -> None:
        """Tell each observer how ``generation`` ended, by its terminal event."""
        if end["type"] == "error":
            hook = "failed"
        else:
            hook = "cancelled" if end["finish_reason"] == "cancelled" else "finished"
        for observer in self._all:
            try:
                if end["type"] == "error":
                    observer.failed(generation, end, exc)
                elif hook == "cancelled":
                    observer.cancelled(generation, end)
                else:
                    observer.finished(generation, end)
            except Exception:
                _report(observer, hook, generation)

    def embedded(self, outcome: str) -> None:
        for observer in self._all:
            try:
                observer.embedded(outcome)
            except Exception:
                log.exception("a generation observer failed", extra={"observer": type(observer).__name__})


def _report(observer: GenerationObserver, hook: str, generation: Generation) -> None:
    log.exception(
        "a generation observer failed",
        extra={"request_id": generation.id, "observer": type(observer).__name__, "hook": hook},
    )
