"""The turn machinery every dialect of the fake upstream shares: its token texts, settings,
faults, request record, and the serving of one generation request, paced and faulted.

A dialect (:class:`Dialect`) only says how its wire format spells errors, limits and the
bytes of a turn; :func:`turn_handler` makes a route of it. ``fake_llm`` mounts the Ollama and
OpenAI dialects and the control API, ``fake_gemini`` the Gemini one.

It is the baseline in relay benchmarks, so every frame of a stream is encoded once per request
(one per distinct token text) and each token is a single write of ready-made bytes. Paced
streams without a fault are sent by one :class:`_Pacer` per server rather than a timer and a
task step per token, so thousands of them cost the fake little of a shared machine.

A fault strikes when the token after its ``after`` tokens would have been due; a request for a
missing model is answered 404 without taking a fault from the queue.

A request offering tools or asking for JSON is answered with a :class:`Script` instead of the
words: the dialect's :meth:`Dialect.script` reads it (with ``fake_tools``) and says in how many
frames it spells it, and its ``frames``/``complete`` spell ``turn.script``. Those frames are
paced, faulted and counted (``tokens_sent``) as tokens are.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import orjson
from aiohttp import web

from chatgate.testing.fake_tools import FakeCall

_WORDS = (
    "Hello", "from", "the", "fake", "model", "streaming", "deterministic", "tokens",
    "one", "at", "a", "time", "for", "tests", "and", "benchmarks",
)  # fmt: skip
_LATER_TOKENS = tuple(" " + word for word in _WORDS)
TOKEN_JSON = (orjson.dumps(_WORDS[0]), *(orjson.dumps(token) for token in _LATER_TOKENS))

_MAX_RECORDS = 10_000

FaultKind = Literal["http_500", "drop", "error_line", "hang"]
FinishReason = Literal["stop", "length"]
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def fake_tokens(n: int) -> list[str]:
    """The first ``n`` token texts: a fixed list of words, cycled, space-separated."""
    return [_WORDS[0] if i == 0 else _LATER_TOKENS[i % len(_WORDS)] for i in range(n)]


def fake_reply(n: int) -> str:
    return "".join(fake_tokens(n))


def _token_frame_index(i: int) -> int:
    return 0 if i == 0 else 1 + i % len(_WORDS)


def _in_order(i: int) -> int:
    return i


@dataclass
class FakeSettings:
    tokens: int = 40
    tps: float = 0
    ttft_ms: float = 0
    models: tuple[str, ...] = ("fake-model", "fake-backup")


@dataclass(frozen=True, slots=True)
class Fault:
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
    #: The request's W3C ``traceparent`` header, when it had one (tracing tests).
    traceparent: str | None = None

    def finish(self, response: web.Response) -> web.Response:
        self.finished_at = time.monotonic()
        return response

    def mark_disconnected(self) -> None:
        if self.finished_at is None and self.disconnected_at is None:
            self.disconnected_at = time.monotonic()


@dataclass(frozen=True, slots=True)
class Script:
    """An answer that is not the fake words: tool ``calls``, else the JSON ``text``, sent in
    ``steps`` frames (how many is the dialect's: one per call, per piece, ...). The turn's
    ``count`` is ``steps``, whatever limit the request sets; its finish reason is ``stop``."""

    steps: int
    calls: tuple[FakeCall, ...] = ()
    text: str = ""


@dataclass(slots=True)
class Turn:
    """One accepted generation request, with its pacing fixed when it arrived."""

    record: _Record
    model: str
    count: int
    finish_reason: FinishReason
    prompt_tokens: int
    ttft_s: float
    interval_s: float
    fault: Fault | None
    script: Script | None = None

    @property
    def emitted(self) -> int:
        """Tokens sent before the fault strikes, or all of them."""
        return self.count if self.fault is None else min(self.fault.after, self.count)

    def due(self, i: int) -> float:
        return self.record.started_at + self.ttft_s + i * self.interval_s


@dataclass(frozen=True, slots=True)
class Frames:
    """The bytes of a streamed turn: ``head`` goes before the first token; ``tokens`` is
    the table of word frames (the first token's, then one per word) or, for a scripted
    turn, its ``steps`` frames in order."""

    content_type: str
    head: bytes
    tokens: tuple[bytes, ...]
    error: bytes
    tail: Callable[[], bytes]


class State:
    def __init__(self, settings: FakeSettings) -> None:
        self.initial = replace(settings)
        self.settings = replace(settings)
        self.faults: deque[Fault] = deque()
        self.records: deque[_Record] = deque(maxlen=_MAX_RECORDS)
        self._ids = itertools.count(1)

    def open_record(self, path: str, body: Any, started_at: float) -> _Record:
        record = _Record(id=next(self._ids), path=path, body=body, started_at=started_at)
        self.records.append(record)
        return record

    def is_missing(self, model: str) -> bool:
        return model not in self.settings.models and model.startswith("missing")

    def take_fault(self, model: str) -> Fault | None:
        for index, fault in enumerate(self.faults):
            if fault.model is None or fault.model == model:
                del self.faults[index]
                return fault
        return None

    def reset(self) -> None:
        self.records.clear()
        self.faults.clear()
        self.settings = replace(self.initial)


STATE = web.AppKey("chatgate_fake_llm_state", State)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def word_count(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(word_count(part.get("text")) for part in content if isinstance(part, dict))
    return 0


def token_limit(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


async def read_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


class Dialect(ABC):
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
    def frames(self, turn: Turn, body: dict[str, Any]) -> Frames: ...

    @abstractmethod
    def complete(self, turn: Turn, body: dict[str, Any]) -> bytes: ...

    def script(self, body: dict[str, Any]) -> Script | None:
        """The answer to give instead of the words (tool calls, JSON), or None."""
        return None

    def wants_stream(self, body: dict[str, Any]) -> bool:
        stream = body.get("stream")
        return self.stream_default if stream is None else bool(stream)

    def refusal(self, request: web.Request, body: dict[str, Any] | None) -> web.Response | None:
        """An answer refusing the request before its model is looked at (no key, bad shape)."""
        return None

    def model(self, request: web.Request, body: dict[str, Any]) -> Any:
        return body.get("model")


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

    __slots__ = ("done", "next_index", "pending_head", "pick", "tokens", "transport", "turn")

    def __init__(self, turn: Turn, frames: Frames, transport: asyncio.Transport) -> None:
        self.turn = turn
        self.tokens = frames.tokens
        self.transport = transport
        self.pending_head = frames.head
        self.pick = _token_frame_index if turn.script is None else _in_order
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
        data = self.pending_head + self.tokens[self.pick(i)]
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


async def _stream(request: web.Request, turn: Turn, frames: Frames) -> web.StreamResponse:
    record = turn.record
    response = web.StreamResponse(headers={"Content-Type": frames.content_type})
    pending_head = frames.head
    pick = _token_frame_index if turn.script is None else _in_order
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
            await response.write(pending_head + frames.tokens[pick(i)])
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
    request: web.Request, turn: Turn, dialect: Dialect, body: dict[str, Any]
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


async def _serve_turn(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    state = request.app[STATE]
    started_at = time.monotonic()
    body = await read_object(request)
    record = state.open_record(request.path, body, started_at)
    record.traceparent = request.headers.get("traceparent")
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
    script = dialect.script(body)
    if script is not None:
        count = script.steps
    elif (limit := dialect.max_tokens(body)) is not None and limit < count:
        count, finish_reason = limit, "length"
    turn = Turn(
        record=record,
        model=model,
        count=count,
        finish_reason=finish_reason,
        prompt_tokens=dialect.prompt_tokens(body),
        ttft_s=settings.ttft_ms / 1000,
        interval_s=1 / settings.tps if settings.tps > 0 else 0.0,
        fault=fault,
        script=script,
    )
    if dialect.wants_stream(body):
        return await _stream(request, turn, dialect.frames(turn, body))
    return await _complete(request, turn, dialect, body)


def turn_handler(dialect: Dialect) -> _Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await _serve_turn(request, dialect)

    return handle


def add_turn_state(app: web.Application, settings: FakeSettings) -> None:
    """Give ``app`` the state and the pacer its turn handlers read."""
    app[STATE] = State(settings)
    app[_PACER] = _Pacer()
