"""A tiny Ollama upstream for the page's tests whose answer is whatever text a test gives
it (the fake upstream only speaks its fixed words): ``/api/chat`` streams that text as NDJSON
in the pieces given, one every ``interval_s``, and records each request's body."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

_MODEL = "scripted-model"


@dataclass
class ScriptedUpstream:
    url: str = ""
    pieces: list[str] = field(default_factory=lambda: ["Hello", " there."])
    interval_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)

    def answer(self, pieces: list[str], *, interval_s: float = 0.0) -> None:
        self.pieces = list(pieces)
        self.interval_s = interval_s

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for piece in self.pieces:
            line = {"model": _MODEL, "message": {"role": "assistant", "content": piece}, "done": False}
            await response.write(orjson.dumps(line) + b"\n")
            if self.interval_s:
                await asyncio.sleep(self.interval_s)  # the pacing of a model, not a wait for anything
        final = {
            "model": _MODEL, "message": {"role": "assistant", "content": ""}, "done": True,
            "done_reason": "stop", "prompt_eval_count": 1, "eval_count": len(self.pieces),
        }
        await response.write(orjson.dumps(final) + b"\n")
        await response.write_eof()
        return response


async def _tags(request: web.Request) -> web.Response:
    return web.json_response({"models": [{"name": _MODEL, "model": _MODEL, "size": 1, "digest": "0" * 64}]})


async def _version(request: web.Request) -> web.Response:
    return web.json_response({"version": "0.0.0"})


async def start_scripted_upstream() -> tuple[ScriptedUpstream, web.AppRunner]:
    """Serve a :class:`ScriptedUpstream` on a free loopback port, in the running loop."""
    upstream = ScriptedUpstream()
    app = web.Application()
    app.router.add_post("/api/chat", upstream._chat)
    app.router.add_get("/api/tags", _tags)
    app.router.add_get("/api/version", _version)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    upstream.url = f"http://{host}:{port}"
    return upstream, runner
