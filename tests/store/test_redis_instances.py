"""Two gateways on one Redis are one service for conversations: a turn answered by one
instance is in the history the other sends upstream, and both list and delete the same."""

from __future__ import annotations

from pathlib import Path

import httpx

from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RedisServer, run_gateway


def test_a_conversation_continues_on_another_instance(
    fake: FakeLLM, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = {
        "provider": "ollama", "ollama_host": fake.url, "model": "fake-model",
        "store": f"{redis_server.url}/3", "api_keys": "k1,k2",
    }
    k1 = {"Authorization": "Bearer k1"}
    fake.configure(tokens=3)
    with run_gateway(data_dir=tmp_path / "a", **settings) as a, run_gateway(data_dir=tmp_path / "b", **settings) as b:
        instances = [a, b, a, b]
        for turn, gw in enumerate(instances, start=1):
            answered = httpx.post(
                f"{gw.url}/chat", json={"message": f"turn {turn}", "conversation_id": "shared"}, headers=k1
            )
            assert answered.status_code == 200, answered.text

        chats = [r for r in fake.requests() if r["path"] == "/api/chat"]
        last = [m["content"] for m in chats[-1]["body"]["messages"] if m["role"] != "system"]
        reply = fake_reply(3)
        assert last == ["turn 1", reply, "turn 2", reply, "turn 3", reply, "turn 4"]

        for gw in (a, b):
            listed = httpx.get(f"{gw.url}/conversations", headers=k1).json()["conversations"]
            assert [c["id"] for c in listed] == ["shared"] and listed[0]["message_count"] == 8
            assert httpx.get(f"{gw.url}/conversations", headers={"Authorization": "Bearer k2"}).json() == {
                "conversations": []
            }
        assert httpx.delete(f"{b.url}/conversations/shared", headers=k1).status_code == 204
        assert httpx.get(f"{a.url}/conversations/shared", headers=k1).status_code == 404
