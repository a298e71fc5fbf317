"""Seed 003, the Pi Agent server: its client's POST /chat, /agents and /health, driven with
the seed's own environment names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chatgate.chat.agents import GENERAL_PROMPT
from chatgate.config import load_settings
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway, run_gateway, wait_until


@pytest.fixture
def pi(fake: FakeLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    for name, value in {
        "PROVIDER": "ollama",
        "OLLAMA_HOST": fake.url,
        "OLLAMA_MODEL_GENERAL": "fake-model",
        "ENABLE_MEMORY": "true",
        "MEMORY_MAX_TURNS": "4",
        "MEMORY_TTL_MIN": "30",
        "MEMORY_MAX_CONVERSATIONS": "50",
        "TEMPERATURE": "0.3",
        "CTX_TOKENS": "1024",
        "MAX_TOKENS": "25",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CHATGATE_STORE", "memory")
    monkeypatch.setenv("CHATGATE_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.session_ttl_s == 1800 and settings.max_conversations == 50
    with run_gateway(settings) as running:
        yield running


def test_non_stream_reply_and_options_from_the_seed_variables(pi: RunningGateway, fake: FakeLLM) -> None:
    response = httpx.post(pi.url + "/chat", json={"message": "Hello Pi"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"reply", "conversation_id", "model", "provider"}
    assert body["reply"] == fake_reply(25)  # MAX_TOKENS became num_predict
    assert body["model"] == "fake-model" and body["provider"] == "ollama"
    assert response.headers["x-conversation-id"] == body["conversation_id"]
    sent = fake.requests()[-1]["body"]
    assert sent["model"] == "fake-model"
    assert sent["options"] == {"temperature": 0.3, "num_ctx": 1024, "num_predict": 25}
    assert sent["messages"] == [
        {"role": "system", "content": GENERAL_PROMPT},
        {"role": "user", "content": "Hello Pi"},
    ]


def test_stream_with_conversation_header_and_memory_window(pi: RunningGateway, fake: FakeLLM) -> None:
    conversation_id = None
    for n in range(4):
        body = {"message": f"turn {n}", "agent": "general", "stream": True}
        if conversation_id:
            body["conversation_id"] = conversation_id
        with httpx.stream("POST", pi.url + "/chat", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/plain; charset=utf-8"
            conversation_id = response.headers["x-conversation-id"]
            assert "".join(response.iter_text()) == fake_reply(25)
    messages = fake.requests()[-1]["body"]["messages"]
    # MEMORY_MAX_TURNS=4: the system prompt, the last four stored messages, the new one.
    assert [m["content"] for m in messages[1:]] == ["turn 1", fake_reply(25), "turn 2", fake_reply(25), "turn 3"]


def test_disconnect_keeps_the_partial_answer(pi: RunningGateway, fake: FakeLLM) -> None:
    fake.configure(tps=50)
    with httpx.stream("POST", pi.url + "/chat", json={"message": "long", "stream": True}) as response:
        conversation_id = response.headers["x-conversation-id"]
        next(response.iter_raw())
    wait_until(lambda: any(r["disconnected_at"] for r in fake.requests()), timeout=5, what="upstream closed")
    messages = wait_until(
        lambda: httpx.get(f"{pi.url}/conversations/{conversation_id}").json().get("messages"),
        timeout=5,
        what="partial stored",
    )
    assert messages[0]["content"] == "long"
    assert messages[1]["partial"] is True and messages[1]["content"]


def test_seed_error_statuses_agents_and_health(pi: RunningGateway) -> None:
    assert httpx.post(pi.url + "/chat", json={"message": ""}).status_code == 422
    assert httpx.post(pi.url + "/chat", json={"message": "x" * 4001}).status_code == 422
    assert httpx.post(pi.url + "/chat", json={"message": "hi", "agent": "nobody"}).status_code == 404
    agents = httpx.get(pi.url + "/agents").json()
    assert agents["agents"] == ["general"]
    health = httpx.get(pi.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_provider_failure_is_502(pi: RunningGateway, fake: FakeLLM) -> None:
    fake.fault("http_500", times=5)
    response = httpx.post(pi.url + "/chat", json={"message": "hi"})
    assert response.status_code == 502
    assert "500" in response.json()["detail"]
