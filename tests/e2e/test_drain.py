"""``chatgate serve`` on SIGTERM: it stops listening, lets the running answers finish
(streaming to their open WebSockets and HTTP responses), cuts what is still running when
``CHATGATE_DRAIN_S`` is up (stored, marked partial), only then closes the WebSockets with
1012, and exits with 0. A second signal ends the drain at once.

Real processes: the gateway as a subprocess on a SQLite file in the test's folder, the
fake upstream paced so that the answers are half-way when the signal comes. Every wait
is an event or a bounded poll; what the gateway stored is read from the SQLite file
once it has exited.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from chatgate.store import StoreLimits, open_store
from chatgate.store.base import StoredMessage
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, free_port, wait_until

Frame = dict[str, Any]

START_S = 60.0
#: Bound on any one read, and on a thread's whole turn beyond the answer's own length.
RECV_S = 30.0
#: Answers of 60 tokens at 20 tokens/s: 3 s each, so all are mid-way at the signal.
TOKENS, TPS = 60, 20.0
ANSWER = fake_reply(TOKENS)
#: Answers that cannot finish within a drain of 1 s: 400 tokens at 10 tokens/s.
SLOW_TOKENS, SLOW_TPS = 400, 10.0


# The gateway process --------------------------------------------------------------------


@dataclass
class Served:
    """A running ``chatgate serve`` and the lines it has written (stdout and stderr)."""

    process: subprocess.Popen[str]
    port: int
    database: Path
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def records(self) -> list[Frame]:
        found = []
        for line in list(self.lines):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict):
                found.append(record)
        return found

    def record(self, prefix: str) -> list[Frame]:
        return [r for r in self.records() if str(r.get("msg", "")).startswith(prefix)]

    def send(self, sig: int = signal.SIGTERM) -> float:
        """Send ``sig``; returns when it was sent (time.monotonic)."""
        self.process.send_signal(sig)
        return time.monotonic()

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stored(self, conversation_id: str) -> list[StoredMessage]:
        """The conversation's messages as the gateway left them in its SQLite file."""

        async def read() -> list[StoredMessage]:
            store = open_store(f"sqlite:///{self.database}", StoreLimits())
            await store.open()
            try:
                conversation = await store.get(conversation_id)
            finally:
                await store.close()
            return list(conversation.messages) if conversation is not None else []

        return asyncio.run(read())


def environment(tmp_path: Path, fake: FakeLLM, **env: str) -> dict[str, str]:
    """This process's environment without any chatgate or Ollama variable, then the fake
    upstream, a SQLite file in ``tmp_path`` and ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith(("CHATGATE_", "OLLAMA_"))}
    return {
        **base,
        "PYTHONUNBUFFERED": "1",
        "CHATGATE_PROVIDER": "ollama",
        "OLLAMA_HOST": fake.url,
        "CHATGATE_MODEL": "fake-model",
        "CHATGATE_DATA_DIR": str(tmp_path),
        "CHATGATE_STORE": f"sqlite:///{tmp_path / 'chat.db'}",
        **env,
    }


@contextmanager
def serving(tmp_path: Path, fake: FakeLLM, *args: str, **env: str) -> Iterator[Served]:
    """``chatgate serve`` until it is ready; killed on the way out if it is still running."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "chatgate", "serve", "--port", str(port), *args],
        env=environment(tmp_path, fake, **env),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    served = Served(process, port, tmp_path / "chat.db")

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            served.lines.append(line)

    reader = threading.Thread(target=read, name="chatgate-serve-output", daemon=True)
    reader.start()
    try:
        wait_until(
            lambda: served.record("chatgate ready on ") or process.poll() is not None,
            timeout=START_S,
            what="the ready line",
        )
        assert served.record("chatgate ready on "), "".join(served.lines)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=15)
        reader.join(timeout=5)


# Clients: one answer each, in a thread ---------------------------------------------------


class Answer(threading.Thread):
    """One turn in a conversation of its own, read to its end in a thread. ``first`` is
    set once some text has arrived."""

    def __init__(self, served: Served, conversation_id: str) -> None:
        super().__init__(name=f"answer-{conversation_id}", daemon=True)
        self.served = served
        self.conversation_id = conversation_id
        self.first = threading.Event()
        #: How the socket closed (WebSockets) or the response's status (HTTP).
        self.close_code: int | None = None
        self.status: int | None = None
        self.text = ""
        #: The answer's last event (``done`` or ``error``), if one came.
        self.end: Frame | None = None
        self.ended_at: float | None = None
        self.problem: BaseException | None = None

    @property
    def message(self) -> str:
        return f"question of {self.conversation_id}"

    def run(self) -> None:
        try:
            self.ask()
        except BaseException as exc:  # reported by the test thread
            self.problem = exc
        finally:
            self.first.set()  # a failure before any text must not leave the test waiting

    def ask(self) -> None:
        raise NotImplementedError

    def ended(self, end: Frame | None) -> None:
        self.end = end
        self.ended_at = time.monotonic()

    def result(self) -> Answer:
        self.join(timeout=RECV_S)
        assert not self.is_alive(), f"{self.name} still running"
        if self.problem is not None:
            raise AssertionError(f"{self.name} failed") from self.problem
        return self


class WsAnswer(Answer):
    """A native ``chat`` on ``/ws``; after the answer, reads on until the socket closes."""

    def ask(self) -> None:
        with connect(self.served.ws_url + "/ws", open_timeout=RECV_S) as ws:
            ws.send(orjson.dumps({"type": "chat", "id": self.conversation_id, "message": self.message,
                                  "conversation_id": self.conversation_id}).decode())
            try:
                while self.end is None:
                    frame = orjson.loads(ws.recv(timeout=RECV_S))
                    if frame["type"] == "delta":
                        self.text += frame["text"]
                        self.first.set()
                    elif frame["type"] in ("done", "error"):
                        self.ended(frame)
                while True:
                    ws.recv(timeout=RECV_S)
            except ConnectionClosed as closed:
                self.close_code = closed.rcvd.code if closed.rcvd is not None else None


class SseAnswer(Answer):
    """``POST /chat`` with ``Accept: text/event-stream``."""

    def ask(self) -> None:
        body = {"message": self.message, "conversation_id": self.conversation_id}
        headers = {"Accept": "text/event-stream"}
        with httpx.stream("POST", self.served.url + "/chat", json=body, headers=headers, timeout=RECV_S) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = orjson.loads(line[len("data: "):])
                if event["type"] == "delta":
                    self.text += event["text"]
                    self.first.set()
                elif event["type"] in ("done", "error"):
                    self.ended(event)


class TextAnswer(Answer):
    """``POST /chat`` with ``stream: true``: plain text, whose end is the end of the body."""

    def ask(self) -> None:
        body = {"message": self.message, "conversation_id": self.conversation_id, "stream": True}
        with httpx.stream("POST", self.served.url + "/chat", json=body, timeout=RECV_S) as response:
            self.status = response.status_code
            for chunk in response.iter_text():
                self.text += chunk
                if self.text:
                    self.first.set()
        self.ended(None)


def start_all(answers: list[Answer]) -> None:
    """Start every answer and return once each has some text."""
    for answer in answers:
        answer.start()
    for answer in answers:
        assert answer.first.wait(RECV_S), f"{answer.name}: no text within {RECV_S} s"
        assert answer.problem is None, f"{answer.name}: {answer.problem!r}"


def read_response(sock: socket.socket) -> bytes:
    """One HTTP response with a Content-Length from a raw socket: its head and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"<closed>"
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def websocket_handshake(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def assert_stored_once(served: Served, answer: Answer, *, text: str, partial: bool) -> None:
    messages = served.stored(answer.conversation_id)
    assert [(m.role, m.content, m.partial) for m in messages] == [
        ("user", answer.message, False),
        ("assistant", text, partial),
    ], answer.conversation_id


# Tests ------------------------------------------------------------------------------------


def test_running_answers_finish_then_websockets_close_with_1012(tmp_path: Path, fake: FakeLLM) -> None:
    fake.configure(tokens=TOKENS, tps=TPS)
    drain_s = 30.0
    with serving(tmp_path, fake, CHATGATE_DRAIN_S=f"{drain_s:g}") as served:
        answers: list[Answer] = [
            *(WsAnswer(served, f"ws-{i}") for i in range(5)),
            *(SseAnswer(served, f"sse-{i}") for i in range(3)),
            *(TextAnswer(served, f"text-{i}") for i in range(2)),
        ]
        start_all(answers)
        signalled = served.send()
        code = served.wait_exit(timeout=drain_s + 10)
        exited_after = time.monotonic() - signalled
        for answer in answers:
            answer.result()

    assert code == 0, "".join(served.lines)
    assert exited_after < drain_s
    for answer in answers:
        assert answer.ended_at is not None and answer.ended_at > signalled, f"{answer.name} was not mid-answer"
        assert answer.text == ANSWER, answer.name
        if isinstance(answer, WsAnswer | SseAnswer):
            assert answer.end is not None and answer.end["type"] == "done", (answer.name, answer.end)
            assert answer.end["finish_reason"] == "stop"
        if isinstance(answer, WsAnswer):
            assert answer.close_code == 1012, answer.name
        else:
            assert answer.status == 200, answer.name
        assert_stored_once(served, answer, text=ANSWER, partial=False)
    [draining] = served.record("draining: ")
    [drained] = served.record("drained ")
    assert (draining["running"], draining["drain_s"]) == (10, drain_s)
    assert (drained["finished"], drained["cut"]) == (10, 0)
    print(f"\n10 answers of {TOKENS} tokens at {TPS:g} tokens/s: SIGTERM to exit {exited_after:.2f} s, "
          f"drained in {drained['waited_s']} s")


def assert_cut_short(answer: Answer) -> None:
    """The end a client gets for an answer the drain cut: a retryable error, not a cancel
    it never asked for."""
    end = answer.end
    assert end is not None and end["type"] == "error", (answer.name, end)
    assert end["code"] == "internal" and end["retryable"] is True, (answer.name, end)
    assert "send the message again" in end["message"]


def test_answers_still_running_when_the_drain_ends_are_cut_and_stored_partial(
    tmp_path: Path, fake: FakeLLM
) -> None:
    fake.configure(tokens=SLOW_TOKENS, tps=SLOW_TPS)
    drain_s = 1.0
    with serving(tmp_path, fake, CHATGATE_DRAIN_S=f"{drain_s:g}") as served:
        answers: list[Answer] = [
            WsAnswer(served, "ws-0"), WsAnswer(served, "ws-1"), SseAnswer(served, "sse-0"), TextAnswer(served, "text-0"),
        ]
        start_all(answers)
        signalled = served.send()
        code = served.wait_exit(timeout=drain_s + 10)
        exited_after = time.monotonic() - signalled
        for answer in answers:
            answer.result()

    assert code == 0, "".join(served.lines)
    assert drain_s <= exited_after < drain_s + 5
    [drained] = served.record("drained ")
    assert (drained["finished"], drained["cut"]) == (0, 4)
    for answer in answers:
        # Cut: what was streamed is what is stored, and the client is told to ask again.
        assert answer.text and answer.text != fake_reply(SLOW_TOKENS), answer.name
        assert fake_reply(SLOW_TOKENS).startswith(answer.text), answer.name
        if isinstance(answer, WsAnswer | SseAnswer):
            assert_cut_short(answer)
        if isinstance(answer, WsAnswer):
            assert answer.close_code == 1012, answer.name
        assert_stored_once(served, answer, text=answer.text, partial=True)


def test_during_the_drain_health_is_503_and_new_turns_are_refused(
    tmp_path: Path, fake: FakeLLM
) -> None:
    fake.configure(tokens=SLOW_TOKENS, tps=SLOW_TPS)
    with serving(tmp_path, fake, CHATGATE_DRAIN_S="30") as served, httpx.Client(
        base_url=served.url, timeout=RECV_S
    ) as client, connect(served.ws_url + "/ws", open_timeout=RECV_S) as idle:
        assert client.get("/health").status_code == 200  # the connection the polls reuse
        kept = socket.create_connection(("127.0.0.1", served.port), timeout=RECV_S)
        kept.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(kept).startswith(b"HTTP/1.1 200 ")
        running = WsAnswer(served, "running")
        start_all([running])
        served.send()

        health = wait_until(
            lambda: (r := client.get("/health")).status_code == 503 and r, timeout=RECV_S, what="503 from /health"
        )
        assert health.json()["status"] == "draining"
        assert health.json()["checks"]["provider"]["status"] == "ok"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", served.port), timeout=5).close()

        idle.send(orjson.dumps({"type": "chat", "id": "late", "message": "one more"}).decode())
        refusal = orjson.loads(idle.recv(timeout=RECV_S))
        assert refusal == {
            "type": "error", "id": "late", "code": "busy", "retryable": True,
            "message": "the gateway is shutting down; send this again on a new connection",
        }
        # A WebSocket asked for on a connection that was open before the drain (a proxy's
        # pooled one): accepted and closed at once with 1012, so the client goes elsewhere.
        kept.sendall(websocket_handshake("/ws"))
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < 4:
            reply += kept.recv(65536) or b"<closed>"
        head, _, close_frame = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert close_frame[0] == 0x88 and int.from_bytes(close_frame[2:4], "big") == 1012
        kept.close()
        late = client.post("/chat", json={"message": "one more"})
        assert (late.status_code, late.json()["code"]) == (409, "busy")
        assert late.headers["connection"] == "close"
        assert late.headers["retry-after"] == "1"
        assert running.is_alive(), "the answer was still streaming throughout"

        served.send(signal.SIGINT)  # a second signal, Ctrl+C this time: ends the drain at once
        assert served.wait_exit(timeout=10) == 130
        running.result()
    assert_cut_short(running)
    assert running.close_code == 1012
    assert_stored_once(served, running, text=running.text, partial=True)


def test_a_second_sigterm_ends_the_drain_at_once(tmp_path: Path, fake: FakeLLM) -> None:
    fake.configure(tokens=SLOW_TOKENS, tps=SLOW_TPS)
    with serving(tmp_path, fake, CHATGATE_DRAIN_S="30") as served:
        answer = WsAnswer(served, "ws-0")
        start_all([answer])
        served.send()
        wait_until(lambda: served.record("draining: "), timeout=RECV_S, what="the drain")
        second = served.send()
        code = served.wait_exit(timeout=10)
        exited_after = time.monotonic() - second
        answer.result()
        [drained] = served.record("drained ")
    assert code == 0, "".join(served.lines)
    assert exited_after < 5
    assert (drained["finished"], drained["cut"]) == (0, 1)
    assert answer.close_code == 1012
    assert_stored_once(served, answer, text=answer.text, partial=True)


def test_several_workers_drain_too(tmp_path: Path, fake: FakeLLM) -> None:
    fake.configure(tokens=TOKENS, tps=TPS)
    with serving(tmp_path, fake, "--workers", "2", CHATGATE_DRAIN_S="30") as served:
        wait_until(lambda: len(served.record("provider chosen")) == 2, timeout=START_S, what="both workers")
        answers: list[Answer] = [WsAnswer(served, "ws-0"), WsAnswer(served, "ws-1"), SseAnswer(served, "sse-0")]
        start_all(answers)
        signalled = served.send()
        code = served.wait_exit(timeout=40)
        for answer in answers:
            answer.result()
    assert code == 0, "".join(served.lines)
    for answer in answers:
        assert answer.ended_at is not None and answer.ended_at > signalled
        assert answer.end is not None and answer.end["finish_reason"] == "stop", (answer.name, answer.end)
        assert answer.text == ANSWER
        assert_stored_once(served, answer, text=ANSWER, partial=False)
    assert all(a.close_code == 1012 for a in answers if isinstance(a, WsAnswer))
    assert [r["cut"] for r in served.record("drained ")] == [0, 0], "each worker drained"
