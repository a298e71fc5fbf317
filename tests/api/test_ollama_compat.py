"""The Ollama-compatible API, driven by the official ``ollama`` package over real sockets
against the fake upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import ollama
import orjson
import pytest

from chatgate.chat.agents import GENERAL_PROMPT
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway, wait_until

HELLO = [{"role": "user", "content": "Hello there"}]
DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


@pytest.fixture
async def client(gw: RunningGateway) -> AsyncIterator[ollama.AsyncClient]:
    client = ollama.AsyncClient(host=gw.url, timeout=10)
    yield client
    await client.close()


def sent_body(fake: FakeLLM) -> dict[str, Any]:
    body: dict[str, Any] = fake.requests()[-1]["body"]
    return body


def assert_final_counts(final: Any, completion_tokens: int) -> None:
    assert final.done is True and final.done_reason == "stop"
    assert final.eval_count == completion_tokens and final.prompt_eval_count == 2
    for name in DURATIONS:
        assert isinstance(getattr(final, name), int), name
    assert final.total_duration > 0 and final.load_duration == 0
    assert final.prompt_eval_duration + final.eval_duration <= final.total_duration + 1


async def test_chat_stream(client: ollama.AsyncClient) -> None:
    parts = [
        part async for part in await client.chat(model="fake-model", messages=HELLO, stream=True)
    ]
    *tokens, final = parts
    assert "".join(p.message.content or "" for p in tokens) == fake_reply(40)
    assert all(p.done is False and p.model == "fake-model" and p.created_at for p in tokens)
    assert {p.message.role for p in parts} == {"assistant"}
    assert final.message.content == ""
    assert_final_counts(final, 40)


async def test_chat_without_stream(client: ollama.AsyncClient) -> None:
    answer = await client.chat(model="fake-model", messages=HELLO, stream=False)
    assert answer.message.role == "assistant" and answer.message.content == fake_reply(40)
    assert answer.model == "fake-model"
    assert_final_counts(answer, 40)


async def test_generate_stream_and_not(client: ollama.AsyncClient, fake: FakeLLM) -> None:
    parts = [
        part
        async for part in await client.generate(
            model="fake-model", prompt="Hello there", stream=True
        )
    ]
    assert "".join(p.response or "" for p in parts) == fake_reply(40)
    assert_final_counts(parts[-1], 40)
    assert sent_body(fake)["messages"] == HELLO

    answer = await client.generate(model="fake-model", prompt="Hello there", system="Be brief.")
    assert answer.response == fake_reply(40) and answer.done_reason == "stop"
    assert sent_body(fake)["messages"] == [{"role": "system", "content": "Be brief."}, *HELLO]


async def test_done_reason_length_when_num_predict_ends_it(client: ollama.AsyncClient) -> None:
    answer = await client.chat(model="fake-model", messages=HELLO, options={"num_predict": 4})
    assert answer.message.content == fake_reply(4)
    assert answer.done_reason == "length" and answer.eval_count == 4


async def test_options_are_mapped(client: ollama.AsyncClient, fake: FakeLLM) -> None:
    options = {
        "temperature": 0.2,
        "num_predict": 6,
        "num_ctx": 2048,
        "top_p": 0.9,
        "stop": ["END"],
        "seed": 7,
    }
    await client.chat(model="fake-model", messages=HELLO, options={**options, "top_k": 20})
    assert sent_body(fake)["options"] == {**options, "top_k": 20}
    await client.generate(
        model="fake-model", prompt="hi", options={"num_predict": -1, "temperature": 0}
    )
    assert sent_body(fake)["options"] == {"temperature": 0.0}


async def test_history_passes_through_without_an_agent_prompt(
    client: ollama.AsyncClient, fake: FakeLLM
) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    await client.chat(model="fake-backup", messages=messages)
    assert sent_body(fake)["model"] == "fake-backup"
    assert sent_body(fake)["messages"] == messages


async def test_agent_model_applies_the_agent_prompt(
    client: ollama.AsyncClient, fake: FakeLLM
) -> None:
    answer = await client.chat(model="agent:general", messages=HELLO)
    assert answer.model == "agent:general"
    assert sent_body(fake)["model"] == "fake-model"
    assert sent_body(fake)["messages"] == [{"role": "system", "content": GENERAL_PROMPT}, *HELLO]


async def test_list_has_upstream_models_and_agents(client: ollama.AsyncClient) -> None:
    listed = await client.list()
    assert [m.model for m in listed.models] == ["fake-model", "fake-backup", "agent:general"]
    assert all(m.digest and m.modified_at and m.details is not None for m in listed.models)
    assert [m.model for m in (await client.ps()).models] == ["fake-model"]  # the upstream's (tests/api/test_model_metadata.py)


async def test_show_knows_upstream_models_and_agents(client: ollama.AsyncClient) -> None:
    shown = await client.show("fake-model")
    assert shown.modelfile and "FROM fake-model" in shown.modelfile
    assert shown.capabilities == ["completion"] and shown.modelinfo
    assert "FROM fake-model" in ((await client.show("agent:general")).modelfile or "")
    for missing in ("missing-model", "agent:nobody"):
        with pytest.raises(ollama.ResponseError) as raised:
            await client.show(missing)
        assert raised.value.status_code == 404


def test_version(gw: RunningGateway) -> None:
    assert httpx.get(gw.url + "/api/version").json() == {"version": "0.6.0"}


async def test_unknown_model_is_404(client: ollama.AsyncClient) -> None:
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as raised:
            answer = await client.chat(model="missing-model", messages=HELLO, stream=stream)
            if stream:
                async for _ in answer:  # type: ignore[union-attr]
                    pass
        assert raised.value.status_code == 404
        assert "missing-model" in raised.value.error
    with pytest.raises(ollama.ResponseError) as raised:
        await client.generate(model="agent:nobody", prompt="hi")
    assert raised.value.status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        (
            "/api/chat",
            {
                "model": "fake-model",
                "messages": [{"role": "user", "content": "x", "images": ["AAAA"]}],
            },
            "images",
        ),
        (
            "/api/chat",
            {"model": "fake-model", "messages": HELLO, "tools": [{"type": "function"}]},
            "tools.0.function",
        ),
        (
            "/api/chat",
            {"model": "fake-model", "messages": [*HELLO, {"role": "assistant", "content": "?"}]},
            "last message",
        ),
        (
            "/api/chat",
            {"model": "fake-model", "messages": HELLO, "options": {"temperature": "hot"}},
            "options.temperature",
        ),
        ("/api/chat", {"messages": HELLO}, "model"),
        ("/api/generate", {"model": "fake-model", "prompt": 5}, "prompt"),
        ("/api/generate", {"model": "fake-model", "prompt": "x", "images": ["AAAA"]}, "images"),
    ],
    ids=[
        "image",
        "tools",
        "last-not-user",
        "bad-option",
        "no-model",
        "bad-prompt",
        "generate-image",
    ],
)
def test_bad_requests_are_400_with_an_error_string(
    gw: RunningGateway, fake: FakeLLM, path: str, body: dict[str, Any], needle: str
) -> None:
    response = httpx.post(gw.url + path, json=body)
    assert response.status_code == 400
    error = response.json()
    assert list(error) == ["error"] and needle in error["error"]
    assert fake.requests() == []


def test_bodies_not_sent_as_json_are_refused(gw: RunningGateway, fake: FakeLLM) -> None:
    """What ``curl -d`` sends without ``-H 'Content-Type: application/json'`` is also what a
    page of another site may send without asking: refused before any upstream request."""
    body = orjson.dumps({"model": "fake-model", "prompt": "hi", "stream": False})
    response = httpx.post(
        gw.url + "/api/generate", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 415 and "application/json" in response.json()["error"]
    assert fake.requests() == []


async def test_empty_messages_load_the_model(client: ollama.AsyncClient, fake: FakeLLM) -> None:
    assert (await client.chat(model="fake-model", messages=[])).done_reason == "load"
    assert (await client.generate(model="fake-model")).done_reason == "load"
    assert (await client.generate(model="agent:general", system="Be brief.")).done_reason == "load"
    for missing in ("missing-model", "agent:nobody"):
        with pytest.raises(ollama.ResponseError) as raised:
            await client.chat(model=missing, messages=[])
        assert raised.value.status_code == 404
    assert fake.requests() == []


async def test_failure_after_the_first_token_is_an_error_line(
    client: ollama.AsyncClient, fake: FakeLLM
) -> None:
    fake.fault("error_line", after=3)
    received: list[str] = []
    with pytest.raises(ollama.ResponseError, match="injected stream error"):
        async for part in await client.chat(model="fake-model", messages=HELLO, stream=True):
            received.append(part.message.content or "")
    assert "".join(received) == fake_reply(3)


async def test_failure_before_the_first_token_is_an_http_error(
    client: ollama.AsyncClient, fake: FakeLLM
) -> None:
    fake.fault("http_500", times=3)
    with pytest.raises(ollama.ResponseError) as raised:
        async for _ in await client.chat(model="fake-model", messages=HELLO, stream=True):
            pass
    assert raised.value.status_code == 502


async def test_conversation_header_opts_into_server_memory(
    gw: RunningGateway, fake: FakeLLM
) -> None:
    header = {"X-Conversation-Id": "conv-ollama"}
    client = ollama.AsyncClient(host=gw.url, headers=header, timeout=10)
    try:
        await client.chat(model="fake-model", messages=[{"role": "user", "content": "first"}])
        await client.generate(model="fake-model", prompt="second")
    finally:
        await client.close()
    assert sent_body(fake)["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": fake_reply(40)},
        {"role": "user", "content": "second"},
    ]
    response = httpx.post(
        gw.url + "/api/chat", json={"model": "fake-model", "messages": HELLO}, headers=header
    )
    assert response.headers["x-conversation-id"] == "conv-ollama"
    wait_until(
        lambda: len(httpx.get(gw.url + "/conversations/conv-ollama").json()["messages"]) == 6,
        timeout=5,
    )


def test_stateless_answers_carry_no_conversation_id(gw: RunningGateway) -> None:
    response = httpx.post(gw.url + "/api/chat", json={"model": "fake-model", "messages": HELLO})
    assert response.status_code == 200 and "x-conversation-id" not in response.headers
    assert httpx.get(gw.url + "/conversations").json() == {"conversations": []}


async def test_api_keys_are_required(start_gateway: Any) -> None:
    with start_gateway(api_keys="k1") as gw:
        good = ollama.AsyncClient(host=gw.url, headers={"Authorization": "Bearer k1"}, timeout=10)
        bad = ollama.AsyncClient(host=gw.url, timeout=10)
        try:
            assert (
                await good.chat(model="fake-model", messages=HELLO)
            ).message.content == fake_reply(40)
            for call in (bad.chat(model="fake-model", messages=HELLO), bad.list()):
                with pytest.raises(ollama.ResponseError) as raised:
                    await call
                assert raised.value.status_code == 401
            assert httpx.get(gw.url + "/api/version").status_code == 200
        finally:
            await good.close()
            await bad.close()


async def test_rate_limit_is_429_with_retry_after(start_gateway: Any) -> None:
    with start_gateway(rate_limit="1/minute") as gw:
        assert httpx.post(
            gw.url + "/api/generate", json={"model": "fake-model", "prompt": "hi"}
        ).is_success
        response = httpx.post(gw.url + "/api/chat", json={"model": "fake-model", "messages": HELLO})
    assert response.status_code == 429 and "rate limit" in response.json()["error"]
    assert 1 <= int(response.headers["retry-after"]) <= 60
