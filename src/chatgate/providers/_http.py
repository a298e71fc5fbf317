"""What the HTTP adapters share: the pooled session, one streamed POST (on connections of
its own, :mod:`chatgate.providers._upstream`), and the edge where transport failures
become provider errors."""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn, Protocol

import aiohttp
import orjson

from chatgate.providers._upstream import (
    StreamingConnections,
    UpstreamClosed,
    UpstreamResponse,
    UpstreamUnreachable,
)
from chatgate.providers.base import (
    Chunk,
    ChunkSink,
    ProviderError,
    ProviderStreamError,
    ProviderTimeout,
    ProviderUnavailable,
)

#: A streamed body's longest line; an upstream's token lines are a few hundred bytes.
MAX_LINE_BYTES = 16 * 1024 * 1024
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
#: Called on the headers of every generation and embeddings request to an upstream, in
#: the task making it: tracing adds ``traceparent`` here. Empty, it costs one test.
OUTGOING_HEADERS: list[Callable[[dict[str, str]], None]] = []


def _outgoing(headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
    if not OUTGOING_HEADERS:
        return headers
    extended = dict(headers or {})
    for add in OUTGOING_HEADERS:
        add(extended)
    return extended


def new_session(*, connect_timeout_s: float, read_timeout_s: float) -> aiohttp.ClientSession:
    """One pooled session per upstream, for its calls that do not stream; streamed answers
    take the connections :func:`streaming_connections` keeps beside it, with its timeouts.
    ``read_timeout_s`` bounds the gap between two reads, not the whole answer."""
    timeout = aiohttp.ClientTimeout(
        total=None, connect=connect_timeout_s, sock_connect=connect_timeout_s, sock_read=read_timeout_s
    )
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
    return aiohttp.ClientSession(
        timeout=timeout,
        connector=connector,
        json_serialize=lambda obj: orjson.dumps(obj).decode(),
        auto_decompress=True,
        trust_env=False,
    )


_STREAMING: weakref.WeakKeyDictionary[aiohttp.ClientSession, StreamingConnections] = weakref.WeakKeyDictionary()


def streaming_connections(session: aiohttp.ClientSession) -> StreamingConnections:
    """The connections streamed answers take, beside ``session`` and with its timeouts:
    ``sock_connect`` to connect, ``sock_read`` for the answer's headers and then as the
    longest gap between two reads of its body (never the whole answer, so a long
    generation is not cut off while it streams)."""
    connections = _STREAMING.get(session)
    if connections is None:
        connections = _STREAMING[session] = StreamingConnections(
            connect_timeout_s=session.timeout.sock_connect, read_timeout_s=session.timeout.sock_read
        )
    return connections


async def close_session(session: aiohttp.ClientSession) -> None:
    """Close ``session`` and the streaming connections kept beside it."""
    connections = _STREAMING.pop(session, None)
    if connections is not None:
        connections.close()
    await session.close()


class LineDecoder(Protocol):
    """An adapter's reading of its upstream's streamed lines (NDJSON, SSE)."""

    def decode(self, line: bytes) -> Sequence[Chunk]:
        """The chunks of one line (none for a blank or bookkeeping line), without its line
        break; the answer's last chunk carries ``finish_reason``. An error line raises."""
        ...

    def end(self) -> Chunk:
        """The body ended before a last chunk: make it, or raise why the answer is broken."""
        ...


class LineStream:
    """A streamed POST whose body is lines, decoded into chunks by ``decoder``.

    Iterate it (each read takes whatever has arrived and splits it: a burst of lines from a
    fast upstream costs one wait), or :meth:`pump` it: the body's bytes are then split and
    decoded in the connection's callback and each chunk handed on there, with no task
    switch per token. A line longer than :data:`MAX_LINE_BYTES` fails the stream instead of
    growing without bound. An HTTP error status raises ``status_error(status, body,
    model)``, transport failures raise provider errors, and closing the stream before its
    last chunk closes the upstream connection (the upstream stops generating)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        decoder: LineDecoder,
        *,
        provider: str,
        model: str,
        base_url: str,
        status_error: Callable[[int, bytes, str], ProviderError],
        data: bytes,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> None:
        self._session = session
        self._url = url
        self._decoder = decoder
        self._provider = provider
        self._model = model
        self._base_url = base_url
        self._status_error = status_error
        self._data = data
        self._headers = headers
        self._params = params
        self._response: UpstreamResponse | None = None
        self._pending: deque[Chunk] = deque()
        #: The start of a line whose end has not come yet, and its length.
        self._parts: list[bytes] = []
        self._held = 0
        #: The last chunk is decoded, or the consumer wants no more.
        self._finished = False
        #: What ended an iterated answer, raised once the chunks decoded before it are taken.
        self._failure: Exception | None = None
        self._sink: ChunkSink | None = None
        self._pumped: asyncio.Future[None] | None = None
        self._context: contextvars.Context | None = None

    def __aiter__(self) -> LineStream:
        return self

    async def __anext__(self) -> Chunk:
        while not self._pending:
            if self._failure is not None:
                self._raise(self._failure)
            if self._finished:
                raise StopAsyncIteration
            try:
                if self._response is None:
                    await self._open()
                    continue
                data = await self._response.read_some()
                if data:
                    self._feed(data)
                else:
                    self._feed_end()
            except Exception as exc:
                self._failure = exc  # after the chunks its read had decoded before it
        return self._pending.popleft()

    async def pump(self, sink: ChunkSink) -> None:
        """See :class:`chatgate.providers.base.PushedChunks`. The sink runs in the context
        of the task that called this (its trace, say), not the socket's."""
        while self._pending:
            if sink(self._pending.popleft()):
                self._finished = True
                return
        if self._failure is not None:
            self._raise(self._failure)
        if self._finished:
            return
        try:
            if self._response is None:
                await self._open()
            assert self._response is not None
            self._pumped = asyncio.get_running_loop().create_future()
            self._sink = sink
            self._context = contextvars.copy_context()
            self._response.deliver_to(self._pushed, self._ended)
            await self._pumped
        except Exception as exc:
            self._raise(exc)
        finally:
            self._sink = self._pumped = self._context = None

    async def aclose(self) -> None:
        self._finished = True
        self._pending.clear()
        if self._response is not None:
            self._response.close()

    async def _open(self) -> None:
        response = await streaming_connections(self._session).post(
            self._url, self._data, _outgoing(self._headers) or {}, self._params
        )
        if response.status >= 400:
            try:
                body = await response.read()
            finally:
                response.close()
            raise self._status_error(response.status, body, self._model)
        self._response = response

    def _feed(self, data: bytes) -> None:
        """Decode the lines ``data`` completes; a line's start waits for its end."""
        if b"\n" not in data:
            self._parts.append(data)
            self._held += len(data)
            if self._held > MAX_LINE_BYTES:
                raise ProviderStreamError(
                    f"{self._provider} sent a line over {MAX_LINE_BYTES} bytes",
                    provider=self._provider, model=self._model,
                )
            return
        if self._parts:
            self._parts.append(data)
            data = b"".join(self._parts)
        lines = data.split(b"\n")
        tail = lines.pop()
        self._parts, self._held = ([tail], len(tail)) if tail else ([], 0)
        for line in lines:
            self._take(self._decoder.decode(line))
            if self._finished:
                return

    def _feed_end(self) -> None:
        """The body ended: its last line (one without a line break counts), then the end."""
        if self._parts:
            line = b"".join(self._parts)
            self._parts, self._held = [], 0
            self._take(self._decoder.decode(line))
        if not self._finished:
            self._take((self._decoder.end(),))
            self._finished = True

    def _take(self, chunks: Sequence[Chunk]) -> None:
        for chunk in chunks:
            if chunk.finish_reason is not None:
                self._finished = True
                assert self._response is not None
                self._response.complete()
            if self._sink is None:
                self._pending.append(chunk)
            elif self._sink(chunk):
                self._finished = True
            if self._finished:
                return

    # Pushed: called from the connection's callbacks ------------------------------------

    def _pushed(self, data: bytes) -> None:
        if self._finished or self._context is None:
            return
        try:
            self._context.run(self._feed, data)
        except Exception as exc:
            self._settle(exc)
            return
        if self._finished:
            self._settle(None)

    def _ended(self, error: BaseException | None) -> None:
        if error is None and not self._finished and self._context is not None:
            try:
                self._context.run(self._feed_end)
            except Exception as exc:
                error = exc
        self._settle(error)

    def _settle(self, error: BaseException | None) -> None:
        pumped = self._pumped
        if pumped is None or pumped.done():
            return
        if error is None:
            pumped.set_result(None)
        else:
            pumped.set_exception(error)

    def _raise(self, exc: Exception) -> NoReturn:
        self._failure, self._finished = None, True  # a failed answer has nothing more
        mapped = provider_error(exc, self._provider, self._model, self._base_url)
        if mapped is exc:
            raise exc
        raise mapped from exc


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    payload: Any,
    *,
    provider: str,
    model: str,
    base_url: str,
    status_error: Callable[[int, bytes, str], ProviderError],
    headers: dict[str, str],
) -> Any:
    """POST ``payload`` as JSON and return the decoded answer, for calls that do not stream
    (embeddings); failures raise as :func:`streamed_post`'s do."""
    async with upstream_errors(provider, model, base_url):
        async with session.post(url, data=orjson.dumps(payload), headers=_outgoing(headers)) as response:
            body = await response.read()
            if response.status >= 400:
                raise status_error(response.status, body, model)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProviderError(
            f"{provider} answered with a body that is not JSON", provider=provider, model=model
        ) from exc


@asynccontextmanager
async def upstream_errors(provider: str, model: str, url: str) -> AsyncIterator[None]:
    """Raise transport failures as provider errors (:func:`provider_error`)."""
    try:
        yield
    except Exception as exc:
        mapped = provider_error(exc, provider, model, url)
        if mapped is exc:
            raise
        raise mapped from exc


def provider_error(exc: Exception, provider: str, model: str, url: str) -> Exception:
    """``exc`` in the provider error tree (see providers/base.py): a transport failure
    translated, anything else as it is."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, UpstreamUnreachable):
        return ProviderUnavailable(f"{provider} is not reachable at {url}: {exc}", provider=provider, model=model)
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or str(exc)
        return ProviderUnavailable(f"{provider} is not reachable at {url}: {reason}", provider=provider, model=model)
    if isinstance(exc, (aiohttp.ServerTimeoutError, TimeoutError)):
        return ProviderTimeout(f"{provider} did not answer in time ({url})", provider=provider, model=model)
    if isinstance(exc, (UpstreamClosed, aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return ProviderStreamError(f"{provider} closed the connection mid-answer: {exc}", provider=provider, model=model)
    if isinstance(exc, aiohttp.ClientError):
        return ProviderError(f"{provider} request failed: {exc}", provider=provider, model=model)
    return exc


def error_text(body: bytes) -> str:
    """The human part of an upstream error body, in Ollama's or OpenAI's shape."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace").strip()[:500] or "no detail"
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data))
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500]
        return str(err)[:500]
    return str(data)[:500]
