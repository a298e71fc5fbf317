"""Seed 001, CS_Agent: its frontend works against chatgate unchanged.

The client connects to ``/ws/chat``, sends ``{"messages": [...], "model"?}``, ``{"type":
"ping"}`` and ``{"type": "clear_history"}``, and reads ``delta``/``done``/``error``/
``pong``/``history_cleared``. ``GET /health`` reports Ollama connectivity. Configuration:
``OLLAMA_URL``, ``OLLAMA_MODEL``, ``OLLAMA_DEBUG``, ``MAX_MESSAGE_SIZE``,
``HISTORY_MAX_LENGTH``, ``REQUEST_TIMEOUT``, ``CONNECT_TIMEOUT``, ``CORS_ORIGINS``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from chatgate.config import load_settings
from chatgate.providers.ollama import OllamaSettings
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway, run_gateway

Frame = dict[str, Any]


def user(text: str) -> Frame:
    return {"role": "user", "content": text}


def assistant(text: str) -> Frame:
    return {"role": "assistant", "content": text}


async def recv(ws: ClientConnection) -> Frame:
    frame: Frame = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    return frame


async def send(ws: ClientConnection, frame: Frame) -> None:
    await ws.send(orjson.dumps(frame).decode())


async def ask(ws: ClientConnection, frame: Frame) -> list[Frame]:
    """Send a messages frame; every frame until ``done`` or ``error``, inclusive."""
    await send(ws, frame)
    frames = [await recv(ws)]
    while frames[-1]["type"] not in ("done", "error"):
        frames.append(await recv(ws))
    return frames


def assert_deltas(frames: list[Frame], text: str) -> None:
    """``frames`` are delta frames that together carry ``text``; tokens that arrive while a
    delta waits for the socket join it, so how many there are may vary."""
    assert frames and all(f.keys() == {"type", "text"} and f["type"] == "delta" and f["text"] for f in frames), frames
    assert "".join(f["text"] for f in frames) == text


def assert_streamed(frames: list[Frame], tokens: int = 40) -> None:
    assert_deltas(frames[:-1], fake_reply(tokens))
    assert frames[-1] == {"type": "done"}


def sent_turns(fake: FakeLLM) -> list[Frame]:
    """What the upstream received last, without the system prompt."""
    system, *turns = fake.requests()[-1]["body"]["messages"]
    assert system["role"] == "system"
    return turns


async def test_single_messages_continue_the_sockets_conversation_from_server_memory(
    gw: RunningGateway, fake: FakeLLM
) -> None:
    async with connect(gw.ws_url + "/ws/chat") as ws:
        assert_streamed(await ask(ws, {"messages": [user("Hello")], "model": "fake-model"}))
        assert_streamed(await ask(ws, {"messages": [user("What did I say?")]}))
    assert sent_turns(fake) == [user("Hello"), assistant(fake_reply(40)), user("What did I say?")]
    assert fake.requests()[-1]["body"]["model"] == "fake-model"


async def test_a_longer_list_is_the_clients_own_history_and_is_not_stored_twice(
    gw: RunningGateway, fake: FakeLLM
) -> None:
    async with connect(gw.ws_url + "/ws/chat") as ws:
        own = [user("u1"), assistant("a1"), user("u2")]
        assert_streamed(await ask(ws, {"messages": own}))
        assert sent_turns(fake) == own
        assert_streamed(await ask(ws, {"messages": [*own, assistant(fake_reply(40)), user("u3")]}))
        assert sent_turns(fake) == [*own, assistant(fake_reply(40)), user("u3")]
        # Server memory holds each turn once: only the new message and its answer were stored.
        assert_streamed(await ask(ws, {"messages": [user("u4")]}))
    assert sent_turns(fake) == [
        user("u2"), assistant(fake_reply(40)), user("u3"), assistant(fake_reply(40)), user("u4")
    ]


async def test_ping_and_clear_history(gw: RunningGateway, fake: FakeLLM) -> None:
    async with connect(gw.ws_url + "/ws/chat") as ws:
        await send(ws, {"type": "ping"})  # the first frame: /ws/chat knows it is CS_Agent
        assert await recv(ws) == {"type": "pong"}
        await ask(ws, {"messages": [user("remember me")]})
        await send(ws, {"type": "clear_history"})
        assert await recv(ws) == {"type": "history_cleared"}
        await ask(ws, {"messages": [user("who am I?")]})
    assert sent_turns(fake) == [user("who am I?")]


async def test_errors_are_error_frames_and_the_socket_stays_open(gw: RunningGateway, fake: FakeLLM) -> None:
    async with connect(gw.ws_url + "/ws/chat") as ws:
        [error] = await ask(ws, {"messages": [user("hi")], "model": "missing-model"})
        assert error.keys() == {"type", "error"} and error["type"] == "error"
        assert "missing-model" in error["error"]

        fake.fault("http_500", times=3)
        [error] = await ask(ws, {"messages": [user("hi")]})
        assert error["type"] == "error" and error["error"]

        for bad in ({"messages": []}, {"messages": [assistant("no question")]}, {"messages": "hi"},
                    {"messages": [{"role": "wizard", "content": "x"}]}, {"type": "dance"}):
            [error] = await ask(ws, bad)
            assert error.keys() == {"type", "error"} and error["type"] == "error", bad

        fake.fault("drop", after=3)
        frames = await ask(ws, {"messages": [user("hi")]})
        assert_deltas(frames[:-1], fake_reply(3))
        assert frames[-1]["type"] == "error"

        assert_streamed(await ask(ws, {"messages": [user("still there?")]}))


async def test_health_reports_ollama_connectivity(
    gw: RunningGateway, start_gateway: Any, closed_port_url: str
) -> None:
    health = httpx.get(f"{gw.url}/health").json()
    assert health["status"] == "ok"
    assert health["checks"]["provider"]["status"] == "ok"
    assert health["checks"]["provider"]["name"] == "ollama"

    with start_gateway(ollama_host=closed_port_url) as down:
        response = httpx.get(f"{down.url}/health")
    assert response.status_code == 200
    assert response.json()["status"] == "degraded"
    assert response.json()["checks"]["provider"]["status"] == "down"


async def test_seed_environment_names_configure_the_gateway(
    monkeypatch: pytest.MonkeyPatch, fake: FakeLLM, tmp_path: Path
) -> None:
    for name, value in {
        "OLLAMA_URL": fake.url,
        "OLLAMA_MODEL": "gpt-oss:20b",
        "OLLAMA_DEBUG": "1",
        "MAX_MESSAGE_SIZE": "1024",
        "HISTORY_MAX_LENGTH": "2",
        "REQUEST_TIMEOUT": "30.0",
        "CONNECT_TIMEOUT": "5.0",
        "CORS_ORIGINS": "http://localhost:5173,http://localhost:3000",
        "CHATGATE_STORE": "memory",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert (settings.upstream(OllamaSettings).ollama_host, settings.model, settings.log_level) == (
        fake.url, "gpt-oss:20b", "debug"
    )
    assert (settings.max_message_bytes, settings.memory_max_turns) == (1024, 2)
    assert (settings.request_timeout_s, settings.connect_timeout_s) == (30.0, 5.0)
    assert settings.cors_origin_list == ["http://localhost:5173", "http://localhost:3000"]

    with run_gateway(settings) as gw:
        with pytest.raises(Exception, match="403"):
            async with connect(gw.ws_url + "/ws/chat", origin="http://evil.example"):  # type: ignore[arg-type]
                pass
        async with connect(gw.ws_url + "/ws/chat", origin="http://localhost:5173") as ws:  # type: ignore[arg-type]
            for text in ("one", "two", "three"):
                assert_streamed(await ask(ws, {"messages": [user(text)]}))
            # HISTORY_MAX_LENGTH: the model sees the last 2 messages of history.
            assert sent_turns(fake) == [user("two"), assistant(fake_reply(40)), user("three")]
            assert fake.requests()[-1]["body"]["model"] == "gpt-oss:20b"

            # MAX_MESSAGE_SIZE bounds the message; the socket stays open.
            [error] = await ask(ws, {"messages": [user("x" * 1025)]})
            assert error == {"type": "error", "error": "message larger than 1024 bytes"}
            await send(ws, {"type": "ping"})
            assert await recv(ws) == {"type": "pong"}
        health = httpx.get(f"{gw.url}/health").json()
        assert health["checks"]["provider"] == {**health["checks"]["provider"], "status": "ok", "model": "gpt-oss:20b"}
