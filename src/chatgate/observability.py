"""Logging, metrics and (later) traces.

Logs are one JSON object per line when stderr is not a terminal, with the request and
conversation ids passed as ``extra``; message text and keys are never logged unless
debug is on.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
GENERATIONS = Counter(
    "chatgate_generations_total", "Generations by provider and outcome", ["provider", "outcome"],
    registry=REGISTRY,
)
TOKENS = Counter("chatgate_tokens_total", "Streamed deltas", ["provider"], registry=REGISTRY)
TTFT = Histogram(
    "chatgate_time_to_first_token_seconds", "Time from request to first token", ["provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
REQUESTS = Counter(
    "chatgate_http_requests_total", "HTTP requests by route and status", ["route", "status"],
    registry=REGISTRY,
)
WS_CONNECTIONS = Gauge("chatgate_websocket_connections", "Open WebSocket connections", registry=REGISTRY)

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
