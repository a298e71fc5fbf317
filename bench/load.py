"""One load-generator process of the chatgate benchmark (aiohttp client, uvloop if present).

``run.py`` starts one or more of these so the client has its own processes. They talk in
JSON lines: stdin carries the job, then ``go <t0>``, and in idle mode later ``release``;
stdout carries ``{"ready": true}``, in idle mode ``{"opened": …}``, and last the result.
All times are ``time.monotonic()`` (CLOCK_MONOTONIC on Linux, shared by every process), so
``t0`` and the measurement window mean the same instant here and in the orchestrator.

Modes:
- ``answers``: ``concurrency`` clients in a closed loop for warm-up + duration; per answer the
  request time, every token's arrival and the completion; ws opens a new connection per answer.
- ``idle``: open ``connections`` WebSockets to ``/ws``, hold them until ``release``.
- ``streams``: ``streams`` concurrent answers started evenly over ``stagger_s``; token gaps,
  also by when they ended (``SLOT_S`` slots after t0), with when the last stream's first token
  and the first stream's last token came, so the orchestrator can keep the gaps of the time
  every stream of every load process was open.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from stats import Histogram, gaps

JSON_HEADERS = {"Content-Type": "application/json"}
PROMPT = "hi"
ERROR_PAUSE_S = 0.01
CLEANUP_S = 5.0
#: Stream gaps are reported per slot of this many seconds after t0.
SLOT_S = 0.25


class AnswerError(Exception):
    pass


@dataclass(slots=True)
class Answer:
    started: float
    arrivals: list[float] = field(default_factory=list)
    connect_s: float | None = None
    done: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Job:
    mode: str
    protocol: str
    url: str
    model: str = "fake-model"
    tokens: int = 40
    concurrency: int = 1
    warmup_s: float = 1.0
    duration_s: float = 10.0
    answer_timeout_s: float = 30.0
    max_answers: int = 1_000_000
    connections: int = 0
    connect_parallel: int = 100
    hold_s: float = 120.0
    streams: int = 0
    stagger_s: float = 1.0
    #: streams over ws: one new connection at a time (handshake only) every
    #: ``probe_every_s`` from ``probe_from_s`` to ``probe_until_s`` after t0, while the
    #: streams are held: how long a user opening the page on the busy server waits.
    probe_every_s: float = 0.0
    probe_from_s: float = 0.0
    probe_until_s: float = 0.0

    def body(self) -> bytes:
        if self.protocol == "text":
            return orjson.dumps({"message": PROMPT, "stream": True})
        if self.protocol == "ws":
            return orjson.dumps({"type": "chat", "message": PROMPT})
        messages = [{"role": "user", "content": PROMPT}]
        return orjson.dumps({"model": self.model, "messages": messages, "stream": True})


Reader = Callable[[aiohttp.ClientSession, Job, bytes, Answer], Awaitable[None]]


async def _expect_ok(response: aiohttp.ClientResponse) -> None:
    if response.status != 200:
        detail = (await response.read())[:120].decode("utf-8", "replace")
        raise AnswerError(f"HTTP {response.status}: {detail}")


def arrived(answer: Answer, text: str | bytes, now: float) -> None:
    """Record the tokens in one piece of text. The gateway joins tokens that were already
    waiting into one frame; the fake's tokens are "Hello" then " word", so a piece holds as
    many tokens as spaces, plus one for the very first."""
    spaces = text.count(" ") if isinstance(text, str) else text.count(b" ")
    answer.arrivals.extend([now] * (spaces + (not answer.arrivals)))


async def read_text(session: aiohttp.ClientSession, job: Job, body: bytes, answer: Answer) -> None:
    """``POST /chat`` text chunks."""
    answer.started = time.monotonic()
    async with session.post(job.url, data=body, headers=JSON_HEADERS) as response:
        await _expect_ok(response)
        async for chunk in response.content.iter_any():
            arrived(answer, chunk, time.monotonic())


async def read_ollama(session: aiohttp.ClientSession, job: Job, body: bytes, answer: Answer) -> None:
    """Ollama ``/api/chat`` NDJSON, from the fake or the gateway: lines of content (the fake's
    hold one token each; the gateway's may join several), then a ``done`` line."""
    answer.started = time.monotonic()
    async with session.post(job.url, data=body, headers=JSON_HEADERS) as response:
        await _expect_ok(response)
        async for line in response.content:
            now = time.monotonic()
            if not line.strip():
                continue
            data = orjson.loads(line)
            if "error" in data:
                raise AnswerError(f"upstream error line: {data['error']}"[:200])
            if data.get("done"):
                return
            content = (data.get("message") or {}).get("content")
            if content:
                arrived(answer, content, now)
    raise AnswerError("stream ended without a done line")


async def read_sse(session: aiohttp.ClientSession, job: Job, body: bytes, answer: Answer) -> None:
    """OpenAI chat-completions SSE: ``data: {chunk}`` lines, then ``data: [DONE]``."""
    answer.started = time.monotonic()
    headers = {**JSON_HEADERS, "Accept": "text/event-stream"}
    async with session.post(job.url, data=body, headers=headers) as response:
        await _expect_ok(response)
        async for line in response.content:
            now = time.monotonic()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            data = orjson.loads(payload)
            if "error" in data:
                raise AnswerError(f"error chunk: {data['error']}"[:200])
            choices = data.get("choices") or [{}]
            content = (choices[0].get("delta") or {}).get("content")
            if content:
                arrived(answer, content, now)
    raise AnswerError("stream ended without data: [DONE]")


class WsAnswer(asyncio.Protocol):
    """A native ``/ws`` answer on a new connection, spoken by hand: the load process should
    spend as little of the shared machine as it can, and a WebSocket client library spends
    several times what parsing these small unmasked frames takes. Handshake, one masked chat
    frame, then start/delta.../done; pings are answered, anything else is an error."""

    def __init__(self, host: str, path: str, body: bytes, answer: Answer, *, connect_only: bool = False) -> None:
        self.connect_only = connect_only
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}"
                        "\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        self.body = body
        self.answer = answer
        self.opening = time.monotonic()
        self.buffer = b""
        self.upgraded = False
        self.transport: asyncio.Transport | None = None
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.finished.done():
            return
        self.buffer += data
        if not self.upgraded:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                status = head.partition(b"\r\n")[0].decode(errors="replace")
                self._fail(f"handshake refused: {status}")
                return
            self.upgraded, self.buffer = True, rest
            now = time.monotonic()
            self.answer.connect_s = now - self.opening
            self.answer.started = now
            if self.connect_only:
                self._send(0x8, (1000).to_bytes(2))
                self.finished.set_result(None)
                assert self.transport is not None
                self.transport.close()
                return
            self._send(0x1, self.body)
        self._read_frames()

    def _read_frames(self) -> None:
        buffer, at = self.buffer, 0
        while len(buffer) - at >= 2:
            opcode, length, start = buffer[at] & 0x0F, buffer[at + 1] & 0x7F, at + 2
            if length == 126:
                length, start = int.from_bytes(buffer[start:start + 2]), start + 2
            elif length == 127:
                length, start = int.from_bytes(buffer[start:start + 8]), start + 8
            if len(buffer) < start + length:
                break
            payload, at = buffer[start:start + length], start + length
            if opcode == 0x1:
                self._event(payload)
            elif opcode == 0x9:
                self._send(0xA, payload)
            elif opcode == 0x8:
                self._fail(f"socket closed before done (code {int.from_bytes(payload[:2]) if payload else '-'})")
            if self.finished.done():
                return
        self.buffer = buffer[at:]

    def _event(self, payload: bytes) -> None:
        event = orjson.loads(payload)
        kind = event.get("type")
        if kind == "delta":
            arrived(self.answer, event["text"], time.monotonic())
        elif kind == "done":
            self._send(0x8, (1000).to_bytes(2))
            self.finished.set_result(None)
            assert self.transport is not None
            self.transport.close()
        elif kind == "error":
            self._fail(f"error frame: {event.get('code')}: {event.get('message')}"[:200])

    def _send(self, opcode: int, payload: bytes) -> None:
        """A client frame: always masked (RFC 6455 5.3), here with a random key per frame."""
        mask = os.urandom(4)
        size = len(payload)
        header = bytes([0x80 | opcode]) + (bytes([0x80 | size]) if size < 126 else bytes([0xFE]) + size.to_bytes(2))
        masked = (int.from_bytes(payload) ^ int.from_bytes((mask * (size // 4 + 1))[:size])).to_bytes(size)
        assert self.transport is not None
        self.transport.write(header + mask + masked)

    def _fail(self, reason: str) -> None:
        if not self.finished.done():
            self.finished.set_exception(AnswerError(reason))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"socket ended before done ({exc or 'closed'})")


async def read_ws(session: aiohttp.ClientSession, job: Job, body: bytes, answer: Answer) -> None:
    """Native ``/ws`` on a new connection: chat frame, then start, deltas, done. TTFT counts
    from the chat frame; the handshake is kept apart as ``connect_s``."""
    url = urlsplit(job.url)
    loop = asyncio.get_running_loop()
    protocol = WsAnswer(url.netloc, url.path or "/", body, answer)
    transport, _ = await loop.create_connection(lambda: protocol, url.hostname or "127.0.0.1", url.port or 80)
    try:
        await protocol.finished
    finally:
        transport.close()


READERS: dict[str, Reader] = {"text": read_text, "ollama": read_ollama, "sse": read_sse, "ws": read_ws}


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


async def one_answer(session: aiohttp.ClientSession, job: Job, body: bytes, answer: Answer) -> None:
    try:
        async with asyncio.timeout(job.answer_timeout_s):
            await READERS[job.protocol](session, job, body, answer)
        if len(answer.arrivals) != job.tokens:
            raise AnswerError(f"expected {job.tokens} tokens, got {len(answer.arrivals)}")
    except TimeoutError:
        answer.error = f"timed out after {job.answer_timeout_s:.0f} s {_stage(job, answer)}"
    except (AnswerError, aiohttp.ClientError, OSError, ValueError) as exc:
        answer.error = describe(exc)
    answer.done = time.monotonic()


def _stage(job: Job, answer: Answer) -> str:
    if job.protocol == "ws" and answer.connect_s is None:
        return "opening the WebSocket"
    if not answer.arrivals:
        return "waiting for the first token"
    return f"mid-answer, after ~{round(10 * len(answer.arrivals) / max(job.tokens, 1)) * 10} % of the tokens"


@contextlib.asynccontextmanager
async def bounded_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A pooled session whose closing cannot hold the result back for long."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    session = aiohttp.ClientSession(connector=connector, timeout=timeout)
    try:
        yield session
    finally:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLEANUP_S):
                await session.close()


async def _until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


async def _finish(tasks: list[asyncio.Task[None]], deadline: float) -> None:
    """Let tasks run until ``deadline``, then cancel what is left (bounded wait)."""
    if tasks:
        await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=CLEANUP_S)


def summarise(answers: list[Answer], start: float, end: float) -> dict[str, Any]:
    def inside(t: float | None) -> bool:
        return t is not None and start <= t <= end

    finished = [a for a in answers if inside(a.done)]
    ok = [a for a in finished if a.error is None]
    gap_histogram = Histogram()
    for answer in ok:
        gap_histogram.add_all(gaps(answer.arrivals))
    return {
        "completed": len(ok),
        "errors": len(finished) - len(ok),
        "error_samples": dict(Counter(a.error for a in finished if a.error).most_common(5)),
        "ttft_ms": [round((a.arrivals[0] - a.started) * 1000, 4) for a in ok],
        "connect_ms": [round(a.connect_s * 1000, 4) for a in finished if a.connect_s is not None],
        "gaps": gap_histogram.to_json(),
        "tokens": sum(1 for a in answers for t in a.arrivals if start <= t <= end),
    }


async def run_answers(job: Job, t0: float) -> dict[str, Any]:
    window_start = t0 + job.warmup_s
    end = window_start + job.duration_s
    body = job.body()
    answers: list[Answer] = []
    async with bounded_session() as session:

        async def client() -> None:
            while time.monotonic() < end and len(answers) < job.max_answers:
                answer = Answer(started=time.monotonic())
                answers.append(answer)
                await one_answer(session, job, body, answer)
                if answer.error is not None:
                    await asyncio.sleep(ERROR_PAUSE_S)

        await _until(t0)
        cpu = time.process_time()
        await _finish([asyncio.create_task(client()) for _ in range(job.concurrency)], end)
        client_cpu_s = time.process_time() - cpu
    return {**summarise(answers, window_start, end), "client_cpu_s": client_cpu_s, "wall_s": end - t0}


async def run_streams(job: Job, t0: float) -> dict[str, Any]:
    body = job.body()
    answers: list[Answer] = []
    async with bounded_session() as session:

        async def stream(index: int) -> None:
            await _until(t0 + index * job.stagger_s / job.streams)
            answer = Answer(started=time.monotonic())
            answers.append(answer)
            await one_answer(session, job, body, answer)

        tasks = [asyncio.create_task(stream(i)) for i in range(job.streams)]
        probes: list[Answer] = []
        if job.probe_every_s and job.protocol == "ws":
            tasks.append(asyncio.create_task(_probe_connects(job, t0, probes)))
        cpu = time.process_time()
        await _finish(tasks, t0 + job.stagger_s + job.answer_timeout_s + 1)
        client_cpu_s = time.process_time() - cpu
        wall_s = time.monotonic() - t0
    summary = summarise(answers, t0, float("inf"))
    summary["ttft_ms"] = sorted(summary["ttft_ms"])[:: max(1, len(summary["ttft_ms"]) // 1000)]
    # Gaps by when they ended, so that only those while every stream was open can be kept.
    slots: dict[int, Histogram] = {}
    firsts, lasts = [], []
    for answer in answers:
        if answer.error is None and answer.done is not None and answer.arrivals:
            arrivals = answer.arrivals
            firsts.append(arrivals[0] - t0)
            lasts.append(arrivals[-1] - t0)
            for earlier, later in itertools.pairwise(arrivals):
                slots.setdefault(int((later - t0) / SLOT_S), Histogram()).add(later - earlier)
    held = {"slot_s": SLOT_S, "gap_slots": {str(k): h.to_json() for k, h in sorted(slots.items())},
            "last_first_token_s": max(firsts, default=None), "first_last_token_s": min(lasts, default=None)}
    held["held_connect_ms"] = [round(a.connect_s * 1000, 4) for a in probes if a.connect_s is not None]
    held["held_connect_errors"] = sum(1 for a in probes if a.error is not None)
    return {**summary, **held, "client_cpu_s": client_cpu_s, "wall_s": wall_s}


async def _probe_connects(job: Job, t0: float, probes: list[Answer]) -> None:
    """Open one ``/ws`` at a time, handshake only, every ``probe_every_s`` in the probe window."""
    url = urlsplit(job.url)
    loop = asyncio.get_running_loop()
    next_at = t0 + job.probe_from_s
    while next_at < t0 + job.probe_until_s:
        await _until(next_at)
        next_at += job.probe_every_s
        probe = Answer(started=time.monotonic())
        probes.append(probe)
        protocol = WsAnswer(url.netloc, url.path or "/", b"", probe, connect_only=True)
        try:
            async with asyncio.timeout(job.answer_timeout_s):
                transport, _ = await loop.create_connection(
                    lambda bound=protocol: bound, url.hostname or "127.0.0.1", url.port or 80)
                try:
                    await protocol.finished
                finally:
                    transport.close()
        except (TimeoutError, AnswerError, OSError) as exc:
            probe.error = describe(exc)


async def run_idle(job: Job, t0: float) -> dict[str, Any]:
    limit = asyncio.Semaphore(job.connect_parallel)
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    failures: Counter[str] = Counter()
    dropped = 0

    async def hold(ws: aiohttp.ClientWebSocketResponse) -> None:
        nonlocal dropped
        # Receiving answers the server's pings; returning early means the server hung up.
        await ws.receive()
        dropped += 1

    async def open_one() -> None:
        async with limit:
            try:
                async with asyncio.timeout(15):
                    ws = await session.ws_connect(job.url, compress=0, autoping=True)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                failures[describe(exc)] += 1
                return
            sockets.append(ws)
            holders.append(asyncio.create_task(hold(ws)))

    holders: list[asyncio.Task[None]] = []
    async with bounded_session() as session:
        await _until(t0)
        started = time.monotonic()
        await asyncio.gather(*(open_one() for _ in range(job.connections)))
        _emit({"opened": len(sockets), "failed": sum(failures.values()),
               "open_s": time.monotonic() - started})
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(job.hold_s):
                await loop.run_in_executor(None, sys.stdin.readline)
        still_open = sum(1 for ws in sockets if not ws.closed)
        for task in holders:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLEANUP_S * 2):
                await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return {"opened": len(sockets), "still_open": still_open, "dropped": dropped,
            "failed": sum(failures.values()), "error_samples": dict(failures.most_common(5))}


MODES = {"answers": run_answers, "streams": run_streams, "idle": run_idle}


def _emit(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def main() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    job = Job(**json.loads(sys.stdin.readline()))
    _emit({"ready": True})
    command = sys.stdin.readline().split()
    if len(command) != 2 or command[0] != "go":
        return 2
    t0 = float(command[1])
    run = MODES[job.mode]

    async def run_and_report() -> None:
        _emit({"result": await run(job, t0)})
        # Leave now: the loop's shutdown would wait for every socket still closing.
        os._exit(0)

    try:
        import uvloop
    except ImportError:
        asyncio.run(run_and_report())
    else:
        uvloop.run(run_and_report())
    return 1


if __name__ == "__main__":
    sys.exit(main())
