"""What the HTTP adapters share: the pooled session, one streamed POST (on connections of
its own, :mod:`chatgate.providers._upstream`), and the edge where transport failures
become provider errors."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson

from chatgate.providers._upstream import (
    StreamingConnections,
    UpstreamClosed,
    UpstreamResponse,
    UpstreamUnreachable,
)
from chatgate.providers.base import (
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


class StreamedBody:
    """A streamed answer's body: iterate :meth:`lines`; call :meth:`complete` once the final
    message is read, so the connection goes back to the pool instead of being closed."""

    def __init__(self, response: UpstreamResponse, provider: str, model: str) -> None:
        self.response = response
        self._provider = provider
        self._model = model

    async def lines(self) -> AsyncIterator[bytes]:
        """The body's lines without their line breaks; a last line without one counts.

        One read takes whatever has arrived and splits it here: a burst of lines from a
        fast upstream costs one wait. A line longer than :data:`MAX_LINE_BYTES` fails the
        stream instead of growing without bound."""
        parts: list[bytes] = []
        held = 0
        read = self.response.read_some
        while data := await read():
            if b"\n" not in data:
                parts.append(data)
                held += len(data)
                if held > MAX_LINE_BYTES:
                    raise ProviderStreamError(
                        f"{self._provider} sent a line over {MAX_LINE_BYTES} bytes",
                        provider=self._provider, model=self._model,
                    )
                continue
            if parts:
                parts.append(data)
                data = b"".join(parts)
            lines = data.split(b"\n")
            tail = lines.pop()
            parts, held = ([tail], len(tail)) if tail else ([], 0)
            for line in lines:
                yield line
        if parts:
            yield b"".join(parts)

    def complete(self) -> None:
        self.response.complete()


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


@asynccontextmanager
async def streamed_post(
    session: aiohttp.ClientSession,
    url: str,
    *,
    provider: str,
    model: str,
    base_url: str,
    status_error: Callable[[int, bytes, str], ProviderError],
    data: bytes,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
) -> AsyncIterator[StreamedBody]:
    """POST ``data`` to ``url`` on the streaming connections of ``session``
    (:mod:`chatgate.providers._upstream`) and hand over the streamed body. An HTTP error
    status raises ``status_error(status, body, model)``; failures raise provider errors;
    leaving early closes the upstream connection."""
    async with upstream_errors(provider, model, base_url):
        response = await streaming_connections(session).post(url, data, _outgoing(headers) or {}, params)
        try:
            if response.status >= 400:
                raise status_error(response.status, await response.read(), model)
            yield StreamedBody(response, provider, model)
        finally:
            response.close()


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
    """Translate aiohttp's failures into the provider error tree (see providers/base.py)."""
    try:
        yield
    except ProviderError:
        raise
    except UpstreamUnreachable as exc:
        raise ProviderUnavailable(
            f"{provider} is not reachable at {url}: {exc}", provider=provider, model=model
        ) from exc
    except UpstreamClosed as exc:
        raise ProviderStreamError(
            f"{provider} closed the connection mid-answer: {exc}", provider=provider, model=model
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        reason = exc.os_error.strerror or str(exc)
        raise ProviderUnavailable(
            f"{provider} is not reachable at {url}: {reason}", provider=provider, model=model
        ) from exc
    except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
        raise ProviderTimeout(
            f"{provider} did not answer in time ({url})", provider=provider, model=model
        ) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        raise ProviderStreamError(
            f"{provider} closed the connection mid-answer: {exc}", provider=provider, model=model
        ) from exc
    except aiohttp.ClientError as exc:
        raise ProviderError(f"{provider} request failed: {exc}", provider=provider, model=model) from exc


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
