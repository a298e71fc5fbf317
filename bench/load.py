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
  also only those while every stream is held (``steady_from_s``..``steady_to_s`` after t0).
"""

from __future__ import annotations

import asyncio
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

import aiohttp
import orjson
from stats import Histogram, gaps

JSON_HEADERS = {"Content-Type": "application/json"}
PROMPT = "hi"
ERROR_PAUSE_S = 0.01
CLEANUP_S = 5.0


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
    steady_from_s: float = 0.0
    steady_to_s: float = 0.0

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


async def read_text(session: aiohttp.ClientSession, job: Job, body: bytes, answer: Answer) -> None:
    """``POST /chat`` text chunks. The fake's tokens are "Hello" then " word", so a chunk
    holds as many tokens as spaces, plus one for the very first."""
    answer.started = time.monotonic()
    async with session.post(job.url, data=body, headers=JSON_HEADERS) as response:
        await _expect_ok(response)
        first = 1
        async for chunk in response.content.iter_any():
            now = time.monotonic()
            answer.arrivals.extend([now] * (chunk.count(b" ") + first))
            first = 0


async def read_ollama(session: aiohttp.ClientSession, job: Job, body: bytes, answer: Answer) -> None:
    """Ollama ``/api/chat`` NDJSON: one line per token, then a ``done`` line."""
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
            if (data.get("message") or {}).get("content"):
                answer.arrivals.append(now)
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
            if (choices[0].get("delta") or {}).get("content"):
                answer.arrivals.append(now)
    raise AnswerError("stream ended without data: [DONE]")


async def read_ws(session: aiohttp.ClientSession, job: Job, body: bytes, answer: Answer) -> None:
    """Native ``/ws`` on a new connection: chat frame, then start, deltas, done. TTFT counts
    from the chat frame; the handshake is kept apart as ``connect_s``."""
    opening = time.monotonic()
    async with session.ws_connect(job.url, compress=0, autoping=True) as ws:
        answer.connect_s = time.monotonic() - opening
        answer.started = time.monotonic()
        await ws.send_str(body.decode())
        while True:
            message = await ws.receive()
            now = time.monotonic()
            if message.type is not aiohttp.WSMsgType.TEXT:
                raise AnswerError(f"socket ended before done ({message.type.name})")
            event = orjson.loads(message.data)
            kind = event.get("type")
            if kind == "delta":
                answer.arrivals.append(now)
            elif kind == "done":
                return
            elif kind == "error":
                raise AnswerError(f"error frame: {event.get('code')}: {event.get('message')}"[:200])


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
        cpu = time.process_time()
        await _finish(tasks, t0 + job.stagger_s + job.answer_timeout_s + 1)
        client_cpu_s = time.process_time() - cpu
        wall_s = time.monotonic() - t0
    summary = summarise(answers, t0, float("inf"))
    summary["ttft_ms"] = sorted(summary["ttft_ms"])[:: max(1, len(summary["ttft_ms"]) // 1000)]
    # Held streams: only gaps ending once every stream has started and before the first ends.
    steady = Histogram()
    low, high = t0 + job.steady_from_s, t0 + job.steady_to_s
    for answer in answers:
        if answer.error is None and answer.done is not None:
            arrivals = answer.arrivals
            steady.add_all(b - a for a, b in itertools.pairwise(arrivals) if low <= b <= high)
    return {**summary, "steady_gaps": steady.to_json(), "client_cpu_s": client_cpu_s, "wall_s": wall_s}


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
