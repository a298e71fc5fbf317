"""A gateway killed mid-answer (``kill -9``: no shutdown code runs) loses no more than
the last moment of the turn: the user's message and the answer so far are in history,
marked partial, and a client resuming the answer is told to send the message again."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import connect

from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.frames import recv, send, until
from chatgate.testing.servers import FakeLLM, RedisServer, serve_process, wait_until


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/chatgate.db"
    server: RedisServer = request.getfixturevalue("redis_server")
    url = f"{server.url}/13"
    redis.Redis.from_url(url).flushdb()
    return url


def stored(url: str, conversation_id: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}/conversations/{conversation_id}")
    return answer.json()["messages"] if answer.status_code == 200 else []


async def test_kill_9_mid_answer_keeps_the_message_and_the_partial_answer(
    store: str, fake: FakeLLM, tmp_path: Path
) -> None:
    fake.configure(tokens=3000, tps=200)
    env = {"OLLAMA_HOST": fake.url, "CHATGATE_STORE": store, "CHATGATE_DATA_DIR": str(tmp_path),
           "CHATGATE_CHECKPOINT_S": "0.2"}
    with serve_process(env) as first:
        # A short close: the killed peer never answers the closing handshake, and the frames
        # left unread keep the client from seeing the connection's end until it gives up.
        async with connect(first.ws_url + "/ws", close_timeout=0.5) as ws:
            await send(ws, {"type": "chat", "message": "tell me everything", "conversation_id": "crash"})
            start = await recv(ws)
            # Once the history holds part of the answer, the process dies without a word.
            messages = wait_until(
                lambda: [m for m in stored(first.url, "crash") if m["role"] == "assistant"],
                timeout=10, what="a checkpoint",
            )
            assert messages[0]["partial"] is True
            first.process.send_signal(signal.SIGKILL)
            first.process.wait(timeout=10)
    with serve_process(env) as second:
        history = stored(second.url, "crash")
        assert [m["role"] for m in history] == ["user", "assistant"]
        assert history[0]["content"] == "tell me everything"
        answer = history[1]
        assert answer["partial"] is True
        assert answer["content"] and fake_reply(3000).startswith(answer["content"])
        async with connect(second.ws_url + "/ws") as ws:
            await send(ws, {"type": "resume", "id": start["id"], "after": 0})
            error, _ = await until(ws, "error", "done", within_s=20)
        assert error["type"] == "error" and error["retryable"] is True, error
        assert "send the message again" in error["message"]
        # The next turn goes on from the kept history.
        fake.configure(tokens=5)
        answered = httpx.post(f"{second.url}/chat", json={"message": "again", "conversation_id": "crash"}, timeout=60)
        assert answered.status_code == 200
    sent = [m["content"] for m in fake.requests()[-1]["body"]["messages"] if m["role"] != "system"]
    assert sent == ["tell me everything", answer["content"], "again"]
