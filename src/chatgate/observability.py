"""Logging, metrics and (later) traces.

Logs are one JSON object per line when stderr is not a terminal, with the request and
conversation ids passed as ``extra``; message text and keys are never logged unless
debug is on.

Metrics are a generation observer (:mod:`chatgate.chat.lifecycle`) rather than calls
from the chat core, in a registry of each gateway's own.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from chatgate.chat.breaker import BREAKER_STATES
from chatgate.chat.events import DoneEvent, ErrorEvent
from chatgate.chat.generation import Generation
from chatgate.chat.lifecycle import GenerationObserver

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics(GenerationObserver):
    """One gateway's Prometheus metrics, served at ``/metrics``.

    The registry is the gateway's own, not the process's, so gateways sharing a process
    (the test suite's) never add to each other's counts. Generations are counted when
    they end, by outcome: their finish reason, ``cancelled``, or ``error``.
    """

    def __init__(self, provider: str) -> None:
        #: The ``provider`` label: a gateway streams from one provider.
        self.provider = provider
        self.registry = CollectorRegistry(auto_describe=True)
        self._generations = Counter(
            "chatgate_generations_total", "Generations by provider and outcome", ["provider", "outcome"],
            registry=self.registry,
        )
        self._tokens = Counter("chatgate_tokens_total", "Streamed deltas", ["provider"], registry=self.registry)
        self._embeddings = Counter(
            "chatgate_embeddings_total", "Embeddings requests by provider and outcome", ["provider", "outcome"],
            registry=self.registry,
        )
        self._ttft = Histogram(
            "chatgate_time_to_first_token_seconds", "Time from request to first token", ["provider"],
            buckets=TTFT_BUCKETS_S, registry=self.registry,
        )
        self._websockets = Gauge(
            "chatgate_websocket_connections", "Open WebSocket connections", registry=self.registry
        )
        # The provider's series, looked up once: ``labels()`` takes a lock and builds a key
        # on every call, and these move with every answer.
        self._ttft_series = self._ttft.labels(provider)
        self._tokens_series = self._tokens.labels(provider)
        self._outcomes: dict[str, Counter] = {}

    def first_token(self, generation: Generation, ttft_s: float) -> None:
        self._ttft_series.observe(ttft_s)

    def finished(self, generation: Generation, done: DoneEvent) -> None:
        self._ended(generation, done["finish_reason"])

    def cancelled(self, generation: Generation, done: DoneEvent) -> None:
        self._ended(generation, "cancelled")

    def failed(self, generation: Generation, error: ErrorEvent, exc: BaseException | None) -> None:
        self._ended(generation, "error")

    def _ended(self, generation: Generation, outcome: str) -> None:
        series = self._outcomes.get(outcome)
        if series is None:
            series = self._outcomes[outcome] = self._generations.labels(self.provider, outcome)
        series.inc()
        # Counted at the end from the generation's own count, not per token: the tokens
        # already streamed to clients, also of answers cut short or broken off.
        self._tokens_series.inc(generation.tokens)

    def embedded(self, outcome: str) -> None:
        self._embeddings.labels(self.provider, outcome).inc()

    def websocket_opened(self) -> None:
        self._websockets.inc()

    def websocket_closed(self) -> None:
        self._websockets.dec()

    def watch_breaker(self, state: Callable[[], str]) -> None:
        """Report the upstream's circuit breaker, read when scraped, as
        ``chatgate_upstream_breaker_state{provider, state}``: 1 for its state, 0 for the others."""
        self.registry.register(_BreakerCollector(self.provider, state))


class _BreakerCollector:
    def __init__(self, provider: str, state: Callable[[], str]) -> None:
        self.provider = provider
        self.state = state

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "chatgate_upstream_breaker_state", "The upstream's circuit breaker: 1 for its state",
            labels=["provider", "state"],
        )
        current = self.state()
        for name in BREAKER_STATES:
            gauge.add_metric([self.provider, name], 1.0 if name == current else 0.0)
        yield gauge

#: Record attributes that are not extras: the standard ones, and uvicorn's coloured copy of
#: its message.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "color_message",
}
#: uvicorn's own loggers. At ``info`` they say what chatgate's ready line says, and one line
#: per WebSocket accepted (time on every handshake), so below ``debug`` they log warnings
#: and errors only; at ``debug`` they log ``info`` (their ``debug`` is every frame, text
#: and all, from websockets).
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.asgi")


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # arguments that do not fit the format: still one line
        return f"{record.msg!s} {record.args!r}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except (TypeError, orjson.JSONEncodeError):  # an extra that will not encode: leave the extras out
            core = {key: data[key] for key in ("ts", "level", "logger", "msg", "exc") if key in data}
            return orjson.dumps(core, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        )
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname:<7} {record.name}: {_message(record)}"
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", *, json_logs: bool | None = None) -> None:
    """chatgate's loggers at ``level``; everything else the process logs (uvicorn, asyncio,
    libraries, :mod:`warnings`, exceptions nobody caught) through the same handler, so
    that with JSON every line on stderr is one object, a traceback inside it as ``exc``."""
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    formatter = JsonFormatter() if json_logs else TextFormatter()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    threshold: int = logging.getLevelNamesMapping()[level.upper()]
    own = logging.getLogger("chatgate")
    own.handlers[:] = [handler]
    own.setLevel(threshold)
    own.propagate = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(threshold, logging.WARNING))
    for name in SERVER_LOGGERS:
        server = logging.getLogger(name)
        server.handlers[:] = []
        server.propagate = True
        server.setLevel(logging.INFO if threshold <= logging.DEBUG else max(threshold, logging.WARNING))
    # uvicorn.access is left as uvicorn set it: without handlers and not propagating, it
    # is off (``access_log`` is False); turned on, it propagates to this handler.
    # A logger that neither has a handler nor propagates falls back to this one.
    last_resort = logging.StreamHandler(sys.stderr)
    last_resort.setLevel(logging.WARNING)
    last_resort.setFormatter(formatter)
    logging.lastResort = last_resort
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("chatgate").critical("unhandled exception", exc_info=(kind, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    logging.getLogger("chatgate").error(
        "unhandled exception in a thread",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        extra={"thread_name": args.thread.name if args.thread else None},
    )
