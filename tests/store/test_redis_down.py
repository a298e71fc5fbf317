"""Redis stopped and started again under a running gateway: clear errors while it is down,
a degraded /health, and service back on its own, with no restart of chatgate."""

from __future__ import annotations

from pathlib import Path

import httpx

from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, run_gateway, start_redis, wait_until


def test_the_gateway_recovers_by_itself_when_redis_returns(fake: FakeLLM, tmp_path: Path) -> None:
    redis = start_redis()
    try:
        with run_gateway(
            provider="ollama", ollama_host=fake.url, model="fake-model", store=f"{redis.url}/2", data_dir=tmp_path
        ) as gw:
            first = httpx.post(f"{gw.url}/chat", json={"message": "hello", "conversation_id": "c-down"})
            assert first.status_code == 200 and first.json()["reply"] == fake_reply(40)

            redis.stop()
            health = httpx.get(f"{gw.url}/health", timeout=10).json()
            assert health["status"] == "degraded"
            assert health["checks"]["store"]["status"] == "down"
            assert httpx.get(f"{gw.url}/health/ready", timeout=10).status_code == 503
            refused = httpx.post(f"{gw.url}/chat", json={"message": "still there?"}, timeout=10)
            assert refused.status_code == 500
            assert refused.json() == {
                "detail": "the conversation store is not reachable; try again in a moment",
                "code": "internal",
            }
            listing = httpx.get(f"{gw.url}/conversations", timeout=10)
            assert listing.status_code == 500 and "not reachable" in listing.json()["detail"]

            redis = start_redis(redis.port)  # empty again: it keeps nothing on disk

            def answers() -> bool:
                again = httpx.post(f"{gw.url}/chat", json={"message": "back?"}, timeout=10)
                return again.status_code == 200

            wait_until(answers, timeout=15, interval=0.2, what="chatgate to use Redis again")
            assert httpx.get(f"{gw.url}/health", timeout=10).json()["status"] == "ok"
    finally:
        redis.stop()
