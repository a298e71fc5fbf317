"""A client that asks for a streamed answer and never reads it, on every streaming API:
the server gives it up (resets the connection) once it has taken nothing for the send
timeout, cancels its generation and keeps the partial answer, and does not grow for it.

The clients are raw sockets with a small receive buffer; the fake upstream streams far
more than fits in the socket buffers between them and the gateway."""

from __future__ import annotations

import functools
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from chatgate.api.delivery import SEND_TIMEOUT_S
from chatgate.testing.raw import (
    ESTABLISHED,
    connect,
    request_head,
    tcp_state,
    text_frame,
    websocket_handshake,
)
from chatgate.testing.servers import FakeLLM, serve_process, wait_until

HOST = "127.0.0.1"
#: What filling the socket buffers between the gateway and a client may take on top of the
#: send timeout (the gateway's kernel send buffer is CHATGATE_SEND_BUFFER_BYTES).
FILL_MARGIN_S = 15.0
#: A client's kernel receive buffer: small, so that what it does not read backs up at once.
CLIENT_BUFFER = 4096


@dataclass(frozen=True)
class Stream:
    """One way to ask for a streamed answer in conversation ``conversation_id``."""

    name: str

    def start(self, url: str, conversation_id: str) -> socket.socket:
        """A raw socket that has asked, and will never read."""
        sock = connect(url, receive_buffer=CLIENT_BUFFER)
        user = [{"role": "user", "content": "tell me everything"}]
        remembered = {"Content-Type": "application/json", "X-Conversation-Id": conversation_id}
        if self.name == "ws":
            assert websocket_handshake(sock, urlsplit(url).netloc, "/ws").startswith(b"HTTP/1.1 101")
            sock.sendall(text_frame(orjson.dumps(
                {"type": "chat", "message": "tell me everything", "conversation_id": conversation_id}
            ).decode()))
            return sock
        path, headers, body = {
            "chat-text": ("/chat", {"Content-Type": "application/json"},
                          {"message": "tell me everything", "stream": True, "conversation_id": conversation_id}),
            "chat-sse": ("/chat", {"Content-Type": "application/json", "Accept": "text/event-stream"},
                         {"message": "tell me everything", "conversation_id": conversation_id}),
            "openai": ("/v1/chat/completions", remembered, {"model": "fake-model", "stream": True, "messages": user}),
            "ollama": ("/api/chat", remembered, {"model": "fake-model", "messages": user}),
        }[self.name]
        encoded = orjson.dumps(body)
        sock.sendall(request_head("POST", path, HOST, {**headers, "Content-Length": str(len(encoded))}) + encoded)
        return sock


STREAMS = [Stream(name) for name in ("chat-text", "chat-sse", "openai", "ollama", "ws")]


def gateway_env(fake: FakeLLM, tmp_path: Path) -> dict[str, str]:
    return {
        "CHATGATE_PROVIDER": "ollama", "OLLAMA_HOST": fake.url, "CHATGATE_MODEL": "fake-model",
        "CHATGATE_STORE": "memory", "CHATGATE_DATA_DIR": str(tmp_path),
        # A WebSocket's answer outlives its socket for the resume grace: keep it short.
        "CHATGATE_RESUME_GRACE_S": "0.5",
    }


def partial_answer(url: str, conversation_id: str) -> str | None:
    """The stored answer of the conversation's last turn, if it is there marked partial."""
    response = httpx.get(f"{url}/conversations/{conversation_id}", timeout=5)
    if response.status_code != 200:
        return None
    messages = response.json()["messages"]
    last = messages[-1] if messages else None
    if last is None or last["role"] != "assistant" or not last["partial"]:
        return None
    return str(last["content"]) or None


def cancelled(url: str) -> int:
    """Generations the gateway has ended as cancelled."""
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    found = re.search(r'^chatgate_generations_total\{[^}]*outcome="cancelled"[^}]*\} (\S+)$', metrics, re.M)
    return int(float(found.group(1))) if found else 0


def dropped_and_kept(url: str, sockets: list[socket.socket], conversations: list[str]) -> None:
    """Wait (bounded) until every socket is reset by the gateway, every generation is
    cancelled, and every conversation holds its partial answer."""
    wait_until(
        lambda: all(tcp_state(sock) != ESTABLISHED for sock in sockets),
        timeout=SEND_TIMEOUT_S + FILL_MARGIN_S,
        interval=0.1,
        what="the gateway dropping clients that read nothing",
    )
    wait_until(lambda: cancelled(url) == len(conversations), timeout=10, what="their generations cancelled")
    for conversation_id in conversations:
        answer = wait_until(
            functools.partial(partial_answer, url, conversation_id), timeout=10, what="the partial answer stored"
        )
        assert answer.startswith("Hello")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError("no VmRSS")


@contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


@pytest.mark.parametrize("stream", STREAMS, ids=[s.name for s in STREAMS])
def test_a_client_that_never_reads_is_dropped_and_its_answer_kept_partial(
    stream: Stream, fake: FakeLLM, tmp_path: Path
) -> None:
    fake.configure(tokens=5_000_000, tps=0)
    conversation_id = f"unread-{uuid.uuid4().hex[:8]}"
    with serve_process(gateway_env(fake, tmp_path)) as served, sockets() as opened:
        opened.append(stream.start(served.url, conversation_id))
        dropped_and_kept(served.url, opened, [conversation_id])


def test_twenty_clients_that_never_read_cost_no_more_than_their_answers(fake: FakeLLM, tmp_path: Path) -> None:
    """Twenty at once against a ``chatgate serve`` process: all dropped, and the memory the
    process grew by is about what twenty answers of that length take anyway (twenty
    clients that do read grow it as much), not a buffer per client; it stops growing once
    they are dropped. The upstream is paced at 500 tokens a second for each answer (ten
    times a fast model), fast enough to fill the sockets' buffers in seconds; the plain
    text stream, a few bytes a token, would take a minute, and is left to the test above."""
    fake.configure(tokens=5_000_000, tps=500)
    kinds = [stream for stream in STREAMS if stream.name != "chat-text"]
    with serve_process(gateway_env(fake, tmp_path)) as served, sockets() as opened:
        before = rss_mib(served.process.pid)
        conversations = [f"unread-{i}-{uuid.uuid4().hex[:8]}" for i in range(20)]
        for i, conversation_id in enumerate(conversations):
            opened.append(kinds[i % len(kinds)].start(served.url, conversation_id))
        dropped_and_kept(served.url, opened, conversations)
        after = rss_mib(served.process.pid)
        assert after - before < 64, f"RSS {before:.0f} MiB before twenty unread streams, {after:.0f} MiB after"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise LookupError("no VmHWM")


def test_a_websocket_client_that_keeps_asking_but_never_reads_is_not_buffered_for(
    fake: FakeLLM, tmp_path: Path
) -> None:
    """300,000 pings, whose pongs it never reads: what waits for it is bounded
    (``MAX_QUEUED_BYTES``), where each pong used to wait, about 300 bytes apiece, until
    the send timeout."""
    with serve_process(gateway_env(fake, tmp_path)) as served, sockets() as opened:
        pid = served.process.pid
        before = peak_rss_mib(pid)
        sock = connect(served.url, receive_buffer=CLIENT_BUFFER)
        opened.append(sock)
        assert websocket_handshake(sock, urlsplit(served.url).netloc, "/ws").startswith(b"HTTP/1.1 101")
        pings = text_frame('{"type": "ping"}') * 10_000
        sock.settimeout(SEND_TIMEOUT_S + FILL_MARGIN_S)
        try:
            for _ in range(30):
                sock.sendall(pings)
        except OSError:  # reset by the gateway: it has given up on this client
            pass
        wait_until(
            lambda: tcp_state(sock) != ESTABLISHED,
            timeout=SEND_TIMEOUT_S + FILL_MARGIN_S,
            interval=0.1,
            what="the gateway dropping a client that reads nothing",
        )
        after = peak_rss_mib(pid)
        assert after - before < 32, f"peak RSS {before:.0f} MiB before, {after:.0f} MiB after"
