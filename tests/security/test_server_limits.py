"""The server's limits on connections (chatgate.guard), probed as an attacker would, with
raw sockets against a real gateway on loopback: oversized and dribbled request heads,
dribbled bodies, idle connections, too many connections from one address, and WebSocket
frames larger than any dialect takes."""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from chatgate.api.limits import SizeLimits
from chatgate.testing.raw import (
    connect,
    dribble,
    frame_header,
    read_until_closed,
    request_head,
    send_until_refused,
    text_frame,
    websocket_handshake,
)
from chatgate.testing.servers import RunningGateway, wait_until

HOST = "127.0.0.1"
#: Beyond a limit's own time, what the server may take to act on it.
MARGIN_S = 2.0


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def ask(gw: RunningGateway, head: bytes, *, within_s: float = 10) -> bytes:
    with connect(gw.url) as sock:
        sock.sendall(head)
        return read_until_closed(sock, within_s=within_s)


def test_a_request_head_over_the_limit_is_431_before_authentication(start_gateway: Any) -> None:
    with start_gateway(api_keys="k-0123456789abcdef", max_header_bytes=8192, max_headers=20) as gw:
        plain = request_head("GET", "/conversations", HOST, {"Connection": "close"})
        assert status_of(ask(gw, plain)) == 401

        fits = request_head("GET", "/conversations", HOST, {"Connection": "close", "X-Pad": "a" * 7000})
        assert status_of(ask(gw, fits)) == 401
        large = request_head("GET", "/conversations", HOST, {"Connection": "close", "X-Pad": "a" * 9000})
        assert status_of(ask(gw, large)) == 431
        long_url = request_head("GET", "/conversations?" + "a" * 9000, HOST, {"Connection": "close"})
        assert status_of(ask(gw, long_url)) == 431

        many = {f"X-H{i}": "1" for i in range(25)}
        assert status_of(ask(gw, request_head("GET", "/conversations", HOST, {"Connection": "close", **many}))) == 431


def test_a_huge_header_is_not_read(start_gateway: Any) -> None:
    """A 100 MB header line: the server stops reading soon after the limit (what it took
    stays in socket buffers, megabytes at most), where it used to read it all and answer."""
    with start_gateway() as gw, connect(gw.url) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        sent = send_until_refused(sock, 100_000_000, within_s=10)
        assert sent < 16_000_000, f"the server took {sent} bytes of one header"


def test_a_connection_that_sends_nothing_is_closed_after_the_keepalive_timeout(
    start_gateway: Any,
) -> None:
    with start_gateway(keepalive_timeout_s=1.0) as gw, connect(gw.url) as sock:
        opened = time.monotonic()
        assert read_until_closed(sock, within_s=1.0 + MARGIN_S) == b""
        assert time.monotonic() - opened >= 0.9


def test_a_request_head_dribbled_slowly_is_cut_at_the_header_timeout(start_gateway: Any) -> None:
    """Each byte comes well within the keep-alive timeout, so only a deadline on the whole
    head ends it (slowloris)."""
    with start_gateway(header_timeout_s=1.0, keepalive_timeout_s=5.0) as gw, connect(gw.url) as sock:
        endless = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
        answer, after_s = dribble(sock, endless, gap_s=0.1, within_s=1.0 + MARGIN_S)
        assert status_of(answer) == 408
        assert 0.9 <= after_s <= 1.0 + MARGIN_S
        assert read_until_closed(sock, within_s=MARGIN_S) == b""


def test_a_body_dribbled_slowly_is_cut_at_the_body_timeout(start_gateway: Any) -> None:
    with start_gateway(body_timeout_s=1.0, keepalive_timeout_s=5.0) as gw, connect(gw.url) as sock:
        body = orjson.dumps({"message": "hello " * 200})
        sock.sendall(
            request_head("POST", "/chat", HOST, {"Content-Type": "application/json", "Content-Length": str(len(body))})
        )
        answer, after_s = dribble(sock, body, gap_s=0.1, within_s=1.0 + MARGIN_S)
        assert status_of(answer) == 408
        assert after_s <= 1.0 + MARGIN_S
        assert read_until_closed(sock, within_s=MARGIN_S) == b""


def idle_connections(gw: RunningGateway, count: int) -> list[socket.socket]:
    return [connect(gw.url) for _ in range(count)]


def live(gw: RunningGateway) -> int:
    return status_of(ask(gw, request_head("GET", "/health/live", HOST, {"Connection": "close"})))


def test_connections_from_one_address_are_capped_but_not_from_a_trusted_proxy(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = {"max_connections_per_address": 3, "keepalive_timeout_s": 30.0}
    # Loopback counts as a client once it is not among the proxies uvicorn trusts.
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "192.0.2.1")
    with start_gateway(**limits) as gw:
        held = idle_connections(gw, 3)
        try:
            refused = ask(gw, request_head("GET", "/health/live", HOST))
            assert status_of(refused) == 503
            held.pop().close()
            wait_until(lambda: live(gw) == 200, timeout=5, what="a connection once one is closed")
        finally:
            for sock in held:
                sock.close()
        # WebSockets count as the connections they were upgraded from, until they close.
        wait_until(lambda: live(gw) == 200, timeout=5, what="the idle connections released")
        sockets = idle_connections(gw, 3)
        try:
            for sock in sockets:
                assert websocket_handshake(sock, urlsplit(gw.url).netloc, "/ws").startswith(b"HTTP/1.1 101")
            assert status_of(ask(gw, request_head("GET", "/health/live", HOST))) == 503
        finally:
            for sock in sockets:
                sock.close()
        wait_until(lambda: live(gw) == 200, timeout=5, what="the WebSockets released")
    # By default uvicorn trusts 127.0.0.1: a proxy there (nginx, the benchmark) is not capped.
    monkeypatch.delenv("FORWARDED_ALLOW_IPS")
    with start_gateway(**limits) as gw:
        held = idle_connections(gw, 6)
        try:
            assert live(gw) == 200
        finally:
            for sock in held:
                sock.close()


def test_a_websocket_frame_larger_than_any_dialect_takes_is_refused_unread(gw: RunningGateway) -> None:
    largest = SizeLimits.of(gw.settings).history_bytes
    host = urlsplit(gw.url).netloc
    # The largest frame a dialect takes reaches the application, which answers in its dialect.
    with connect(gw.url) as sock:
        assert websocket_handshake(sock, host, "/ws").startswith(b"HTTP/1.1 101")
        sock.sendall(text_frame('{"type": "ping", "pad": "' + "a" * (largest - 40) + '"}'))
        sock.settimeout(10)
        assert sock.recv(4096)[:1] == b"\x81"  # a text frame back: the error frame
    # One byte more is refused at its header (close code 1009): no payload is waited for.
    with connect(gw.url) as sock:
        assert websocket_handshake(sock, host, "/ws").startswith(b"HTTP/1.1 101")
        sock.sendall(frame_header(largest + 1))
        closing = read_until_closed(sock, within_s=5)
        assert closing[:1] == b"\x88" and closing[2:4] == (1009).to_bytes(2, "big"), closing[:40]
    # Nor is a 15 MB frame read before it is refused.
    with connect(gw.url) as sock:
        assert websocket_handshake(sock, host, "/ws").startswith(b"HTTP/1.1 101")
        sock.sendall(frame_header(15_000_000))
        assert send_until_refused(sock, 15_000_000, within_s=10) < 15_000_000, "the server read a 15 MB frame"
