"""What the HTTP adapters share: the pooled session, one streamed POST with its read-gap
watch, and the aiohttp-to-ProviderError edge."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson

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
    """One pooled session per upstream. ``read_timeout_s`` bounds the gap between two
    reads, not the whole answer, so a long generation is never cut off while it streams:
    aiohttp enforces it until the response headers arrive, :class:`ReadGapWatch` after."""
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


class ReadGapWatch:
    """Fails a streamed body that has received nothing for ``gap_s``.

    aiohttp's own read timeout re-arms a timer on every chunk received, which for thousands
    of token streams was a top cost of the gateway (bench/RESULTS.md). This looks at the
    body's byte count four times per period instead: a stalled upstream fails between
    ``gap_s`` and 1.25 times ``gap_s`` after its last byte, and a flowing one costs nothing per read.
    """

    CHECKS_PER_PERIOD = 4

    def __init__(self, response: aiohttp.ClientResponse, gap_s: float) -> None:
        self._content = response.content
        self._gap_s = gap_s
        self._seen = self._content.total_bytes
        self._quiet_checks = 0
        self._loop = asyncio.get_running_loop()
        if response.connection is not None:
            response.connection.protocol.read_timeout = None  # type: ignore[union-attr]
        self._handle = self._loop.call_later(gap_s / self.CHECKS_PER_PERIOD, self._check)

    def _check(self) -> None:
        total = self._content.total_bytes
        if total != self._seen:
            self._seen, self._quiet_checks = total, 0
        else:
            self._quiet_checks += 1
            if self._quiet_checks >= self.CHECKS_PER_PERIOD:
                self._content.set_exception(
                    aiohttp.ServerTimeoutError(f"no data from the upstream for {self._gap_s:g} s")
                )
                return
        self._handle = self._loop.call_later(self._gap_s / self.CHECKS_PER_PERIOD, self._check)

    def stop(self) -> None:
        self._handle.cancel()


class StreamedBody:
    """A streamed answer's body: iterate :meth:`lines`; call :meth:`complete` once the final
    message is read, so the connection goes back to the pool instead of being closed."""

    def __init__(self, response: aiohttp.ClientResponse, provider: str, model: str) -> None:
        self.response = response
        self._provider = provider
        self._model = model
        self._complete = False
        self._watch: ReadGapWatch | None = None

    async def lines(self) -> AsyncIterator[bytes]:
        """The body's lines without their line breaks; a last line without one counts.

        One read takes whatever has arrived and splits it here, where aiohttp's ``readline``
        would search, iterate and wait once per line: a burst of lines from a fast upstream
        costs a third as much. A line longer than :data:`MAX_LINE_BYTES` fails the
        stream instead of growing without bound."""
        content = self.response.content
        parts: list[bytes] = []
        held = 0
        while data := await content.readany():
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
        self._complete = True

    def watch(self, gap_s: float | None) -> None:
        if gap_s:
            self._watch = ReadGapWatch(self.response, gap_s)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        if self._complete:
            self.response.release()
        else:
            self.response.close()  # a cancelled or broken answer: the upstream stops generating


@asynccontextmanager
async def streamed_post(
    session: aiohttp.ClientSession,
    url: str,
    *,
    provider: str,
    model: str,
    base_url: str,
    status_error: Callable[[int, bytes, str], ProviderError],
    **request: Any,
) -> AsyncIterator[StreamedBody]:
    """POST ``url`` (``request`` as for aiohttp) and hand over the streamed body. An HTTP
    error status raises ``status_error(status, body, model)``; aiohttp's failures raise
    provider errors; leaving early closes the upstream connection."""
    if OUTGOING_HEADERS:
        request["headers"] = _outgoing(request.get("headers"))
    async with upstream_errors(provider, model, base_url):
        response = await session.post(url, **request)
        body = StreamedBody(response, provider, model)
        try:
            if response.status >= 400:
                raise status_error(response.status, await response.read(), model)
            body.watch(session.timeout.sock_read)
            yield body
        finally:
            body.close()


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
