"""Seed 004, the workshop chatbot: its frontend/index.html works against chatgate unchanged.

The page opens ``ws://host/ws/chat/session_<Date.now()>``, sends ``{message, agent:
"default"}`` and appends ``chunk`` contents until ``done``; history lives per session id.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from chatgate.chat.agents import GENERAL_PROMPT
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway

Frame = dict[str, Any]


async def ask(ws: ClientConnection, message: str, agent: str | None = "default") -> list[Frame]:
    """Send as the page does; every frame until ``done`` or ``error``, inclusive."""
    frame: Frame = {"message": message} if agent is None else {"message": message, "agent": agent}
    await ws.send(orjson.dumps(frame).decode())
    frames: list[Frame] = []
    while not frames or frames[-1]["type"] not in ("done", "error"):
        frames.append(orjson.loads(await asyncio.wait_for(ws.recv(), 10)))
    return frames


def assert_chunks(frames: list[Frame], text: str, agent: str = "default") -> None:
    """``frames`` are chunks that together carry ``text``; tokens that arrive while a chunk
    waits for the socket join it, so how many there are may vary."""
    assert frames and all(
        f == {"type": "chunk", "content": f["content"], "agent": agent} and f["content"] for f in frames
    ), frames
    assert "".join(f["content"] for f in frames) == text


def assert_streamed(frames: list[Frame], agent: str = "default") -> None:
    assert_chunks(frames[:-1], fake_reply(40), agent)
    assert frames[-1] == {"type": "done", "agent": agent}


def sent(fake: FakeLLM) -> list[Frame]:
    messages: list[Frame] = fake.requests()[-1]["body"]["messages"]
    return messages


async def test_chunks_then_done_and_history_per_session_id(gw: RunningGateway, fake: FakeLLM) -> None:
    url = gw.ws_url + "/ws/chat/session_1700000000000"
    async with connect(url) as ws:
        assert_streamed(await ask(ws, "Explain quantum computing in simple terms"))
        assert sent(fake)[0] == {"role": "system", "content": GENERAL_PROMPT}  # "default": the default agent
        assert_streamed(await ask(ws, "Shorter, please"))
    assert [m["content"] for m in sent(fake)[1:]] == [
        "Explain quantum computing in simple terms", fake_reply(40), "Shorter, please"
    ]

    async with connect(url) as ws:  # the same tab reconnecting keeps its session
        assert_streamed(await ask(ws, "And once more", agent=None))
    assert len(sent(fake)) == 1 + 5

    async with connect(gw.ws_url + "/ws/chat/session_1700000000001") as ws:  # another tab
        assert_streamed(await ask(ws, "Hello"))
    assert sent(fake)[1:] == [{"role": "user", "content": "Hello"}]


async def test_a_named_agent_answers_and_is_echoed(start_gateway: Any, fake: FakeLLM, tmp_path: Path) -> None:
    (tmp_path / "pirate.toml").write_text('system_prompt = "You are a friendly pirate."\n')
    with start_gateway(agents_dir=tmp_path) as gw:
        async with connect(gw.ws_url + "/ws/chat/session_2") as ws:
            assert_streamed(await ask(ws, "Ahoy?", agent="pirate"), agent="pirate")
            assert sent(fake)[0] == {"role": "system", "content": "You are a friendly pirate."}
            [error] = await ask(ws, "hello", agent="nobody")
            assert error.keys() == {"type", "content"} and error["type"] == "error"
            assert "nobody" in error["content"]


async def test_errors_are_error_frames_and_the_socket_stays_open(gw: RunningGateway, fake: FakeLLM) -> None:
    fake.fault("http_500", times=3)
    async with connect(gw.ws_url + "/ws/chat/session_3") as ws:
        [error] = await ask(ws, "hi")
        assert error.keys() == {"type", "content"} and error["type"] == "error" and error["content"]

        fake.fault("drop", after=4)
        frames = await ask(ws, "hi")
        assert_chunks(frames[:-1], fake_reply(4))
        assert frames[-1]["type"] == "error"

        [error] = await ask(ws, "")
        assert error == {"type": "error", "content": "message must be a non-empty string"}
        assert_streamed(await ask(ws, "still there?"))
