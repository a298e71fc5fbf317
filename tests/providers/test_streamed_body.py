"""StreamedBody.lines: the lines of a streamed body, however the upstream cut its writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from chatgate.providers import _http
from chatgate.providers._http import streamed_post
from chatgate.providers.base import ProviderHTTPError, ProviderStreamError

Serve = Callable[[list[bytes]], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start a loopback server whose POST answers with ``pieces``, each written and
    flushed on its own, a loop turn apart."""
    runners: list[web.AppRunner] = []

    async def start(pieces: list[bytes]) -> str:
        async def answer(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            for piece in pieces:
                await response.write(piece)
                await asyncio.sleep(0)
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_post("/stream", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}/stream"

    yield start
    for runner in runners:
        await runner.cleanup()


def status_error(status: int, body: bytes, model: str) -> ProviderHTTPError:
    return ProviderHTTPError(f"status {status}", status=status, provider="test", model=model)


async def read_lines(session: aiohttp.ClientSession, url: str) -> list[bytes]:
    async with streamed_post(
        session, url, provider="test", model="m", base_url=url, status_error=status_error, data=b"{}"
    ) as body:
        return [line async for line in body.lines()]


@pytest.mark.parametrize(
    "pieces",
    [
        [b'{"a":1}\n{"b":2}\n{"c":3}\n'],
        [b'{"a"', b":1}\n", b'{"b":2}\n{"c"', b":3}\n"],
        [b"{", b'"a":1', b"}", b"\n", b'{"b":2}\n', b'{"c":3}', b"\n"],
    ],
    ids=["one-write", "lines-cut-across-writes", "byte-groups"],
)
async def test_lines_come_out_whole_however_the_writes_were_cut(
    session: aiohttp.ClientSession, serve: Serve, pieces: list[bytes]
) -> None:
    assert await read_lines(session, await serve(pieces)) == [b'{"a":1}', b'{"b":2}', b'{"c":3}']


async def test_a_last_line_without_a_break_and_blank_lines_are_kept(
    session: aiohttp.ClientSession, serve: Serve
) -> None:
    url = await serve([b"data: 1\r\n\r\n", b"data: 2\r\n", b"\r\ndata: [DONE]"])
    assert await read_lines(session, url) == [b"data: 1\r", b"\r", b"data: 2\r", b"\r", b"data: [DONE]"]


async def test_a_line_over_the_limit_fails_the_stream(
    session: aiohttp.ClientSession, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_http, "MAX_LINE_BYTES", 1000)
    url = await serve([b"ok\n", *[b"x" * 300] * 5, b"\n"])
    lines: list[bytes] = []
    with pytest.raises(ProviderStreamError, match="line over 1000 bytes"):
        async with streamed_post(
            session, url, provider="test", model="m", base_url=url, status_error=status_error, data=b"{}"
        ) as body:
            async for line in body.lines():
                lines.append(line)
    assert lines == [b"ok"]
