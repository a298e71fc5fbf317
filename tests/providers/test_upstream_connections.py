"""The connections streamed answers take (providers/_upstream.py), against a loopback
server written with raw asyncio so that each test decides exactly what the upstream does:
keep-alive, a kept connection the upstream closed, silence, a cancelled answer."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from upstream import RawLines, read_all

from chatgate.providers._http import (
    LineStream,
    close_session,
    new_session,
    streaming_connections,
)
from chatgate.providers._upstream import _Origin, _request_head
from chatgate.providers.base import (
    ProviderHTTPError,
    ProviderStreamError,
    ProviderTimeout,
    ProviderUnavailable,
)

BOUND_S = 5.0
#: A chunked NDJSON answer of two lines, as Ollama sends one.
ANSWER = b"".join(
    b"%x\r\n%s\r\n" % (len(line), line) for line in (b'{"t":"a"}\n', b'{"t":"b","done":true}\n')
) + b"0\r\n\r\n"


@dataclass
class Upstream:
    """A loopback server: each request read whole, answered by ``reply(connection, request)``."""

    reply: Callable[[Upstream, asyncio.Transport, bytes], None]
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def start(self, tls: ssl.SSLContext | None = None) -> asyncio.Server:
        upstream = self

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                upstream.connections += 1
                self.transport: asyncio.Transport = transport  # type: ignore[assignment]
                self.buffer = b""

            def data_received(self, data: bytes) -> None:
                self.buffer += data
                head, sep, rest = self.buffer.partition(b"\r\n\r\n")
                if not sep:
                    return
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                if len(rest) < length:
                    return
                self.buffer = rest[length:]
                upstream.requests.append(head + sep + rest[:length])
                upstream.reply(upstream, self.transport, head)

            def connection_lost(self, exc: Exception | None) -> None:
                upstream.closed.set()

        server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", 0, ssl=tls)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/api/chat"
        return server


def answer_whole(upstream: Upstream, transport: asyncio.Transport, head: bytes) -> None:
    transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + ANSWER)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    opened = new_session(connect_timeout_s=2, read_timeout_s=0.4)
    yield opened
    await close_session(opened)


def status_error(status: int, body: bytes, model: str) -> ProviderHTTPError:
    return ProviderHTTPError(f"status {status}: {body.decode()}", status=status, provider="test", model=model)


@pytest.fixture(params=[False, True], ids=["iterated", "pumped"])
def pumped(request: pytest.FixtureRequest) -> bool:
    """Each test reads its answers both ways: iterated, and pumped from the callback."""
    return bool(request.param)


def answer_stream(session: aiohttp.ClientSession, url: str) -> LineStream:
    return LineStream(session, url, RawLines(), provider="test", model="m", base_url=url,
                      status_error=status_error, data=b'{"x":1}', headers={"Content-Type": "application/json"})


Ask = Callable[[aiohttp.ClientSession, str], Awaitable[list[bytes]]]


@pytest.fixture
def ask(pumped: bool) -> Ask:
    """Send the request, return the answer's lines (read to the last)."""
    async def asking(session: aiohttp.ClientSession, url: str) -> list[bytes]:
        chunks = await read_all(answer_stream(session, url), pumped=pumped)
        return [c.text.encode() for c in chunks if c.text]

    return asking


async def test_answers_read_to_the_end_reuse_one_connection(session: aiohttp.ClientSession, ask: Ask) -> None:
    upstream = Upstream(answer_whole)
    async with await upstream.start():
        for _ in range(3):
            assert await ask(session, upstream.url) == [b'{"t":"a"}', b'{"t":"b","done":true}']
        assert upstream.connections == 1
        request = upstream.requests[0]
        assert request.startswith(b"POST /api/chat HTTP/1.1\r\n")
        assert b"\r\nContent-Length: 7\r\n" in request and request.endswith(b'\r\n\r\n{"x":1}')
        assert b"\r\nAccept-Encoding: identity\r\n" in request


async def test_a_connection_is_kept_once_the_end_read_after_the_last_message_comes(
    session: aiohttp.ClientSession, pumped: bool,
) -> None:
    """The adapters stop at the answer's last message; the end of the body (a chunked
    body's last, empty chunk) may come a moment later: the connection is kept then."""
    def end_later(upstream: Upstream, transport: asyncio.Transport, head: bytes) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + ANSWER[:-5])
        asyncio.get_running_loop().call_later(0.05, transport.write, b"0\r\n\r\n")

    upstream = Upstream(end_later)
    connections = streaming_connections(session)
    async with await upstream.start():
        for _ in range(2):
            chunks = await read_all(answer_stream(session, upstream.url), pumped=pumped)
            assert chunks[-1].finish_reason == "stop"  # at the last message, before the body's end
            async with asyncio.timeout(BOUND_S):  # bounded wait for the end to come
                while not any(connections._idle.values()):
                    await asyncio.sleep(0.005)
        assert upstream.connections == 1


async def test_an_answer_not_read_to_the_end_closes_its_connection(session: aiohttp.ClientSession, ask: Ask) -> None:
    """A cancelled answer: the upstream sees its connection close and stops generating."""
    upstream = Upstream(lambda u, t, h: t.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"))
    async with await upstream.start():
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await ask(session, upstream.url)
        await asyncio.wait_for(upstream.closed.wait(), BOUND_S)


async def test_a_kept_connection_the_upstream_closed_is_replaced(session: aiohttp.ClientSession, ask: Ask) -> None:
    def answer_then_hang_up(upstream: Upstream, transport: asyncio.Transport, head: bytes) -> None:
        answer_whole(upstream, transport, head)
        transport.close()  # without saying so: the client kept the connection

    upstream = Upstream(answer_then_hang_up)
    async with await upstream.start():
        await ask(session, upstream.url)
        await ask(session, upstream.url)
        assert upstream.connections == 2
        assert len(upstream.requests) == 2


async def test_a_silent_upstream_is_a_timeout_before_and_after_the_headers(session: aiohttp.ClientSession, ask: Ask) -> None:
    silent = Upstream(lambda u, t, h: None)
    async with await silent.start():
        with pytest.raises(ProviderTimeout):
            await ask(session, silent.url)
    stalls = Upstream(lambda u, t, h: t.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\na\n\n\r\n"))
    async with await stalls.start():
        with pytest.raises(ProviderTimeout):
            await ask(session, stalls.url)


async def test_an_upstream_that_goes_away_mid_answer_is_a_stream_error(session: aiohttp.ClientSession, ask: Ask) -> None:
    def half(upstream: Upstream, transport: asyncio.Transport, head: bytes) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\na\n\n\r\n")
        transport.close()

    upstream = Upstream(half)
    async with await upstream.start():
        with pytest.raises(ProviderStreamError, match="closed the connection mid-answer"):
            await ask(session, upstream.url)


async def test_a_body_that_ends_with_the_connection_is_whole(session: aiohttp.ClientSession, ask: Ask) -> None:
    """An HTTP/1.0-style answer: no length, no chunks, the close ends it; a close before
    such an answer's headers is still a failure."""
    def close_delimited(upstream: Upstream, transport: asyncio.Transport, head: bytes) -> None:
        transport.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n"
                        b'{"t":"a"}\n{"t":"b","done":true}\n')
        transport.close()

    upstream = Upstream(close_delimited)
    async with await upstream.start():
        assert await ask(session, upstream.url) == [b'{"t":"a"}', b'{"t":"b","done":true}']
        assert await ask(session, upstream.url) == [b'{"t":"a"}', b'{"t":"b","done":true}']
        assert upstream.connections == 2  # not kept: the upstream closed it
    hangs_up = Upstream(lambda u, t, h: t.close())
    async with await hangs_up.start():
        with pytest.raises(ProviderStreamError, match="closed the connection"):
            await ask(session, hangs_up.url)


async def test_an_error_status_carries_its_body(session: aiohttp.ClientSession, ask: Ask) -> None:
    upstream = Upstream(lambda u, t, h: t.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno model!"))
    async with await upstream.start():
        with pytest.raises(ProviderHTTPError, match="status 404: no model!"):
            await ask(session, upstream.url)


async def test_an_unreachable_upstream_says_why(session: aiohttp.ClientSession, ask: Ask) -> None:
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ProviderUnavailable, match=r"not reachable at \S+: Connection refused"):
        await ask(session, f"http://127.0.0.1:{port}/api/chat")


async def test_close_session_closes_the_kept_connections(session: aiohttp.ClientSession, ask: Ask) -> None:
    upstream = Upstream(answer_whole)
    async with await upstream.start():
        await ask(session, upstream.url)
        assert not upstream.closed.is_set()
        streaming_connections(session).close()
        await asyncio.wait_for(upstream.closed.wait(), BOUND_S)


def test_the_request_head_names_the_host_and_refuses_line_breaks() -> None:
    head = _request_head(_Origin("https", "api.example.com", 443), "/v1/x?alt=sse", {"Authorization": "Bearer k"}, 2)
    assert head.startswith(b"POST /v1/x?alt=sse HTTP/1.1\r\nHost: api.example.com\r\n")
    assert b"\r\nAuthorization: Bearer k\r\n" in head
    assert b"Host: [::1]:8080\r\n" in _request_head(_Origin("http", "::1", 8080), "/", {}, 0)
    with pytest.raises(ValueError, match="line break"):
        _request_head(_Origin("http", "h", 80), "/", {"X-A": "1\r\nX-B: 2"}, 0)


async def test_an_answer_with_endless_headers_is_refused(session: aiohttp.ClientSession, ask: Ask) -> None:
    def endless(upstream: Upstream, transport: asyncio.Transport, head: bytes) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\n" + b"X-Padding: " + b"x" * 70_000 + b"\r\n")

    upstream = Upstream(endless)
    async with await upstream.start():
        with pytest.raises(ProviderStreamError, match="bytes of headers"):
            await ask(session, upstream.url)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


async def test_https_upstreams_are_verified(
    session: aiohttp.ClientSession, ask: Ask, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    upstream = Upstream(answer_whole)
    async with await upstream.start(tls):
        url = upstream.url.replace("http://127.0.0.1", "https://localhost")
        with pytest.raises(ProviderUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await ask(session, url)  # not signed by anything this machine trusts
        trusting = new_session(connect_timeout_s=2, read_timeout_s=2)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read when the context is made
        try:
            assert await ask(trusting, url) == [b'{"t":"a"}', b'{"t":"b","done":true}']
            assert b"\r\nHost: localhost:" in upstream.requests[-1]
        finally:
            await close_session(trusting)

