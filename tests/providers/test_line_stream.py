"""LineStream: a streamed body's lines, however the upstream cut its writes, iterated or
pumped from the connection's callback (the way the chat service reads an answer)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from upstream import RawLines, read_all

from chatgate.providers import _http
from chatgate.providers._http import LineStream, streaming_connections
from chatgate.providers.base import Chunk, ProviderHTTPError, ProviderStreamError

Serve = Callable[[list[bytes]], Awaitable[str]]
BOUND_S = 5.0
#: Iterated, or its first chunk iterated and the rest pumped.
MODES = pytest.mark.parametrize("pumped", [False, True], ids=["iterated", "pumped"])
seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="")


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


def stream(session: aiohttp.ClientSession, url: str) -> LineStream:
    return LineStream(session, url, RawLines(), provider="test", model="m", base_url=url,
                      status_error=status_error, data=b"{}")


async def read_lines(session: aiohttp.ClientSession, url: str, pumped: bool) -> list[str]:
    return [c.text for c in await read_all(stream(session, url), pumped=pumped) if c.finish_reason is None]


@MODES
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
    session: aiohttp.ClientSession, serve: Serve, pieces: list[bytes], pumped: bool
) -> None:
    assert await read_lines(session, await serve(pieces), pumped) == ['{"a":1}', '{"b":2}', '{"c":3}']


@MODES
async def test_a_last_line_without_a_break_and_blank_lines_are_kept(
    session: aiohttp.ClientSession, serve: Serve, pumped: bool
) -> None:
    url = await serve([b"data: 1\r\n\r\n", b"data: 2\r\n", b"\r\ndata: [DONE]"])
    assert await read_lines(session, url, pumped) == ["data: 1\r", "\r", "data: 2\r", "\r", "data: [DONE]"]


@MODES
async def test_a_line_over_the_limit_fails_the_stream(
    session: aiohttp.ClientSession, serve: Serve, monkeypatch: pytest.MonkeyPatch, pumped: bool
) -> None:
    monkeypatch.setattr(_http, "MAX_LINE_BYTES", 1000)
    url = await serve([b"ok\n", *[b"x" * 300] * 5, b"\n"])
    chunks: list[Chunk] = []
    with pytest.raises(ProviderStreamError, match="line over 1000 bytes"):
        await read_all(stream(session, url), pumped=pumped, into=chunks)
    assert [c.text for c in chunks] == ["ok"]


async def test_the_sink_runs_in_the_context_of_the_task_that_pumps(
    session: aiohttp.ClientSession, serve: Serve
) -> None:
    """Pumped chunks are handed over in the socket's callback; what the pumping task had set
    (a trace, say) is what the sink sees."""
    url = await serve([b"a\n", b"b\n", b"c\n"])
    lines = stream(session, url)
    seen.set("the turn's")
    contexts = []

    def sink(chunk: Chunk) -> bool:
        contexts.append(seen.get())
        return False

    await anext(lines)
    await lines.pump(sink)
    await lines.aclose()
    assert contexts and set(contexts) == {"the turn's"}


async def test_a_sink_that_asks_to_stop_ends_the_answer_and_its_connection(
    session: aiohttp.ClientSession, serve: Serve
) -> None:
    """An answer cap: the sink says stop, the pump returns with what came so far, and the
    connection, whose answer was not read to its end, is closed rather than kept."""
    url = await serve([b"a\n", b"b\n", b"c\n", b"d\n"])
    lines = stream(session, url)
    taken = [(await anext(lines)).text]

    def sink(chunk: Chunk) -> bool:
        taken.append(chunk.text)
        return len(taken) == 2

    await asyncio.wait_for(lines.pump(sink), BOUND_S)
    await lines.aclose()
    assert taken == ["a", "b"]
    assert not any(streaming_connections(session)._idle.values())


async def test_a_sink_that_fails_fails_the_pump_not_the_connection_callback(
    session: aiohttp.ClientSession, serve: Serve
) -> None:
    url = await serve([b"a\n", b"b\n"])
    lines = stream(session, url)
    await anext(lines)

    def sink(chunk: Chunk) -> bool:
        raise RuntimeError("the consumer broke")

    with pytest.raises(RuntimeError, match="the consumer broke"):
        await asyncio.wait_for(lines.pump(sink), BOUND_S)
    await lines.aclose()


async def test_an_answer_read_to_its_end_keeps_its_connection_either_way(
    session: aiohttp.ClientSession, serve: Serve
) -> None:
    url = await serve([b"a\n", b'{"done":true}\n'])
    for pumped in (False, True):
        chunks = await read_all(stream(session, url), pumped=pumped)
        assert [c.finish_reason for c in chunks] == [None, "stop"]
    async with asyncio.timeout(BOUND_S):  # the chunked body's end may come a moment later
        while not any(streaming_connections(session)._idle.values()):
            await asyncio.sleep(0.005)
