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
import time
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    def websocket_opened(self) -> None:
        self._websockets.inc()

    def websocket_closed(self) -> None:
        self._websockets.dec()

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        )
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", *, json_logs: bool | None = None) -> None:
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else TextFormatter())
    root = logging.getLogger("chatgate")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
