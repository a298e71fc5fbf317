"""Streamed answers over HTTP/1.1 connections chatgate keeps itself.

aiohttp carries every other upstream call (embeddings, model lists, health probes). The
streamed POST, where every token's time goes, runs here: the request is written in one
call on a kept-alive connection, the answer is parsed by httptools in the socket's
callback, and the body's bytes wait in a list for the one reader of the answer. aiohttp
spent about 0.3 ms of a request and a few microseconds of each token on what this does
not need (its request and response objects, its stream reader, a timer per read);
bench/CHANGES.md has the figures.

What an upstream sees is what aiohttp sent: ``POST`` with ``Content-Length``, ``Host``,
the caller's headers, and ``Accept-Encoding: identity`` (a streamed answer is not worth
compressing, and nothing here decompresses). A connection goes back to the pool only
when its answer was read to the end and the upstream keeps it alive; one that sat idle
is closed after ``KEEPALIVE_S``. A request on a kept connection that the upstream had
closed meanwhile (nothing of an answer came back) is sent once more on a new one.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httptools

from chatgate import __version__

#: An idle kept connection is closed after this long (aiohttp's keepalive_timeout).
KEEPALIVE_S = 30.0
#: Reading stops while this much of an answer waits for its reader.
MAX_BUFFERED_BYTES = 1 << 20
#: An answer's status line and headers, at most (aiohttp's limit is 8 KiB a line).
MAX_HEAD_BYTES = 64 * 1024
_USER_AGENT = f"chatgate/{__version__}"


class UpstreamUnreachable(Exception):
    """No connection could be made; the message is the reason."""


class UpstreamClosed(Exception):
    """The connection ended before the answer did, or what came back was not HTTP."""


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int


class _Connection(asyncio.Protocol):
    """One kept-alive connection and the answer it is reading."""

    def __init__(self, pool: StreamingConnections, origin: _Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.lost = False
        #: Bytes received over the connection's life: the read-gap watch compares them.
        self.received = 0
        self._loop = asyncio.get_running_loop()
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.keep_alive = False
        self.headers_done: asyncio.Future[None] = self._loop.create_future()
        self.answered = False  # some byte of this answer came back
        self.ended = False  # the whole answer came back
        self.release_at_end = False
        #: Neither Content-Length nor Transfer-Encoding: the body ends when the connection does.
        self.ends_at_close = True
        self._head_bytes = 0
        self._in_head = True
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        #: Set by :meth:`deliver_to`: the body's bytes go here as they arrive, and
        #: ``_on_end`` is told once the body has ended or failed.
        self._sink: Callable[[bytes], None] | None = None
        self._on_end: Callable[[BaseException | None], None] | None = None

    # asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.answered = True
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.fail(UpstreamClosed(f"the upstream's answer has over {MAX_HEAD_BYTES} bytes of headers"))
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(UpstreamClosed(f"the upstream's answer is not HTTP/1.1 ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.forget(self)
        if exc is None and self.ends_at_close and self.headers_done.done() and not self.ended:
            self.ended = True  # a body delimited by the close (HTTP/1.0 style) is whole
            self._wake()
        if not self.ended:
            self.fail(UpstreamClosed("the upstream closed the connection" + (f": {exc}" if exc else "")))

    # httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.ends_at_close = False

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._sink is not None:
            if self._error is None and not self.ended:
                self._sink(body)
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > MAX_BUFFERED_BYTES and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.ended = True
        self._wake()
        if self.release_at_end:
            self.pool.release(self)

    # the answer's reader ---------------------------------------------------------------

    def send(self, request: bytes) -> None:
        self._reset()
        assert self.transport is not None
        self.transport.write(request)

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if not self.headers_done.done():
            self.headers_done.set_exception(error)
            self.headers_done.exception()  # retrieved: the sender may have stopped waiting
        self._wake()
        if self.transport is not None:
            self.transport.close()

    async def read(self) -> bytes:
        """What has arrived of the body since the last read; ``b""`` at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.ended:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._take_buffered()

    def _take_buffered(self) -> bytes:
        """Everything buffered, at once; reading resumes if it had paused for it."""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        if self._buffered > MAX_BUFFERED_BYTES and self.transport is not None and not self.lost:
            self.transport.resume_reading()
        self._buffered = 0
        return data

    def deliver_to(self, sink: Callable[[bytes], None], on_end: Callable[[BaseException | None], None]) -> None:
        """Hand the body to ``sink`` from now on, in the socket's callback, as it arrives
        (what arrived before first); ``on_end(error)`` once it has ended (``None``) or failed.
        No task wakes per piece: the streamed tokens' path. ``sink`` must not raise."""
        if self._chunks:
            sink(self._take_buffered())
        self._sink, self._on_end = sink, on_end
        if self._error is not None or self.ended:
            self._wake()

    def detach(self) -> None:
        """Nothing more goes to the sink of :meth:`deliver_to`."""
        self._sink = self._on_end = None

    def _wake(self) -> None:
        if self._on_end is not None:
            if self._error is not None or self.ended:
                on_end, self._on_end = self._on_end, None
                on_end(self._error)
            return
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        self.ended = True  # what is still to come is not wanted: not a failure
        self.detach()
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """A streamed answer: its status, then its body, read with :attr:`read_some`."""

    def __init__(self, connection: _Connection, read_gap_s: float | None) -> None:
        self._connection = connection
        self.status = connection.status
        #: What has arrived of the body since the last call; ``b""`` at its end.
        self.read_some = connection.read
        #: Or the body as it arrives, pushed (:meth:`_Connection.deliver_to`).
        self.deliver_to = connection.deliver_to
        self._complete = False
        self._watch: asyncio.TimerHandle | None = None
        self._gap_s = read_gap_s
        self._seen = connection.received
        self._quiet = 0
        if read_gap_s:
            self._watch = asyncio.get_running_loop().call_later(read_gap_s / 4, self._check)

    def _check(self) -> None:
        """Four looks per read-gap period: an upstream that sent nothing for it fails."""
        assert self._gap_s is not None
        connection = self._connection
        if connection.received != self._seen:
            self._seen, self._quiet = connection.received, 0
        else:
            self._quiet += 1
            if self._quiet >= 4:
                connection.fail(TimeoutError(f"no data from the upstream for {self._gap_s:g} s"))
                return
        self._watch = asyncio.get_running_loop().call_later(self._gap_s / 4, self._check)

    async def read(self) -> bytes:
        """The whole body (an error's)."""
        parts = []
        while data := await self.read_some():
            parts.append(data)
        return b"".join(parts)

    def complete(self) -> None:
        """The answer's last message is read: the connection may serve another request."""
        self._complete = True

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        connection = self._connection
        connection.detach()
        if self._complete and connection.keep_alive and not connection.lost:
            if connection.ended:
                connection.pool.release(connection)
            else:
                connection.pool.keep_when_ended(connection)
        else:
            connection.close()  # a cancelled or broken answer: the upstream stops generating


class StreamingConnections:
    """Kept-alive connections per upstream origin, for streamed POSTs."""

    def __init__(self, *, connect_timeout_s: float | None, read_timeout_s: float | None) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._timers: dict[_Connection, asyncio.TimerHandle] = {}
        self._tls: ssl.SSLContext | None = None

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], params: Mapping[str, str] | None = None
    ) -> UpstreamResponse:
        """Send the request and return once the answer's headers have come."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamUnreachable(f"not an http(s) URL: {url}")
        origin = _Origin(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        query = "&".join(q for q in (parts.query, urlencode(params) if params else "") if q)
        request = _request_head(origin, (parts.path or "/") + (f"?{query}" if query else ""), headers, len(body))
        request += body
        for _ in range(2):
            connection = self._take(origin)
            reused = connection is not None
            if connection is None:
                connection = await self._connect(origin)
            connection.send(request)
            try:
                async with asyncio.timeout(self._read_timeout_s):
                    await asyncio.shield(connection.headers_done)
            except UpstreamClosed:
                if reused and not connection.answered:
                    continue  # the upstream had closed the kept connection: once more, anew
                raise
            except BaseException:
                connection.close()
                raise
            return UpstreamResponse(connection, self._read_timeout_s)
        raise UpstreamClosed("the upstream closed two connections before answering")

    def keep_when_ended(self, connection: _Connection) -> None:
        """The end of ``connection``'s answer is on its way: keep the connection once it has
        come, or close it if that takes ``KEEPALIVE_S``."""
        connection.release_at_end = True
        self._timers[connection] = asyncio.get_running_loop().call_later(KEEPALIVE_S, connection.close)

    def release(self, connection: _Connection) -> None:
        """Keep ``connection`` for the next request to its origin."""
        connection.release_at_end = False
        waiting = self._timers.pop(connection, None)
        if waiting is not None:
            waiting.cancel()
        if connection.lost:
            return
        self._idle.setdefault(connection.origin, []).append(connection)
        self._timers[connection] = asyncio.get_running_loop().call_later(KEEPALIVE_S, connection.close)

    def forget(self, connection: _Connection) -> None:
        """``connection`` is gone: it is not kept any more."""
        idle = self._idle.get(connection.origin)
        if idle is not None and connection in idle:
            idle.remove(connection)
        timer = self._timers.pop(connection, None)
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        """Close every kept connection, and those waiting for their answer's end."""
        for connection in list(self._timers):
            connection.close()
        self._idle.clear()

    def _take(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            timer = self._timers.pop(connection, None)
            if timer is not None:
                timer.cancel()
            if not connection.lost:
                return connection
        return None

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls: dict[str, Any] = {}
        if origin.scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = {"ssl": self._tls, "server_hostname": origin.host}
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, origin), origin.host, origin.port, **tls
                )
        except ssl.SSLError as exc:  # a certificate that does not verify, say
            raise UpstreamUnreachable(str(exc)) from exc
        except OSError as exc:
            raise UpstreamUnreachable(os.strerror(exc.errno) if exc.errno else str(exc)) from exc
        return connection


def _request_head(origin: _Origin, target: str, headers: Mapping[str, str], length: int) -> bytes:
    default_port = 443 if origin.scheme == "https" else 80
    host = origin.host if ":" not in origin.host else f"[{origin.host}]"
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {host}" if origin.port == default_port else f"Host: {host}:{origin.port}",
        f"User-Agent: {_USER_AGENT}",
        "Accept-Encoding: identity",
        f"Content-Length: {length}",
    ]
    for name, value in headers.items():
        if any(c in name or c in value for c in "\r\n"):
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
