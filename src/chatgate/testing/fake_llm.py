"""A deterministic fake LLM upstream speaking Ollama's and OpenAI's streaming wire formats,
and Gemini's (its dialect lives in ``fake_gemini.py`` and is mounted here).

Tests, demos and benchmarks point providers at it over loopback. Besides the model routes it
serves a control API under ``/_fake/``: change pacing, queue faults, read back a timed record
of every chat request and reset. Times are ``time.monotonic()`` values, which on Linux are
CLOCK_MONOTONIC and so comparable across processes.

It is the baseline in relay benchmarks, so every frame of a stream is encoded once per request
(one per distinct token text) and each token is a single write of ready-made bytes. Paced
streams without a fault are sent by one :class:`_Pacer` per server rather than a timer and a
task step per token, so thousands of them cost the fake little of a shared machine.

A fault strikes when the token after its ``after`` tokens would have been due; a request for a
missing model is answered 404 without taking a fault from the queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import signal
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal, get_args

import orjson
from aiohttp import web

_WORDS = (
    "Hello", "from", "the", "fake", "model", "streaming", "deterministic", "tokens",
    "one", "at", "a", "time", "for", "tests", "and", "benchmarks",
)  # fmt: skip
_LATER_TOKENS = tuple(" " + word for word in _WORDS)
_TOKEN_JSON = (orjson.dumps(_WORDS[0]), *(orjson.dumps(token) for token in _LATER_TOKENS))

_MAX_RECORDS = 10_000
_SHUTDOWN_TIMEOUT_S = 0.25
#: Pending connections the listening socket holds: a gateway opening thousands of upstream
#: streams at once must not have its connections dropped (the default is 128).
_BACKLOG = 4096
_MAX_BODY_BYTES = 64 * 1024 * 1024
_MODIFIED_AT = "2025-01-01T00:00:00Z"
_MODEL_DETAILS = {
    "parent_model": "",
    "format": "gguf",
    "family": "fake",
    "families": ["fake"],
    "parameter_size": "1M",
    "quantization_level": "Q8_0",
}

FaultKind = Literal["http_500", "drop", "error_line", "hang"]
FinishReason = Literal["stop", "length"]
_FAULT_KINDS: dict[str, FaultKind] = {kind: kind for kind in get_args(FaultKind)}
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def fake_tokens(n: int) -> list[str]:
    """The first ``n`` token texts: a fixed list of words, cycled, space-separated."""
    return [_WORDS[0] if i == 0 else _LATER_TOKENS[i % len(_WORDS)] for i in range(n)]


def fake_reply(n: int) -> str:
    return "".join(fake_tokens(n))


def _token_frame_index(i: int) -> int:
    return 0 if i == 0 else 1 + i % len(_WORDS)


@dataclass
class FakeSettings:
    tokens: int = 40
    tps: float = 0
    ttft_ms: float = 0
    models: tuple[str, ...] = ("fake-model", "fake-backup")


@dataclass(frozen=True, slots=True)
class _Fault:
    kind: FaultKind
    after: int = 0
    model: str | None = None


@dataclass(slots=True)
class _Record:
    id: int
    path: str
    body: Any
    started_at: float
    first_token_at: float | None = None
    finished_at: float | None = None
    disconnected_at: float | None = None
    tokens_sent: int = 0
    fault: FaultKind | None = None
    completed: bool = False

    def finish(self, response: web.Response) -> web.Response:
        self.finished_at = time.monotonic()
        return response

    def mark_disconnected(self) -> None:
        if self.finished_at is None and self.disconnected_at is None:
            self.disconnected_at = time.monotonic()


@dataclass(slots=True)
class _Turn:
    """One accepted generation request, with its pacing fixed when it arrived."""

    record: _Record
    model: str
    count: int
    finish_reason: FinishReason
    prompt_tokens: int
    ttft_s: float
    interval_s: float
    fault: _Fault | None

    @property
    def emitted(self) -> int:
        """Tokens sent before the fault strikes, or all of them."""
        return self.count if self.fault is None else min(self.fault.after, self.count)

    def due(self, i: int) -> float:
        return self.record.started_at + self.ttft_s + i * self.interval_s


@dataclass(frozen=True, slots=True)
class _Frames:
    content_type: str
    head: bytes
    tokens: tuple[bytes, ...]
    error: bytes
    tail: Callable[[], bytes]


class _State:
    def __init__(self, settings: FakeSettings) -> None:
        self.initial = replace(settings)
        self.settings = replace(settings)
        self.faults: deque[_Fault] = deque()
        self.records: deque[_Record] = deque(maxlen=_MAX_RECORDS)
        self._ids = itertools.count(1)

    def open_record(self, path: str, body: Any, started_at: float) -> _Record:
        record = _Record(id=next(self._ids), path=path, body=body, started_at=started_at)
        self.records.append(record)
        return record

    def is_missing(self, model: str) -> bool:
        return model not in self.settings.models and model.startswith("missing")

    def take_fault(self, model: str) -> _Fault | None:
        for index, fault in enumerate(self.faults):
            if fault.model is None or fault.model == model:
                del self.faults[index]
                return fault
        return None

    def reset(self) -> None:
        self.records.clear()
        self.faults.clear()
        self.settings = replace(self.initial)


_STATE = web.AppKey("chatgate_fake_llm_state", _State)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=orjson.dumps({"error": message}).decode(), content_type="application/json"
    )


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float) -> int:
    return max(1, int(seconds * 1e9))


def _words(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(_words(part.get("text")) for part in content if isinstance(part, dict))
    return 0


def _message_words(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(_words(message.get("content")) for message in messages if isinstance(message, dict))


def _token_limit(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


async def _read_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


class _Dialect(ABC):
    """One wire format: its error bodies, how it asks for limits, and the bytes of a turn."""

    stream_default: bool

    @abstractmethod
    def error(self, status: int, message: str) -> web.Response: ...

    @abstractmethod
    def not_found(self, model: str) -> web.Response: ...

    @abstractmethod
    def max_tokens(self, body: dict[str, Any]) -> int | None: ...

    @abstractmethod
    def prompt_tokens(self, body: dict[str, Any]) -> int: ...

    @abstractmethod
    def frames(self, turn: _Turn, body: dict[str, Any]) -> _Frames: ...

    @abstractmethod
    def complete(self, turn: _Turn, body: dict[str, Any]) -> bytes: ...

    def wants_stream(self, body: dict[str, Any]) -> bool:
        stream = body.get("stream")
        return self.stream_default if stream is None else bool(stream)

    def refusal(self, request: web.Request, body: dict[str, Any] | None) -> web.Response | None:
        """An answer refusing the request before its model is looked at (no key, bad shape)."""
        return None

    def model(self, request: web.Request, body: dict[str, Any]) -> Any:
        return body.get("model")


class _Ollama(_Dialect):
    stream_default = True

    @abstractmethod
    def _content_field(self, text_json: bytes) -> bytes: ...

    @abstractmethod
    def _content_object(self, text: str) -> dict[str, Any]: ...

    def error(self, status: int, message: str) -> web.Response:
        return _json({"error": message}, status)

    def not_found(self, model: str) -> web.Response:
        return self.error(404, f'model "{model}" not found, try pulling it first')

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        options = body.get("options")
        return _token_limit(options.get("num_predict")) if isinstance(options, dict) else None

    def frames(self, turn: _Turn, body: dict[str, Any]) -> _Frames:
        head = (
            b'{"model":' + orjson.dumps(turn.model)
            + b',"created_at":' + orjson.dumps(_now_iso()) + b","
        )  # fmt: skip
        return _Frames(
            content_type="application/x-ndjson",
            head=b"",
            tokens=tuple(
                head + self._content_field(text) + b',"done":false}\n' for text in _TOKEN_JSON
            ),
            error=b'{"error":"injected stream error"}\n',
            tail=lambda: orjson.dumps(self._final(turn, "")) + b"\n",
        )

    def complete(self, turn: _Turn, body: dict[str, Any]) -> bytes:
        return orjson.dumps(self._final(turn, fake_reply(turn.record.tokens_sent)))

    def _final(self, turn: _Turn, text: str) -> dict[str, Any]:
        elapsed = time.monotonic() - turn.record.started_at
        prompt_eval = min(turn.ttft_s, elapsed)
        return {
            "model": turn.model,
            "created_at": _now_iso(),
            **self._content_object(text),
            "done": True,
            "done_reason": turn.finish_reason,
            "total_duration": _ns(elapsed),
            "load_duration": 0,
            "prompt_eval_count": turn.prompt_tokens,
            "prompt_eval_duration": _ns(prompt_eval),
            "eval_count": turn.record.tokens_sent,
            "eval_duration": _ns(elapsed - prompt_eval),
        }


class _OllamaChat(_Ollama):
    def _content_field(self, text_json: bytes) -> bytes:
        return b'"message":{"role":"assistant","content":' + text_json + b"}"

    def _content_object(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        return _message_words(body)


class _OllamaGenerate(_Ollama):
    def _content_field(self, text_json: bytes) -> bytes:
        return b'"response":' + text_json

    def _content_object(self, text: str) -> dict[str, Any]:
        return {"response": text}

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        return _words(body.get("prompt")) + _words(body.get("system"))


class _OpenAIChat(_Dialect):
    stream_default = False

    def error(self, status: int, message: str) -> web.Response:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return _json(
            {"error": {"message": message, "type": kind, "param": None, "code": None}}, status
        )

    def not_found(self, model: str) -> web.Response:
        message = f"The model `{model}` does not exist or you do not have access to it."
        error = {
            "message": message,
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
        return _json({"error": error}, 404)

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        limit = _token_limit(body.get("max_completion_tokens"))
        return _token_limit(body.get("max_tokens")) if limit is None else limit

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        return _message_words(body)

    def frames(self, turn: _Turn, body: dict[str, Any]) -> _Frames:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        envelope = self._envelope(turn)
        prefix = b"data: " + orjson.dumps(envelope)[:-1] + b',"choices":[{"index":0,"delta":'
        close = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        suffix = b',"logprobs":null,"finish_reason":null}]' + close

        def tail() -> bytes:
            reason = orjson.dumps(turn.finish_reason)
            last = prefix + b'{},"logprobs":null,"finish_reason":' + reason + b"}]" + close
            if include_usage:
                usage = {**envelope, "choices": [], "usage": self._usage(turn)}
                last += b"data: " + orjson.dumps(usage) + b"\n\n"
            return last + b"data: [DONE]\n\n"

        return _Frames(
            content_type="text/event-stream",
            head=prefix + b'{"role":"assistant","content":""}' + suffix,
            tokens=tuple(prefix + b'{"content":' + text + b"}" + suffix for text in _TOKEN_JSON),
            error=b'data: {"error":{"message":"injected stream error","type":"server_error"}}\n\n',
            tail=tail,
        )

    def complete(self, turn: _Turn, body: dict[str, Any]) -> bytes:
        choice = {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": fake_reply(turn.record.tokens_sent),
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": turn.finish_reason,
        }
        envelope = {**self._envelope(turn), "object": "chat.completion"}
        return orjson.dumps({**envelope, "choices": [choice], "usage": self._usage(turn)})

    @staticmethod
    def _envelope(turn: _Turn) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-fake-{turn.record.id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": turn.model,
            "system_fingerprint": "fp_fake",
        }

    @staticmethod
    def _usage(turn: _Turn) -> dict[str, int]:
        completion = turn.record.tokens_sent
        return {
            "prompt_tokens": turn.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": turn.prompt_tokens + completion,
        }


async def _wait_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _drop(request: web.Request) -> None:
    """End the connection without a final chunk; the tokens already written still arrive."""
    if request.transport is not None:
        request.transport.close()


async def _until_cancelled() -> None:
    await asyncio.get_running_loop().create_future()


class _PacedStream:
    """One stream's remaining tokens, written straight to its transport as HTTP chunks."""

    __slots__ = ("done", "frames", "next_index", "pending_head", "transport", "turn")

    def __init__(self, turn: _Turn, frames: _Frames, transport: asyncio.Transport) -> None:
        self.turn = turn
        self.frames = frames
        self.transport = transport
        self.pending_head = frames.head
        self.next_index = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def send_next(self) -> float | None:
        """Write the due token; the next one's due time, or ``None`` when all are sent."""
        if self.done.done():
            return None
        if self.transport.is_closing():
            self.done.set_exception(ConnectionResetError("the client went away"))
            return None
        i = self.next_index
        data = self.pending_head + self.frames.tokens[_token_frame_index(i)]
        self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        self.pending_head = b""
        record = self.turn.record
        record.tokens_sent = self.next_index = i + 1
        if i == 0:
            record.first_token_at = time.monotonic()
        if self.next_index < self.turn.emitted:
            return self.turn.due(self.next_index)
        self.done.set_result(None)
        return None


class _Pacer:
    """Writes every paced stream's tokens from one timer, all those due within the same
    millisecond in one pass."""

    TICK_S = 0.001

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _PacedStream]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = float("inf")

    def add(self, stream: _PacedStream) -> None:
        self._push(stream.turn.due(0), stream)
        self._arm()

    def _push(self, due: float, stream: _PacedStream) -> None:
        heapq.heappush(self._heap, (due, next(self._order), stream))

    def _arm(self) -> None:
        if not self._heap or self._heap[0][0] >= self._timer_due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = self._heap[0][0]
        delay = max(0.0, self._timer_due - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._send_due)

    def _send_due(self) -> None:
        self._timer, self._timer_due = None, float("inf")
        horizon = time.monotonic() + self.TICK_S
        heap = self._heap
        while heap and heap[0][0] <= horizon:
            _, _, stream = heapq.heappop(heap)
            due = stream.send_next()
            if due is not None:
                self._push(due, stream)
        self._arm()


_PACER = web.AppKey("chatgate_fake_llm_pacer", _Pacer)


async def _stream(request: web.Request, turn: _Turn, frames: _Frames) -> web.StreamResponse:
    record = turn.record
    response = web.StreamResponse(headers={"Content-Type": frames.content_type})
    pending_head = frames.head
    try:
        await response.prepare(request)
        transport = request.transport
        chunked = response.headers.get("Transfer-Encoding") == "chunked"
        if turn.fault is None and turn.interval_s > 0 and chunked and transport is not None:
            paced = _PacedStream(turn, frames, transport)
            request.app[_PACER].add(paced)
            await paced.done
            await response.write(frames.tail())
            record.finished_at = time.monotonic()
            record.completed = True
            await response.write_eof()
            return response
        for i in range(turn.emitted):
            await _wait_until(turn.due(i))
            await response.write(pending_head + frames.tokens[_token_frame_index(i)])
            pending_head = b""
            record.tokens_sent = i + 1
            if i == 0:
                record.first_token_at = time.monotonic()
        if turn.fault is None:
            await _wait_until(turn.due(0))
            await response.write(pending_head + frames.tail())
            record.finished_at = time.monotonic()
            record.completed = True
            await response.write_eof()
            return response
        await _wait_until(turn.due(turn.emitted))
        if turn.fault.kind == "error_line":
            await response.write(frames.error)
            record.finished_at = time.monotonic()
            await response.write_eof()
        elif turn.fault.kind == "drop":
            record.finished_at = time.monotonic()
            _drop(request)
        else:
            await _until_cancelled()
    except asyncio.CancelledError:
        record.mark_disconnected()
        raise
    except ConnectionResetError:
        record.mark_disconnected()
    return response


async def _complete(
    request: web.Request, turn: _Turn, dialect: _Dialect, body: dict[str, Any]
) -> web.StreamResponse:
    record = turn.record
    try:
        if turn.fault is None:
            await _wait_until(turn.due(max(turn.count - 1, 0)))
            record.tokens_sent = turn.count
            response = web.Response(
                body=dialect.complete(turn, body), content_type="application/json"
            )
            await response.prepare(request)
            await response.write_eof()
            record.first_token_at = record.finished_at = time.monotonic()
            record.completed = True
            return response
        await _wait_until(turn.due(turn.emitted))
        if turn.fault.kind == "error_line":
            return record.finish(dialect.error(500, "injected stream error"))
        if turn.fault.kind == "drop":
            record.finished_at = time.monotonic()
            _drop(request)
        else:
            await _until_cancelled()
    except asyncio.CancelledError:
        record.mark_disconnected()
        raise
    except ConnectionResetError:
        record.mark_disconnected()
    return web.Response()


async def _serve_turn(request: web.Request, dialect: _Dialect) -> web.StreamResponse:
    state = request.app[_STATE]
    started_at = time.monotonic()
    body = await _read_object(request)
    record = state.open_record(request.path, body, started_at)
    refusal = dialect.refusal(request, body)
    if refusal is not None:
        return record.finish(refusal)
    if body is None:
        return record.finish(dialect.error(400, "request body must be a JSON object"))
    model = dialect.model(request, body)
    if not isinstance(model, str) or not model:
        return record.finish(dialect.error(400, "model is required"))
    if state.is_missing(model):
        return record.finish(dialect.not_found(model))
    fault = state.take_fault(model)
    if fault is not None:
        record.fault = fault.kind
        if fault.kind == "http_500":
            return record.finish(dialect.error(500, "injected failure"))
    settings = state.settings
    count = settings.tokens
    finish_reason: FinishReason = "stop"
    limit = dialect.max_tokens(body)
    if limit is not None and limit < count:
        count, finish_reason = limit, "length"
    turn = _Turn(
        record=record,
        model=model,
        count=count,
        finish_reason=finish_reason,
        prompt_tokens=dialect.prompt_tokens(body),
        ttft_s=settings.ttft_ms / 1000,
        interval_s=1 / settings.tps if settings.tps > 0 else 0.0,
        fault=fault,
    )
    if dialect.wants_stream(body):
        return await _stream(request, turn, dialect.frames(turn, body))
    return await _complete(request, turn, dialect, body)


def _turn_handler(dialect: _Dialect) -> _Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await _serve_turn(request, dialect)

    return handle


def _ollama_tag(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": _MODIFIED_AT,
        "size": 1_048_576,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": _MODEL_DETAILS,
    }


async def _ollama_root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def _ollama_version(request: web.Request) -> web.Response:
    return _json({"version": "0.6.0"})


async def _ollama_tags(request: web.Request) -> web.Response:
    return _json({"models": [_ollama_tag(name) for name in request.app[_STATE].settings.models]})


async def _ollama_show(request: web.Request) -> web.Response:
    body = await _read_object(request) or {}
    name = body.get("model") or body.get("name")
    if not isinstance(name, str):
        return _json({"error": "model is required"}, 400)
    if request.app[_STATE].is_missing(name):
        return _OllamaChat().not_found(name)
    return _json(
        {
            "modelfile": f"FROM {name}\n",
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": _MODEL_DETAILS,
            "model_info": {
                "general.architecture": "fake",
                "general.parameter_count": 1_000_000,
                "fake.context_length": 8192,
            },
            "capabilities": ["completion"],
            "modified_at": _MODIFIED_AT,
        }
    )


async def _openai_models(request: web.Request) -> web.Response:
    models = request.app[_STATE].settings.models
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "fake"} for name in models]
    return _json({"object": "list", "data": data})


def _non_negative_int(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad_request(f"{key} must be a non-negative integer")
    return value


def _non_negative_number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _bad_request(f"{key} must be a non-negative number")
    return float(value)


async def _configure(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    body = await _read_object(request)
    if body is None:
        raise _bad_request("request body must be a JSON object")
    if unknown := body.keys() - {"tokens", "tps", "ttft_ms"}:
        raise _bad_request(f"unknown settings: {sorted(unknown)}")
    current = state.settings
    state.settings = replace(
        current,
        tokens=_non_negative_int(body, "tokens", current.tokens),
        tps=_non_negative_number(body, "tps", current.tps),
        ttft_ms=_non_negative_number(body, "ttft_ms", current.ttft_ms),
    )
    return _json(state.settings)


def _parse_fault(item: Any) -> _Fault:
    if not isinstance(item, dict):
        raise _bad_request("each fault must be a JSON object")
    if unknown := item.keys() - {"kind", "after", "model"}:
        raise _bad_request(f"unknown fault fields: {sorted(unknown)}")
    kind = _FAULT_KINDS.get(item.get("kind", ""))
    if kind is None:
        raise _bad_request(f"fault kind must be one of {sorted(_FAULT_KINDS)}")
    model = item.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad_request("fault model must be a string")
    return _Fault(kind=kind, after=_non_negative_int(item, "after", 0), model=model)


async def _queue_faults(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    body = await _read_object(request)
    items = body.get("faults") if body is not None else None
    if not isinstance(items, list):
        raise _bad_request('expected {"faults": [...]}')
    state.faults.extend([_parse_fault(item) for item in items])
    return _json({"queued": len(state.faults)})


async def _list_requests(request: web.Request) -> web.Response:
    return _json({"requests": list(request.app[_STATE].records)})


async def _reset(request: web.Request) -> web.Response:
    request.app[_STATE].reset()
    return _json({"reset": True})


def create_app(settings: FakeSettings) -> web.Application:
    """The fake's routes; serve it with ``handler_cancellation=True`` as `start_fake_llm` does.

    A handler learns that its client went away only by being cancelled, so without that
    option a ``hang`` fault lasts until shutdown and ``disconnected_at`` stays null.
    """
    app = web.Application(client_max_size=_MAX_BODY_BYTES)
    app[_STATE] = _State(settings)
    app[_PACER] = _Pacer()
    app.router.add_get("/", _ollama_root)
    app.router.add_get("/api/version", _ollama_version)
    app.router.add_get("/api/tags", _ollama_tags)
    app.router.add_post("/api/show", _ollama_show)
    app.router.add_post("/api/chat", _turn_handler(_OllamaChat()))
    app.router.add_post("/api/generate", _turn_handler(_OllamaGenerate()))
    app.router.add_get("/v1/models", _openai_models)
    app.router.add_post("/v1/chat/completions", _turn_handler(_OpenAIChat()))
    from chatgate.testing.fake_gemini import add_gemini_routes  # it builds on this module

    add_gemini_routes(app)
    app.router.add_post("/_fake/config", _configure)
    app.router.add_post("/_fake/faults", _queue_faults)
    app.router.add_get("/_fake/requests", _list_requests)
    app.router.add_post("/_fake/reset", _reset)
    return app


class FakeServer:
    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_fake_llm(
    host: str = "127.0.0.1", port: int = 0, settings: FakeSettings | None = None
) -> FakeServer:
    """Serve the fake on ``host:port`` (0 picks a free port) until ``close()``.

    Handlers are cancelled as soon as their client disconnects, which is what timestamps
    ``disconnected_at`` precisely.
    """
    runner = web.AppRunner(
        create_app(settings or FakeSettings()),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=_BACKLOG).start()
    except BaseException:
        await runner.cleanup()
        raise
    return FakeServer(runner, host, int(runner.addresses[0][1]))


async def _serve_until_signalled(host: str, port: int, settings: FakeSettings) -> None:
    server = await start_fake_llm(host, port, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        print(f"fake-llm listening on {server.url}", flush=True)
        await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await server.close()


def run_fake_llm(
    host: str = "127.0.0.1", port: int = 0, settings: FakeSettings | None = None
) -> None:
    """Serve in the foreground until SIGINT or SIGTERM (on uvloop when it is installed)."""
    main = _serve_until_signalled(host, port, settings or FakeSettings())
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
