"""``POST /chat`` (the Pi Agent contract), conversations, health, agents, metrics and the
web page, over real sockets against the fake upstream."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from chatgate.chat.agents import GENERAL_PROMPT
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway, wait_until

SSE = {"Accept": "text/event-stream"}
POLL_BOUND_S = 5.0


def chat(gw: RunningGateway, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}/chat", json=body, headers=headers, timeout=10)


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """The events of an SSE body; each one's ``event:`` name must match its data's type."""
    events: list[dict[str, Any]] = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        event: dict[str, Any] = orjson.loads(fields["data"])
        assert fields["event"] == event["type"], block
        events.append(event)
    return events


def timed_chunks(response: httpx.Response) -> Iterator[tuple[float, bytes]]:
    for chunk in response.iter_raw():
        yield time.monotonic(), chunk


def stored_messages(gw: RunningGateway, conversation_id: str, count: int) -> list[dict[str, Any]]:
    """The conversation's messages once ``count`` of them are stored."""

    def messages() -> list[dict[str, Any]] | None:
        response = httpx.get(f"{gw.url}/conversations/{conversation_id}")
        if response.status_code != 200:
            return None
        found: list[dict[str, Any]] = response.json()["messages"]
        return found if len(found) >= count else None

    result: list[dict[str, Any]] = wait_until(messages, timeout=POLL_BOUND_S, what="stored answer")
    return result


def disconnected_record(fake: FakeLLM) -> dict[str, Any]:
    record: dict[str, Any] = wait_until(
        lambda: next((r for r in fake.requests() if r["disconnected_at"]), None),
        timeout=POLL_BOUND_S,
        what="upstream request closed",
    )
    return record


def test_json_reply_matches_the_pi_agent_contract(gw: RunningGateway, fake: FakeLLM) -> None:
    response = chat(gw, message="Hello there")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"reply", "conversation_id", "model", "provider"}
    assert body["reply"] == fake_reply(40)
    assert body["model"] == "fake-model"
    assert body["provider"] == "ollama"
    assert body["conversation_id"]
    assert response.headers["x-conversation-id"] == body["conversation_id"]
    sent = fake.requests()[-1]["body"]
    assert sent["model"] == "fake-model"
    assert sent["messages"][0] == {"role": "system", "content": GENERAL_PROMPT}
    assert sent["messages"][-1] == {"role": "user", "content": "Hello there"}


def test_text_stream_arrives_in_pieces_while_the_upstream_generates(
    gw: RunningGateway, fake: FakeLLM
) -> None:
    fake.configure(tokens=30, tps=40)
    with httpx.stream("POST", f"{gw.url}/chat", json={"message": "stream it", "stream": True}, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        conversation_id = response.headers["x-conversation-id"]
        chunks = list(timed_chunks(response))
    assert b"".join(c for _, c in chunks).decode() == fake_reply(30)
    assert len(chunks) > 1
    record = fake.requests()[-1]
    assert record["completed"]
    assert chunks[0][0] < record["finished_at"], "the first chunk waited for the whole answer"
    messages = stored_messages(gw, conversation_id, 2)
    assert messages[1] == {**messages[1], "role": "assistant", "content": fake_reply(30), "partial": False}


@pytest.mark.parametrize("stream", [False, True])
def test_sse_carries_the_native_events(gw: RunningGateway, fake: FakeLLM, stream: bool) -> None:
    fake.configure(tokens=12, tps=60)
    with httpx.stream(
        "POST", f"{gw.url}/chat", json={"message": "events please", "stream": stream}, headers=SSE, timeout=10
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(timed_chunks(response))
    events = parse_sse(b"".join(c for _, c in chunks))
    start, *deltas, done = events
    assert start["type"] == "start"
    assert start["conversation_id"] == response.headers["x-conversation-id"]
    assert start["model"] == "fake-model" and start["agent"] == "general"
    # Tokens that arrive while a delta waits for the socket join it: one delta or several.
    assert deltas and all(d["type"] == "delta" for d in deltas)
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert {d["id"] for d in deltas} == {start["id"]} == {done["id"]}
    assert "".join(d["text"] for d in deltas) == fake_reply(12)
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 12
    assert chunks[0][0] < fake.requests()[-1]["finished_at"]


def test_an_empty_answer_streams_an_empty_body(gw: RunningGateway, fake: FakeLLM) -> None:
    fake.configure(tokens=0)
    response = chat(gw, message="say nothing", stream=True)
    assert response.status_code == 200
    assert response.content == b""
    events = parse_sse(httpx.post(f"{gw.url}/chat", json={"message": "again"}, headers=SSE).content)
    assert [e["type"] for e in events] == ["start", "done"]


def test_second_turn_sends_the_first_turn_as_history(gw: RunningGateway, fake: FakeLLM) -> None:
    first = chat(gw, message="My name is Ada.").json()
    second = chat(gw, message="What is my name?", conversation_id=first["conversation_id"])
    assert second.status_code == 200
    assert second.json()["conversation_id"] == first["conversation_id"]
    assert fake.requests()[-1]["body"]["messages"] == [
        {"role": "system", "content": GENERAL_PROMPT},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": fake_reply(40)},
        {"role": "user", "content": "What is my name?"},
    ]


def test_streamed_turns_are_remembered_too(gw: RunningGateway, fake: FakeLLM) -> None:
    first = chat(gw, message="one", stream=True)
    conversation_id = first.headers["x-conversation-id"]
    stored_messages(gw, conversation_id, 2)
    chat(gw, message="two", stream=True, conversation_id=conversation_id)
    roles = [(m["role"], m["content"]) for m in fake.requests()[-1]["body"]["messages"][1:]]
    assert roles == [("user", "one"), ("assistant", fake_reply(40)), ("user", "two")]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"message": ""}, 422),
        ({"message": "x" * 4001}, 422),
        ({"message": "x" * 4000}, 200),
        ({}, 422),
        ({"message": 5}, 422),
        ({"message": "hi", "stream": "sometimes"}, 422),
    ],
    ids=["empty", "4001-chars", "4000-chars", "missing", "not-a-string", "bad-stream-flag"],
)
def test_message_validation(gw: RunningGateway, fake: FakeLLM, body: dict[str, Any], status: int) -> None:
    response = httpx.post(f"{gw.url}/chat", json=body, timeout=10)
    assert response.status_code == status, response.text
    assert len(fake.requests()) == (1 if status == 200 else 0)


def test_unknown_agent_is_404(gw: RunningGateway, fake: FakeLLM) -> None:
    response = chat(gw, message="hi", agent="nobody")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert "nobody" in response.json()["detail"]
    assert fake.requests() == []


@pytest.mark.parametrize("mode", ["json", "stream", "sse"])
def test_upstream_500_on_every_retry_is_502(gw: RunningGateway, fake: FakeLLM, mode: str) -> None:
    fake.fault("http_500", times=5)
    response = chat(gw, SSE if mode == "sse" else None, message="hi", stream=mode == "stream")
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["code"] == "provider_error"
    assert "500" in response.json()["detail"]
    records = fake.requests()
    assert len(records) > 1, "a 5xx before the first token is retried"
    assert all(r["fault"] == "http_500" for r in records)
    conversation_id = response.headers["x-conversation-id"]
    assert httpx.get(f"{gw.url}/conversations/{conversation_id}").status_code == 404


def test_one_upstream_500_is_retried_transparently(gw: RunningGateway, fake: FakeLLM) -> None:
    fake.fault("http_500")
    response = chat(gw, message="hi")
    assert response.status_code == 200
    assert response.json()["reply"] == fake_reply(40)
    records = fake.requests()
    assert len(records) == 2
    assert records[0]["fault"] == "http_500" and records[1]["completed"]


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_down_is_502(start_gateway: Any, closed_port_url: str, stream: bool) -> None:
    with start_gateway(ollama_host=closed_port_url) as gw:
        response = chat(gw, message="anyone there?", stream=stream)
    assert response.status_code == 502
    assert response.json()["code"] == "provider_unavailable"
    assert closed_port_url.rsplit(":", 1)[1] in response.json()["detail"]


def test_missing_model_is_502_with_a_clear_detail(start_gateway: Any, fake: FakeLLM) -> None:
    with start_gateway(model="missing-model") as gw:
        response = chat(gw, message="hi")
    assert response.status_code == 502
    detail = response.json()["detail"]
    assert "missing-model" in detail and "not found" in detail
    assert len(fake.requests()) == 1, "a missing model is not retried"


def test_fallback_model_answers_when_the_model_is_missing(start_gateway: Any, fake: FakeLLM) -> None:
    with start_gateway(model="missing-x", fallback_models="fake-backup") as gw:
        response = chat(gw, message="hi")
        assert response.status_code == 200
        assert response.json()["model"] == "fake-backup"
        assert response.json()["reply"] == fake_reply(40)
        assert [r["body"]["model"] for r in fake.requests()] == ["missing-x", "fake-backup"]


def test_sse_start_names_the_fallback_model_that_answers(start_gateway: Any, fake: FakeLLM) -> None:
    with start_gateway(model="missing-x", fallback_models="fake-backup") as gw:
        response = chat(gw, SSE, message="hi")
    assert response.status_code == 200
    start, *_, done = parse_sse(response.content)
    assert start["model"] == "fake-backup"
    assert done["type"] == "done"


@pytest.mark.parametrize("kind", ["error_line", "drop"])
def test_failure_after_first_token_ends_sse_with_retryable_error(
    gw: RunningGateway, fake: FakeLLM, kind: str
) -> None:
    fake.fault(kind, after=5)
    response = chat(gw, SSE, message="break please")
    assert response.status_code == 200
    start, *deltas, error = parse_sse(response.content)
    assert start["type"] == "start"
    assert deltas and all(d["type"] == "delta" for d in deltas)
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["text"] for d in deltas) == fake_reply(5)
    assert error["type"] == "error" and error["retryable"] is True
    assert error["code"] == "provider_error"
    assert len(fake.requests()) == 1, "nothing is retried after the first token"
    user, assistant = stored_messages(gw, start["conversation_id"], 2)
    assert user["content"] == "break please" and user["partial"] is False
    assert assistant == {**assistant, "role": "assistant", "content": fake_reply(5), "partial": True}


@pytest.mark.parametrize("mode", ["stream", "sse"])
def test_client_disconnect_cancels_generation_and_keeps_partial(
    gw: RunningGateway, fake: FakeLLM, mode: str
) -> None:
    fake.configure(tokens=500, tps=50)
    with httpx.stream(
        "POST",
        f"{gw.url}/chat",
        json={"message": "a long story", "stream": True},
        headers=SSE if mode == "sse" else None,
        timeout=10,
    ) as response:
        assert response.status_code == 200
        conversation_id = response.headers["x-conversation-id"]
        received = b""
        for chunk in response.iter_raw():
            received += chunk
            if received.count(b"delta" if mode == "sse" else b" ") >= 3:
                break
        closed_at = time.monotonic()
    record = disconnected_record(fake)
    assert record["disconnected_at"] - closed_at < 1.0
    assert not record["completed"]
    user, assistant = stored_messages(gw, conversation_id, 2)
    assert user["content"] == "a long story"
    assert assistant["partial"] is True
    content = assistant["content"]
    assert content and fake_reply(500).startswith(content) and content != fake_reply(500)
    if mode == "stream":
        assert content.startswith(received.decode())


def test_client_giving_up_on_a_json_reply_cancels_generation(gw: RunningGateway, fake: FakeLLM) -> None:
    fake.configure(tokens=500, tps=50)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gw.url}/chat",
            json={"message": "take your time", "conversation_id": "conv-impatient"},
            timeout=httpx.Timeout(5, read=0.5),
        )
    record = disconnected_record(fake)
    assert not record["completed"]
    user, assistant = stored_messages(gw, "conv-impatient", 2)
    assert user["content"] == "take your time"
    assert assistant["partial"] is True and fake_reply(500).startswith(assistant["content"])


def test_oversized_body_is_413(gw: RunningGateway, fake: FakeLLM) -> None:
    limit = gw.settings.max_message_bytes + 4096
    body = orjson.dumps({"message": "x" * limit})
    declared = httpx.post(f"{gw.url}/chat", content=body, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413
    assert declared.json()["code"] == "too_large"

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    chunked = httpx.post(f"{gw.url}/chat", content=pieces(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    assert chunked.json()["code"] == "too_large"
    assert fake.requests() == []


def test_conversations_list_get_and_delete(gw: RunningGateway) -> None:
    first = chat(gw, message="first conversation").json()["conversation_id"]
    second = chat(gw, message="second conversation").json()["conversation_id"]

    listed = httpx.get(f"{gw.url}/conversations").json()["conversations"]
    assert [c["id"] for c in listed] == [second, first]
    assert listed[0]["message_count"] == 2 and listed[0]["agent"] == "general"
    assert listed[0]["title"] == "second conversation"

    one = httpx.get(f"{gw.url}/conversations/{first}").json()
    assert one["id"] == first
    assert [(m["role"], m["content"], m["partial"]) for m in one["messages"]] == [
        ("user", "first conversation", False),
        ("assistant", fake_reply(40), False),
    ]

    assert httpx.delete(f"{gw.url}/conversations/{first}").status_code == 204
    assert httpx.get(f"{gw.url}/conversations/{first}").status_code == 404
    assert httpx.delete(f"{gw.url}/conversations/{first}").status_code == 404
    assert [c["id"] for c in httpx.get(f"{gw.url}/conversations").json()["conversations"]] == [second]


def test_unknown_conversation_is_404(gw: RunningGateway) -> None:
    for method in ("GET", "DELETE"):
        response = httpx.request(method, f"{gw.url}/conversations/nope")
        assert response.status_code == 404, method
        assert response.json()["code"] == "not_found"


def test_health_ok(gw: RunningGateway) -> None:
    health = httpx.get(f"{gw.url}/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok"
    assert body["checks"]["provider"]["status"] == "ok"
    assert body["checks"]["store"]["status"] == "ok"
    assert httpx.get(f"{gw.url}/health/live").status_code == 200
    assert httpx.get(f"{gw.url}/health/ready").status_code == 200


def test_health_degraded_when_upstream_is_down(start_gateway: Any, closed_port_url: str) -> None:
    with start_gateway(ollama_host=closed_port_url) as gw:
        health = httpx.get(f"{gw.url}/health")
        assert health.status_code == 200
        assert health.json()["status"] == "degraded"
        assert health.json()["checks"]["provider"]["status"] == "down"
        assert health.json()["checks"]["store"]["status"] == "ok"
        assert httpx.get(f"{gw.url}/health/live").status_code == 200
        ready = httpx.get(f"{gw.url}/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["provider"]["status"] == "down"


def test_agents_shape(gw: RunningGateway) -> None:
    body = httpx.get(f"{gw.url}/agents").json()
    assert body["agents"] == ["general"]
    [detail] = body["details"]
    assert set(detail) == {"name", "description", "model"}
    assert detail["name"] == "general"
    assert isinstance(detail["description"], str) and detail["description"]


def generations_total(gw: RunningGateway, outcome: str) -> float:
    """The counter's sample for provider ``ollama`` and ``outcome``, 0 before the first."""
    text = httpx.get(f"{gw.url}/metrics").text
    for labels, value in re.findall(r"^chatgate_generations_total\{(.*)\} (\S+)$", text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', labels)) == {"provider": "ollama", "outcome": outcome}:
            return float(value)
    return 0.0


def test_metrics_count_generations(gw: RunningGateway) -> None:
    response = httpx.get(f"{gw.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "chatgate_generations_total" in response.text
    before = generations_total(gw, "stop")
    assert chat(gw, message="count me").status_code == 200
    assert generations_total(gw, "stop") == before + 1


def test_root_serves_the_web_ui(gw: RunningGateway) -> None:
    response = httpx.get(f"{gw.url}/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html" in response.text.lower()
