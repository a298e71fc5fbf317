"""Seed 002, the sequential-thinking integration: its frontend works against chatgate with
``?dialect=sequential`` on the WebSocket URL.

Per message: ``message_received`` → ``typing_start`` → ``message_start`` →
``message_chunk``… → ``message_complete`` → ``typing_stop``; errors are user-friendly
``error`` frames followed by ``typing_stop``. A ``session_id`` continues a conversation
across reconnects; 20 messages of history; idle sessions expire (five minutes by default);
a backup model answers when the primary cannot.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from chatgate.api.dialects import Peer, dialect_named
from chatgate.api.dialects.base import Chat
from chatgate.config import load_settings
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway, run_gateway

Frame = dict[str, Any]
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
FLOW = ["message_received", "typing_start", "message_start", "message_chunk", "message_complete", "typing_stop"]


async def recv(ws: ClientConnection) -> Frame:
    frame: Frame = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    return frame


async def ask(ws: ClientConnection, frame: Frame) -> list[Frame]:
    """Send one message; every frame until ``typing_stop``, inclusive."""
    await ws.send(orjson.dumps(frame).decode())
    frames = [await recv(ws)]
    while frames[-1]["type"] != "typing_stop":
        frames.append(await recv(ws))
    return frames


def flow(frames: list[Frame]) -> list[str]:
    """The frame types with repeated chunks collapsed."""
    types = [f["type"] for f in frames]
    return [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]]


def sent_turns(fake: FakeLLM) -> list[Frame]:
    system, *turns = fake.requests()[-1]["body"]["messages"]
    assert system["role"] == "system"
    return turns


async def test_each_message_flows_from_received_to_typing_stop(gw: RunningGateway) -> None:
    async with connect(gw.ws_url + "/ws?dialect=sequential") as ws:
        frames = await ask(ws, {"type": "message", "content": "Think step by step: 2+2?"})
    assert flow(frames) == FLOW
    assert all(TIMESTAMP.fullmatch(f["timestamp"]) for f in frames)
    received, typing_start, start, *chunks, complete, typing_stop = frames
    session_id = received["session_id"]
    assert isinstance(session_id, str) and session_id
    assert typing_start["session_id"] == typing_stop["session_id"] == session_id
    assert start == {**start, "role": "assistant", "model_used": "fake-model"}

    # Tokens that arrive while a chunk waits for the socket join it: one chunk or several.
    assert chunks
    accumulated = ""
    for chunk in chunks:
        accumulated += chunk["content"]
        assert chunk == {
            "type": "message_chunk",
            "role": "assistant",
            "content": chunk["content"],
            "accumulated_content": accumulated,
            "model_used": "fake-model",
            "timestamp": chunk["timestamp"],
        }
        assert chunk["content"]
    assert accumulated == fake_reply(40)
    assert complete == {
        **complete,
        "role": "assistant",
        "content": fake_reply(40),
        "model_used": "fake-model",
        "session_id": session_id,
    }


async def test_the_session_continues_on_the_socket_and_across_reconnects(gw: RunningGateway, fake: FakeLLM) -> None:
    async with connect(gw.ws_url + "/chat/ws?dialect=sequential") as ws:  # any path
        first = await ask(ws, {"message": "My name is Ada."})  # the {"message"} shape
        session_id = first[0]["session_id"]
        await ask(ws, {"type": "message", "content": "Nice to meet you."})
    assert [t["content"] for t in sent_turns(fake)] == ["My name is Ada.", fake_reply(40), "Nice to meet you."]

    async with connect(gw.ws_url + "/ws?dialect=sequential") as ws:
        frames = await ask(ws, {"type": "message", "content": "What is my name?", "session_id": session_id})
    assert frames[0]["session_id"] == session_id
    assert [t["content"] for t in sent_turns(fake)] == [
        "My name is Ada.", fake_reply(40), "Nice to meet you.", fake_reply(40), "What is my name?"
    ]

    async with connect(gw.ws_url + "/ws?dialect=sequential") as ws:  # no session id: a new session
        frames = await ask(ws, {"type": "message", "content": "Hello?"})
    assert frames[0]["session_id"] != session_id
    assert sent_turns(fake) == [{"role": "user", "content": "Hello?"}]


async def test_the_model_sees_the_last_20_messages(gw: RunningGateway, fake: FakeLLM) -> None:
    fake.configure(tokens=2)
    async with connect(gw.ws_url + "/ws?dialect=sequential") as ws:
        for n in range(12):
            await ask(ws, {"type": "message", "content": f"message {n}", "session_id": "s-window"})
    turns = sent_turns(fake)
    assert len(turns) == 21
    assert turns[0] == {"role": "user", "content": "message 1"}
    assert turns[-1] == {"role": "user", "content": "message 11"}


async def test_a_session_resets_after_the_configured_idle_time(
    monkeypatch: pytest.MonkeyPatch, fake: FakeLLM, tmp_path: Path
) -> None:
    """The seed's five-minute cleanup is CHATGATE_SEQUENTIAL_SESSION_TTL_S, handed to the
    chat service with each turn (the reset itself: tests/chat/test_service.py)."""
    monkeypatch.setenv("CHATGATE_SEQUENTIAL_SESSION_TTL_S", "42")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(provider="ollama", ollama_host=fake.url, model="fake-model", store="memory")
    with run_gateway(settings) as gw:
        dialect = dialect_named("sequential")(Peer(gw.gateway))
        command = await dialect.decode({"type": "message", "content": "hi", "session_id": "s-idle"})
    assert isinstance(command, Chat)
    assert (command.turn.conversation_id, command.turn.idle_reset_s) == ("s-idle", 42.0)


async def test_model_used_names_the_backup_model_when_it_answers(start_gateway: Any) -> None:
    with start_gateway(model="missing-model", fallback_models="fake-backup") as gw:
        async with connect(gw.ws_url + "/ws?dialect=sequential") as ws:
            frames = await ask(ws, {"type": "message", "content": "hi"})
    assert flow(frames) == FLOW
    assert {f["model_used"] for f in frames if "model_used" in f} == {"fake-backup"}


async def test_failures_are_friendly_error_frames_then_typing_stop(gw: RunningGateway, fake: FakeLLM) -> None:
    fake.fault("http_500", times=3)
    async with connect(gw.ws_url + "/ws?dialect=sequential") as ws:
        frames = await ask(ws, {"type": "message", "content": "hi", "session_id": "s-err"})
        assert [f["type"] for f in frames] == ["message_received", "typing_start", "error", "typing_stop"]
        error = frames[2]
        assert error["content"] == error["message"] == "The AI service could not answer this time. Please try again."
        assert TIMESTAMP.fullmatch(error["timestamp"])
        assert frames[3]["session_id"] == "s-err"

        for bad in ({"type": "message", "content": ""}, {"type": "dance"}, {"content": 5}):
            error, typing_stop = await ask(ws, bad)
            assert error["type"] == "error" and error["content"] == error["message"], bad
            assert typing_stop["type"] == "typing_stop"

        frames = await ask(ws, {"type": "message", "content": "and now?", "session_id": "s-err"})
        assert flow(frames) == FLOW
        await ws.send(orjson.dumps({"type": "ping"}).decode())
        assert (await recv(ws))["type"] == "pong"
