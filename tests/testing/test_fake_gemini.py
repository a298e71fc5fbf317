"""The fake upstream's Gemini routes, served on loopback and read as raw HTTP, the way a
Gemini client reads Google's answers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from chatgate.testing.fake_llm import (
    FakeServer,
    FakeSettings,
    fake_reply,
    fake_tokens,
    start_fake_llm,
)

TOKENS = 5
KEY = {"x-goog-api-key": "test-key"}
STREAM = "/v1beta/models/gemini-test:streamGenerateContent"
GENERATE = "/v1beta/models/gemini-test:generateContent"
BODY: dict[str, Any] = {
    "contents": [
        {"role": "user", "parts": [{"text": "say hi"}]},
        {"role": "model", "parts": [{"text": "hi"}]},
        {"role": "user", "parts": [{"text": "once more please"}]},
    ],
    "systemInstruction": {"parts": [{"text": "be brief"}]},
}
PROMPT_WORDS = 2 + 1 + 3 + 2


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    server = await start_fake_llm(settings=FakeSettings(tokens=TOKENS))
    yield server
    await server.close()


@pytest.fixture
async def client(fake: FakeServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, timeout=5.0) as http:
        yield http


async def stream_events(client: httpx.AsyncClient, body: dict[str, Any] = BODY, path: str = STREAM) -> list[Any]:
    response = await client.post(path, params={"alt": "sse"}, json=body, headers=KEY)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = response.text
    assert raw.endswith("\r\n\r\n")
    events = [event for event in raw.split("\r\n\r\n") if event]
    assert all(event.startswith("data: ") for event in events)
    return [json.loads(event.removeprefix("data: ")) for event in events]


async def records(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = (await client.get("/_fake/requests")).json()["requests"]
    return result


def texts(events: list[Any]) -> list[str]:
    return [part["text"] for event in events for part in event["candidates"][0]["content"]["parts"]]


async def test_stream_sends_one_event_per_token_then_finish_and_usage(client: httpx.AsyncClient) -> None:
    events = await stream_events(client)
    *tokens, last = events
    assert texts(tokens) == fake_tokens(TOKENS)
    assert all(e["candidates"][0]["content"]["role"] == "model" for e in events)
    assert all("finishReason" not in e["candidates"][0] for e in tokens)
    assert tokens[0]["usageMetadata"] == {"promptTokenCount": PROMPT_WORDS, "totalTokenCount": PROMPT_WORDS}
    assert last["candidates"][0]["finishReason"] == "STOP"
    assert last["usageMetadata"] == {
        "promptTokenCount": PROMPT_WORDS,
        "candidatesTokenCount": TOKENS,
        "totalTokenCount": PROMPT_WORDS + TOKENS,
    }
    assert last["modelVersion"] == "gemini-test"
    [record] = await records(client)
    assert record["path"] == STREAM and record["body"] == BODY and record["completed"] is True


async def test_max_output_tokens_stops_with_max_tokens(client: httpx.AsyncClient) -> None:
    events = await stream_events(client, {**BODY, "generationConfig": {"maxOutputTokens": 2}})
    assert "".join(texts(events)) == fake_reply(2)
    assert events[-1]["candidates"][0]["finishReason"] == "MAX_TOKENS"


async def test_generate_content_answers_at_once(client: httpx.AsyncClient) -> None:
    response = await client.post(GENERATE, json=BODY, params={"key": "test-key"})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["candidates"][0]["content"] == {"parts": [{"text": fake_reply(TOKENS)}], "role": "model"}
    assert data["candidates"][0]["finishReason"] == "STOP"
    assert data["usageMetadata"]["candidatesTokenCount"] == TOKENS


async def test_blocked_model_ends_with_safety(client: httpx.AsyncClient) -> None:
    events = await stream_events(client, path="/v1beta/models/blocked-model:streamGenerateContent")
    assert "".join(texts(events)) == fake_reply(TOKENS)
    assert events[-1]["candidates"][0]["finishReason"] == "SAFETY"


@pytest.mark.parametrize(
    ("headers", "params", "status", "name"),
    [
        ({}, {"alt": "sse"}, 403, "PERMISSION_DENIED"),
        ({"x-goog-api-key": "invalid-key"}, {"alt": "sse"}, 400, "INVALID_ARGUMENT"),
        (KEY, {}, 400, "INVALID_ARGUMENT"),
    ],
    ids=["no-key", "invalid-key", "no-alt-sse"],
)
async def test_refusals_have_googles_shape_and_are_recorded(
    client: httpx.AsyncClient, headers: dict[str, str], params: dict[str, str], status: int, name: str
) -> None:
    response = await client.post(STREAM, params=params, json=BODY, headers=headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["status"] == name and error["message"]
    [record] = await records(client)
    assert record["path"] == STREAM and record["completed"] is False


@pytest.mark.parametrize(
    "body",
    [{}, {"contents": []}, {"contents": [{"role": "assistant", "parts": [{"text": "hi"}]}]}],
    ids=["no-contents", "empty-contents", "assistant-role"],
)
async def test_bodies_gemini_rejects_are_400(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await client.post(STREAM, params={"alt": "sse"}, json=body, headers=KEY)
    assert response.status_code == 400
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT"


async def test_missing_model_is_not_found(client: httpx.AsyncClient) -> None:
    path = "/v1beta/models/missing-model:streamGenerateContent"
    response = await client.post(path, params={"alt": "sse"}, json=BODY, headers=KEY)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["status"] == "NOT_FOUND" and "models/missing-model is not found" in error["message"]


async def test_models_list_needs_a_key_and_marks_what_can_generate(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1beta/models")).status_code == 403
    models = (await client.get("/v1beta/models", headers=KEY)).json()["models"]
    assert [m["name"] for m in models] == ["models/fake-model", "models/fake-backup", "models/text-embedding-fake"]
    assert "generateContent" in models[0]["supportedGenerationMethods"]
    assert models[2]["supportedGenerationMethods"] == ["embedContent"]


async def test_faults_in_gemini_shape(client: httpx.AsyncClient) -> None:
    faults = [{"kind": "http_500"}, {"kind": "error_line", "after": 2}]
    assert (await client.post("/_fake/faults", json={"faults": faults})).status_code == 200
    failed = await client.post(STREAM, params={"alt": "sse"}, json=BODY, headers=KEY)
    assert failed.status_code == 500
    assert failed.json() == {"error": {"code": 500, "message": "injected failure", "status": "INTERNAL"}}
    events = await stream_events(client)
    assert texts(events[:-1]) == fake_tokens(2)
    assert events[-1] == {"error": {"code": 500, "message": "injected stream error", "status": "INTERNAL"}}
    assert [r["fault"] for r in await records(client)] == ["http_500", "error_line"]
