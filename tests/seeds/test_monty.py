"""Seed 000, the Monty gateway: its browser client works against chatgate unchanged.

The client connects to ``/chat/ws`` (or the alias ``/ws/chat``), sends
``{"message", "task_id"}`` and renders ``{"task_id", "event_type", "content"}`` events:
``content`` tokens until ``completed``, or ``error``. Configuration: ``GATEWAY_PORT``,
``OLLAMA_HOST``, ``OLLAMA_MODEL``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from chatgate.chat.agents import GENERAL_PROMPT
from chatgate.config import load_settings
from chatgate.providers.ollama import OllamaSettings
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway, free_port, run_gateway, wait_until

Frame = dict[str, Any]


async def ask(ws: ClientConnection, frame: Frame) -> list[Frame]:
    """Send one Monty frame; every event until ``completed`` or ``error``, inclusive."""
    await ws.send(orjson.dumps(frame).decode())
    events: list[Frame] = []
    while not events or events[-1]["event_type"] not in ("completed", "error"):
        events.append(orjson.loads(await asyncio.wait_for(ws.recv(), 10)))
    return events


def assert_content(events: list[Frame], task_id: Any, text: str) -> None:
    """``events`` are content events that together carry ``text``; tokens that arrive while
    one waits for the socket join it, so how many there are may vary."""
    assert events and all(
        e == {"task_id": task_id, "event_type": "content", "content": e["content"]} and e["content"] for e in events
    ), events
    assert "".join(e["content"] for e in events) == text


def assert_streamed(events: list[Frame], task_id: Any, tokens: int = 40) -> None:
    assert_content(events[:-1], task_id, fake_reply(tokens))
    assert events[-1] == {"task_id": task_id, "event_type": "completed", "content": ""}


@pytest.mark.parametrize("path", ["/chat/ws", "/ws/chat"])
async def test_tokens_stream_as_content_events_and_history_lives_per_connection(
    gw: RunningGateway, fake: FakeLLM, path: str
) -> None:
    async with connect(gw.ws_url + path) as ws:
        assert_streamed(await ask(ws, {"message": "Who is Chris?", "task_id": "task-1"}), "task-1")
        # Versions of its client name the text `content` or `prompt`; task ids may be numbers.
        assert_streamed(await ask(ws, {"content": "And his work?", "task_id": 2}), 2)
        assert_streamed(await ask(ws, {"prompt": "Summarise.", "task_id": "task-3"}), "task-3")

    system, *turns = fake.requests()[-1]["body"]["messages"]
    assert system == {"role": "system", "content": system["content"]}
    assert system["content"].startswith(GENERAL_PROMPT)
    assert turns == [
        {"role": "user", "content": "Who is Chris?"},
        {"role": "assistant", "content": fake_reply(40)},
        {"role": "user", "content": "And his work?"},
        {"role": "assistant", "content": fake_reply(40)},
        {"role": "user", "content": "Summarise."},
    ]

    async with connect(gw.ws_url + path) as ws:  # a new connection starts afresh
        await ask(ws, {"message": "Hello again", "task_id": "task-4"})
    assert [m["role"] for m in fake.requests()[-1]["body"]["messages"]] == ["system", "user"]


async def test_a_message_over_the_size_limit_is_an_error_on_either_path(gw: RunningGateway) -> None:
    for path in ("/ws/chat", "/chat/ws"):  # on /ws/chat, frames may be larger (CS_Agent's history)
        async with connect(gw.ws_url + path) as ws:
            [error] = await ask(ws, {"message": "x" * 20_000, "task_id": "big"})
            assert error == {"task_id": "big", "event_type": "error", "content": error["content"]}
            assert "larger than 16384 bytes" in error["content"]


async def test_a_missing_task_id_is_made_up_and_echoed(gw: RunningGateway) -> None:
    async with connect(gw.ws_url + "/chat/ws") as ws:
        events = await ask(ws, {"message": "hi"})
    task_ids = {e["task_id"] for e in events}
    assert len(task_ids) == 1 and isinstance(task_ids.pop(), str)
    assert events[-1]["event_type"] == "completed"


async def test_upstream_failure_is_an_error_event_and_the_socket_stays_open(
    start_gateway: Any, fake: FakeLLM
) -> None:
    with start_gateway(model="missing-model") as gw:
        async with connect(gw.ws_url + "/chat/ws") as ws:
            [error] = await ask(ws, {"message": "hi", "task_id": "t-1"})
            assert error.keys() == {"task_id", "event_type", "content"}
            assert error["task_id"] == "t-1" and error["event_type"] == "error"
            assert "missing-model" in error["content"]

            [bad] = await ask(ws, {"message": "", "task_id": "t-2"})
            assert bad == {"task_id": "t-2", "event_type": "error", "content": "message must be a non-empty string"}


async def test_an_upstream_that_keeps_failing_is_an_error_event(gw: RunningGateway, fake: FakeLLM) -> None:
    fake.fault("http_500", times=3)  # every attempt fails
    async with connect(gw.ws_url + "/ws/chat") as ws:
        [error] = await ask(ws, {"message": "hi", "task_id": "t-1"})
        assert error["task_id"] == "t-1" and error["event_type"] == "error" and error["content"]
        assert_streamed(await ask(ws, {"message": "again", "task_id": "t-2"}), "t-2")


async def test_an_error_after_the_first_tokens_ends_the_task_with_an_error(gw: RunningGateway, fake: FakeLLM) -> None:
    fake.fault("drop", after=5)
    async with connect(gw.ws_url + "/chat/ws") as ws:
        events = await ask(ws, {"message": "hi", "task_id": "t-1"})
    assert_content(events[:-1], "t-1", fake_reply(5))
    assert events[-1]["event_type"] == "error" and events[-1]["task_id"] == "t-1"


async def test_seed_environment_names_configure_the_gateway(
    monkeypatch: pytest.MonkeyPatch, fake: FakeLLM, tmp_path: Path
) -> None:
    port = free_port()
    monkeypatch.setenv("GATEWAY_PORT", str(port))
    monkeypatch.setenv("OLLAMA_HOST", fake.url.removeprefix("http://"))  # host:port, as Ollama takes it
    monkeypatch.setenv("OLLAMA_MODEL", "llama3.2:latest")
    monkeypatch.setenv("CHATGATE_STORE", "memory")
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.port == port
    assert settings.upstream(OllamaSettings).ollama_host == fake.url
    assert settings.model == "llama3.2:latest"

    with run_gateway(settings) as gw:
        async with connect(gw.ws_url + "/chat/ws") as ws:
            assert_streamed(await ask(ws, {"message": "hi", "task_id": "t"}), "t")
    assert fake.requests()[-1]["body"]["model"] == "llama3.2:latest"


async def test_chatgate_serve_listens_on_gateway_port(fake: FakeLLM, tmp_path: Path) -> None:
    """What the seed's start script did, with chatgate in its place: the port comes from
    GATEWAY_PORT."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHATGATE_")}
    env |= {"GATEWAY_PORT": str(port), "OLLAMA_HOST": fake.url, "OLLAMA_MODEL": "fake-model",
            "CHATGATE_STORE": "memory"}
    server = subprocess.Popen(
        [sys.executable, "-m", "chatgate", "serve"], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                assert server.poll() is None, "chatgate serve exited"
                return False

        wait_until(healthy, timeout=30, what="chatgate serve on GATEWAY_PORT")
        async with connect(f"ws://127.0.0.1:{port}/chat/ws") as ws:
            assert_streamed(await ask(ws, {"message": "hi", "task_id": "t"}), "t")
    finally:
        server.terminate()
        server.wait(timeout=10)
