"""The fake LLM upstream, served on loopback and driven over HTTP as its users drive it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from chatgate.testing import fake_wire
from chatgate.testing.fake_llm import (
    FakeServer,
    FakeSettings,
    fake_reply,
    fake_tokens,
    start_fake_llm,
)

TOKENS = 5
POLL_BOUND_S = 5.0
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "say hi to me"}]}
GENERATE = {"model": "fake-model", "prompt": "say hi", "system": "be brief"}
STREAM_ROUTES = [("/api/chat", CHAT), ("/api/generate", GENERATE), ("/v1/chat/completions", CHAT)]


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    server = await start_fake_llm(settings=FakeSettings(tokens=TOKENS))
    yield server
    await server.close()


@pytest.fixture
async def client(fake: FakeServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, timeout=5.0) as http:
        yield http


def stream_body(body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**body, "stream": True, **extra}


def token_texts(path: str, payloads: list[dict[str, Any]]) -> list[str]:
    tokens = [p for p in payloads if "error" not in p and not p.get("done")]
    if path == "/api/chat":
        return [p["message"]["content"] for p in tokens]
    if path == "/api/generate":
        return [p["response"] for p in tokens]
    return [
        p["choices"][0]["delta"]["content"]
        for p in tokens
        if p.get("choices") and p["choices"][0]["delta"].get("content")
    ]


async def read_payloads(response: httpx.Response, into: list[dict[str, Any]]) -> list[str]:
    """Parse NDJSON lines or SSE data events into ``into``; return SSE non-JSON data."""
    other: list[str] = []
    async for line in response.aiter_lines():
        data = line.removeprefix("data: ") if line.startswith("data: ") else line
        if not data:
            continue
        if data.startswith("{"):
            into.append(json.loads(data))
        else:
            other.append(data)
    return other


async def records(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get("/_fake/requests")
    response.raise_for_status()
    result: list[dict[str, Any]] = response.json()["requests"]
    return result


async def wait_for_record(
    client: httpx.AsyncClient, accept: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + POLL_BOUND_S
    while time.monotonic() < deadline:
        for record in await records(client):
            if accept(record):
                return record
        await asyncio.sleep(0.01)
    raise AssertionError(f"no matching record within {POLL_BOUND_S}s: {await records(client)}")


async def queue_fault(client: httpx.AsyncClient, **fault: Any) -> None:
    response = await client.post("/_fake/faults", json={"faults": [fault]})
    assert response.status_code == 200, response.text


def test_fake_tokens_cycle_a_fixed_word_list() -> None:
    tokens = fake_tokens(40)
    assert tokens[:5] == ["Hello", " from", " the", " fake", " model"]
    assert all(token.startswith(" ") for token in tokens[1:])
    assert tokens[16] == " Hello"
    assert tokens[17:32] == tokens[1:16]
    assert fake_tokens(40) == tokens
    assert fake_reply(3) == "Hello from the"
    assert fake_tokens(0) == []


async def test_discovery_routes(client: httpx.AsyncClient) -> None:
    root = await client.get("/")
    assert root.text == "Ollama is running"
    assert (await client.get("/api/version")).json() == {"version": "0.6.0"}

    tags = (await client.get("/api/tags")).json()["models"]
    assert [tag["name"] for tag in tags] == ["fake-model", "fake-backup"]
    assert {"model", "modified_at", "size", "digest", "details"} <= tags[0].keys()

    show = await client.post("/api/show", json={"model": "fake-model"})
    assert show.status_code == 200
    assert show.json()["details"]["family"] == "fake"
    assert (await client.post("/api/show", json={"name": "missing-x"})).status_code == 404

    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["fake-model", "fake-backup"]
    assert all(
        m["object"] == "model" and "created" in m and "owned_by" in m for m in models["data"]
    )


async def test_ollama_chat_streams_tokens_then_totals(client: httpx.AsyncClient) -> None:
    body = {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "say hi to me"},
        ],
    }
    lines: list[dict[str, Any]] = []
    async with client.stream("POST", "/api/chat", json=body) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        await read_payloads(response, lines)

    *token_lines, final = lines
    assert [line["message"] for line in token_lines] == [
        {"role": "assistant", "content": token} for token in fake_tokens(TOKENS)
    ]
    assert all(line["done"] is False and line["model"] == "fake-model" for line in token_lines)
    assert final["done"] is True
    assert final["done_reason"] == "stop"
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["eval_count"] == TOKENS
    assert final["prompt_eval_count"] == 6
    for key in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] > 0
    assert "load_duration" in final

    [record] = await records(client)
    assert record["path"] == "/api/chat"
    assert record["body"] == body
    assert record["completed"] is True
    assert record["tokens_sent"] == TOKENS
    assert record["fault"] is None and record["disconnected_at"] is None
    assert record["started_at"] <= record["first_token_at"] <= record["finished_at"]
    assert record["started_at"] <= time.monotonic()


async def test_ollama_chat_without_stream(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/chat", json={**CHAT, "stream": False})
    reply = response.json()
    assert reply["message"] == {"role": "assistant", "content": fake_reply(TOKENS)}
    assert reply["done"] is True and reply["done_reason"] == "stop"
    assert reply["eval_count"] == TOKENS and reply["prompt_eval_count"] == 4
    [record] = await records(client)
    assert record["completed"] is True and record["tokens_sent"] == TOKENS


@pytest.mark.parametrize("stream", [True, False])
async def test_ollama_generate(client: httpx.AsyncClient, stream: bool) -> None:
    lines: list[dict[str, Any]] = []
    async with client.stream("POST", "/api/generate", json={**GENERATE, "stream": stream}) as r:
        await read_payloads(r, lines)
    final = lines[-1]
    if stream:
        assert [line["response"] for line in lines[:-1]] == fake_tokens(TOKENS)
        assert final["response"] == ""
    else:
        assert len(lines) == 1
        assert final["response"] == fake_reply(TOKENS)
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["eval_count"] == TOKENS
    assert final["prompt_eval_count"] == 4


@pytest.mark.parametrize(
    ("path", "limit"),
    [
        ("/api/chat", {"options": {"num_predict": 2, "temperature": 0.1, "num_ctx": 2048}}),
        ("/api/generate", {"options": {"num_predict": 2}}),
        ("/v1/chat/completions", {"max_tokens": 2}),
        ("/v1/chat/completions", {"max_completion_tokens": 2, "max_tokens": 9}),
    ],
)
async def test_token_limit_stops_with_length(
    client: httpx.AsyncClient, path: str, limit: dict[str, Any]
) -> None:
    body = stream_body(GENERATE if path == "/api/generate" else CHAT, **limit)
    payloads: list[dict[str, Any]] = []
    async with client.stream("POST", path, json=body) as response:
        await read_payloads(response, payloads)
    assert token_texts(path, payloads) == fake_tokens(2)
    if path.startswith("/api/"):
        assert payloads[-1]["done_reason"] == "length"
        assert payloads[-1]["eval_count"] == 2
    else:
        assert payloads[-1]["choices"][0]["finish_reason"] == "length"


async def test_num_predict_at_or_above_tokens_is_no_limit(client: httpx.AsyncClient) -> None:
    for num_predict in (TOKENS, -1):
        body = {**CHAT, "stream": False, "options": {"num_predict": num_predict}}
        reply = (await client.post("/api/chat", json=body)).json()
        assert reply["done_reason"] == "stop" and reply["eval_count"] == TOKENS


async def test_openai_stream_with_usage(client: httpx.AsyncClient) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    chunks: list[dict[str, Any]] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        rest = await read_payloads(response, chunks)
    assert rest == ["[DONE]"]

    first, *content, last, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in content] == [
        {"content": token} for token in fake_tokens(TOKENS)
    ]
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in [first, *content])
    assert all(c["usage"] is None for c in [first, *content, last])
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 4, "completion_tokens": TOKENS, "total_tokens": 9}
    assert {c["id"] for c in chunks} == {first["id"]}
    assert all(
        c["object"] == "chat.completion.chunk" and c["model"] == "fake-model" for c in chunks
    )


async def test_openai_stream_without_usage(client: httpx.AsyncClient) -> None:
    chunks: list[dict[str, Any]] = []
    async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        rest = await read_payloads(r, chunks)
    assert rest == ["[DONE]"]
    assert len(chunks) == TOKENS + 2
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_openai_without_stream(client: httpx.AsyncClient) -> None:
    completion = (await client.post("/v1/chat/completions", json=CHAT)).json()
    assert completion["object"] == "chat.completion"
    [choice] = completion["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == fake_reply(TOKENS)
    assert choice["finish_reason"] == "stop"
    assert completion["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}


@pytest.mark.parametrize(("path", "body"), STREAM_ROUTES)
async def test_missing_model_is_404(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    await queue_fault(client, kind="http_500")
    response = await client.post(path, json={**body, "model": "missing-model"})
    assert response.status_code == 404
    if path.startswith("/api/"):
        expected = 'model "missing-model" not found, try pulling it first'
        assert response.json() == {"error": expected}
    else:
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == "model" and error["code"] == "model_not_found"
        assert "missing-model" in error["message"]

    accepted = await client.post(path, json={**body, "model": "any-other-model", "stream": False})
    assert accepted.status_code == 500, "the queued fault is still there for the next request"


async def test_unknown_model_not_named_missing_is_served(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/chat", json={**CHAT, "model": "llama3:8b", "stream": False})
    assert response.status_code == 200
    assert response.json()["model"] == "llama3:8b"


@pytest.mark.parametrize(("path", "body"), STREAM_ROUTES)
async def test_http_500_fault(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
    await queue_fault(client, kind="http_500")
    failed = await client.post(path, json=stream_body(body))
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert (error if path.startswith("/api/") else error["message"]) == "injected failure"

    served = await client.post(path, json={**body, "stream": False})
    assert served.status_code == 200
    first, second = await records(client)
    assert first["fault"] == "http_500" and first["tokens_sent"] == 0
    assert first["completed"] is False and first["finished_at"] is not None
    assert second["fault"] is None and second["completed"] is True


async def test_faults_apply_to_their_model_in_order(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/_fake/faults",
        json={
            "faults": [
                {"kind": "http_500", "model": "fake-backup"},
                {"kind": "error_line"},
                {"kind": "http_500"},
            ]
        },
    )
    assert response.json() == {"queued": 3}

    async def status(model: str) -> int:
        reply = await client.post("/api/chat", json={**CHAT, "model": model, "stream": False})
        return reply.status_code

    assert await status("fake-model") == 500
    assert await status("fake-backup") == 500
    assert await status("fake-backup") == 500
    assert await status("fake-backup") == 200
    assert [r["fault"] for r in await records(client)] == [
        "error_line",
        "http_500",
        "http_500",
        None,
    ]


@pytest.mark.parametrize(("path", "body"), STREAM_ROUTES)
async def test_drop_fault_truncates_the_stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    await queue_fault(client, kind="drop", after=2)
    payloads: list[dict[str, Any]] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", path, json=stream_body(body)) as response:
            assert response.status_code == 200
            await read_payloads(response, payloads)
    assert token_texts(path, payloads) == fake_tokens(2)
    assert not any(p.get("done") for p in payloads)

    [record] = await records(client)
    assert record["fault"] == "drop" and record["tokens_sent"] == 2
    assert record["completed"] is False and record["disconnected_at"] is None
    assert record["finished_at"] is not None


async def test_drop_fault_without_stream(client: httpx.AsyncClient) -> None:
    await queue_fault(client, kind="drop")
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/v1/chat/completions", json=CHAT)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


@pytest.mark.parametrize(("path", "body"), STREAM_ROUTES)
async def test_error_line_fault(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
    await queue_fault(client, kind="error_line", after=2)
    payloads: list[dict[str, Any]] = []
    async with client.stream("POST", path, json=stream_body(body)) as response:
        assert response.status_code == 200
        rest = await read_payloads(response, payloads)
    assert rest == [], "no [DONE] after an error"
    assert token_texts(path, payloads) == fake_tokens(2)
    if path.startswith("/api/"):
        assert payloads[-1] == {"error": "injected stream error"}
    else:
        assert payloads[-1] == {
            "error": {"message": "injected stream error", "type": "server_error"}
        }

    [record] = await records(client)
    assert record["fault"] == "error_line" and record["tokens_sent"] == 2
    assert record["completed"] is False and record["disconnected_at"] is None


async def test_error_line_fault_without_stream(client: httpx.AsyncClient) -> None:
    await queue_fault(client, kind="error_line")
    response = await client.post("/api/chat", json={**CHAT, "stream": False})
    assert response.status_code == 500
    assert response.json() == {"error": "injected stream error"}


@pytest.mark.parametrize(("path", "body"), STREAM_ROUTES)
async def test_hang_fault_until_the_client_leaves(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    await queue_fault(client, kind="hang", after=1)
    payloads: list[dict[str, Any]] = []
    timeout = httpx.Timeout(5.0, read=0.3)
    with pytest.raises(httpx.ReadTimeout):
        async with client.stream("POST", path, json=stream_body(body), timeout=timeout) as response:
            await read_payloads(response, payloads)
    left_at = time.monotonic()
    assert token_texts(path, payloads) == fake_tokens(1)

    record = await wait_for_record(client, lambda r: r["disconnected_at"] is not None)
    assert record["fault"] == "hang" and record["tokens_sent"] == 1
    assert record["completed"] is False and record["finished_at"] is None
    assert record["first_token_at"] + 0.25 < record["disconnected_at"]
    assert record["disconnected_at"] >= left_at - 0.05


async def test_client_disconnect_mid_stream_is_recorded(client: httpx.AsyncClient) -> None:
    await client.post("/_fake/config", json={"tokens": 200, "tps": 100})
    async with client.stream("POST", "/api/chat", json=CHAT) as response:
        lines = response.aiter_lines()
        await anext(lines)
        await anext(lines)
    record = await wait_for_record(client, lambda r: r["disconnected_at"] is not None)
    assert 2 <= record["tokens_sent"] < 200
    assert record["completed"] is False and record["finished_at"] is None
    assert record["fault"] is None


async def test_ttft_and_tps_are_respected(client: httpx.AsyncClient) -> None:
    configured = await client.post("/_fake/config", json={"ttft_ms": 100, "tps": 50, "tokens": 6})
    assert configured.json()["tokens"] == 6
    started = time.monotonic()
    arrivals: list[float] = []
    async with client.stream("POST", "/api/chat", json=CHAT) as response:
        async for _ in response.aiter_lines():
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 7
    assert arrivals[0] >= 0.09
    assert arrivals[5] >= 0.09 + 5 * 0.02 - 0.01

    [record] = await records(client)
    assert record["first_token_at"] - record["started_at"] >= 0.095


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_many_paced_streams_share_one_pacer_and_each_keeps_its_pace(
    client: httpx.AsyncClient, path: str
) -> None:
    """200 streams at 20 tokens/s, started together: every one gets all its tokens, in order,
    no sooner than its pace allows, and the wire format is intact (chunked, then the tail)."""
    await client.post("/_fake/config", json={"tokens": 4, "tps": 20})

    async def one() -> tuple[list[str], float]:
        started = time.monotonic()
        async with client.stream("POST", path, json=stream_body(CHAT)) as response:
            lines = [line async for line in response.aiter_lines() if line.strip()]
        payloads = [json.loads(line.removeprefix("data: ")) for line in lines if line != "data: [DONE]"]
        return token_texts(path, payloads), time.monotonic() - started

    results = await asyncio.gather(*(one() for _ in range(200)))
    for texts, elapsed in results:
        assert texts == fake_tokens(4)
        assert elapsed >= 3 * 0.05 - 0.005
    assert all(r["completed"] and r["tokens_sent"] == 4 for r in await records(client))


@pytest.mark.parametrize(
    "change",
    [{"tokens": -1}, {"tokens": 1.5}, {"tps": "fast"}, {"ttft_ms": -3}, {"tokens": True}, {"x": 1}],
)
async def test_config_rejects_bad_values(client: httpx.AsyncClient, change: dict[str, Any]) -> None:
    response = await client.post("/_fake/config", json=change)
    assert response.status_code == 400
    assert "error" in response.json()


@pytest.mark.parametrize(
    "faults",
    [{"faults": [{"kind": "explode"}]}, {"faults": [{"kind": "drop", "after": -1}]}, {"fault": []}],
)
async def test_faults_reject_bad_values(client: httpx.AsyncClient, faults: dict[str, Any]) -> None:
    assert (await client.post("/_fake/faults", json=faults)).status_code == 400
    assert (await client.post("/api/chat", json={**CHAT, "stream": False})).status_code == 200


async def test_reset_restores_startup_state(client: httpx.AsyncClient) -> None:
    await client.post("/_fake/config", json={"tokens": 2, "tps": 1000})
    await queue_fault(client, kind="http_500", model="fake-backup")
    await client.post("/api/chat", json={**CHAT, "stream": False})
    assert len(await records(client)) == 1

    assert (await client.post("/_fake/reset")).status_code == 200
    assert await records(client) == []
    reply = await client.post("/api/chat", json={**CHAT, "model": "fake-backup", "stream": False})
    assert reply.status_code == 200
    assert reply.json()["eval_count"] == TOKENS
    [record] = await records(client)
    assert record["fault"] is None


async def test_records_keep_only_the_latest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_wire, "_MAX_RECORDS", 3)
    server = await start_fake_llm(settings=FakeSettings(tokens=1))
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as http:
            for _ in range(5):
                await http.post("/api/chat", json={**CHAT, "stream": False})
            assert [r["id"] for r in await records(http)] == [3, 4, 5]
    finally:
        await server.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_run_fake_llm_serves_until_signalled(signum: signal.Signals) -> None:
    code = (
        "from chatgate.testing.fake_llm import FakeSettings, run_fake_llm;"
        "run_fake_llm('127.0.0.1', 0, FakeSettings(tokens=3))"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, env={**os.environ}
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), POLL_BOUND_S)).decode()
        prefix = "fake-llm listening on http://127.0.0.1:"
        assert line.startswith(prefix) and line.endswith("\n")
        port = int(line.removeprefix(prefix))
        assert port > 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as http:
            reply = await http.post("/api/chat", json={**CHAT, "stream": False})
            assert reply.json()["message"]["content"] == fake_reply(3)
        process.send_signal(signum)
        assert await asyncio.wait_for(process.wait(), POLL_BOUND_S) == 0
        assert await process.stdout.read() == b""
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
