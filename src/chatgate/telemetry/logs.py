"""Logging: one JSON object per line when stderr is not a terminal, with the request and
conversation ids passed as ``extra``; message text and keys are never logged unless debug
is on."""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import TracebackType
from typing import Any

import orjson

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
