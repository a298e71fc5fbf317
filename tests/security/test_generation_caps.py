"""What one client can make the upstream do, in length and time: every answer ends at
``CHATGATE_MAX_ANSWER_TOKENS`` tokens and after ``CHATGATE_MAX_ANSWER_S`` seconds, with
``finish_reason`` ``length``, the upstream request closed and the part answered stored,
marked partial; a client's larger ``max_tokens`` goes upstream as the cap."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest
from openai import AsyncOpenAI

from chatgate.config import load_settings
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway, wait_until

CAP = 5
HELLO: Any = [{"role": "user", "content": "Hello there"}]
#: A conversation id, so the answer is stored and can be read back.
REMEMBER = {"X-Conversation-Id": "capped"}


@pytest.fixture
def capped(start_gateway: Any) -> Iterator[RunningGateway]:
    with start_gateway(max_answer_tokens=CAP) as gw:
        yield gw


@pytest.fixture
async def client(capped: RunningGateway) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=capped.url + "/v1", api_key="x", max_retries=0, timeout=10) as client:
        yield client


def last_request(fake: FakeLLM) -> dict[str, Any]:
    record: dict[str, Any] = fake.requests()[-1]
    return record


def upstream_closed(fake: FakeLLM) -> dict[str, Any]:
    """The last upstream request, once the fake has seen the gateway hang up on it."""
    record: dict[str, Any] = wait_until(
        lambda: (r := last_request(fake))["disconnected_at"] is not None and r,
        timeout=5,
        what="the upstream request closed",
    )
    return record


def stored_answer(gw: RunningGateway, conversation_id: str) -> dict[str, Any]:
    messages = httpx.get(f"{gw.url}/conversations/{conversation_id}").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    answer: dict[str, Any] = messages[-1]
    return answer


async def test_an_answer_over_the_token_cap_stops_at_the_cap_and_closes_the_upstream(
    capped: RunningGateway, client: AsyncOpenAI, fake: FakeLLM
) -> None:
    fake.configure(tokens=1000, tps=200)  # five seconds of tokens unless the gateway hangs up
    stream = await client.chat.completions.create(
        model="fake-model", messages=HELLO, stream=True, extra_headers=REMEMBER
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == fake_reply(CAP)
    assert chunks[-1].choices[0].finish_reason == "length"

    record = upstream_closed(fake)
    assert "num_predict" not in record["body"].get("options", {}), "the client set no limit: the count stops it"
    assert not record["completed"] and record["tokens_sent"] < 1000
    answer = stored_answer(capped, "capped")
    assert (answer["content"], answer["partial"]) == (fake_reply(CAP), True)


async def test_the_ollama_api_says_length_too(capped: RunningGateway, fake: FakeLLM) -> None:
    fake.configure(tokens=1000, tps=200)
    client = ollama.AsyncClient(host=capped.url, timeout=10)
    try:
        answer = await client.chat(model="fake-model", messages=HELLO, stream=False)
    finally:
        await client.close()
    assert (answer.message.content, answer.done_reason, answer.eval_count) == (fake_reply(CAP), "length", CAP)
    upstream_closed(fake)


@pytest.mark.parametrize(
    ("path", "body", "sent"),
    [
        ("/v1/chat/completions", {"max_tokens": 1000}, CAP),
        ("/v1/chat/completions", {"max_completion_tokens": 1000}, CAP),
        ("/v1/chat/completions", {"max_tokens": 3}, 3),
        ("/api/chat", {"options": {"num_predict": 1000}, "stream": False}, CAP),
        ("/api/chat", {"options": {"num_predict": 2}, "stream": False}, 2),
    ],
)
def test_a_clients_larger_max_tokens_is_clamped_upstream(
    capped: RunningGateway, fake: FakeLLM, path: str, body: dict[str, Any], sent: int
) -> None:
    response = httpx.post(capped.url + path, json={"model": "fake-model", "messages": HELLO, **body}, timeout=10)
    assert response.status_code == 200, response.text
    assert last_request(fake)["body"]["options"]["num_predict"] == sent


def test_the_operators_own_default_is_clamped_too(start_gateway: Any, fake: FakeLLM) -> None:
    with start_gateway(max_answer_tokens=CAP, max_tokens=1000) as gw:
        response = httpx.post(gw.url + "/chat", json={"message": "Hello"}, timeout=10)
    assert response.status_code == 200 and response.json()["reply"] == fake_reply(CAP)
    assert last_request(fake)["body"]["options"]["num_predict"] == CAP
    assert load_settings(max_tokens=1000).generation_options.max_tokens == 1000, "no cap: as set"


async def test_the_time_cap_stops_a_slow_generation(start_gateway: Any, fake: FakeLLM) -> None:
    fake.configure(tokens=1000, tps=20)  # fifty seconds of tokens
    with start_gateway(max_answer_s=0.5) as gw:
        async with AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=10) as client:
            stream = await client.chat.completions.create(
                model="fake-model", messages=HELLO, stream=True, extra_headers=REMEMBER
            )
            chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "length"
        record = upstream_closed(fake)
        assert 0 < record["tokens_sent"] < 100 and not record["completed"]
        answer = stored_answer(gw, "capped")
    assert text and fake_reply(1000).startswith(text)
    assert (answer["content"], answer["partial"]) == (text, True)


async def test_no_token_within_the_time_cap_is_a_timeout(start_gateway: Any, fake: FakeLLM) -> None:
    fake.configure(ttft_ms=30_000)
    with start_gateway(max_answer_s=0.3) as gw:
        async with AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=10) as client:
            with pytest.raises(openai.APIStatusError) as raised:
                await client.chat.completions.create(model="fake-model", messages=HELLO)
    assert raised.value.status_code == 502
    assert raised.value.code == "timeout" and "CHATGATE_MAX_ANSWER_S" in raised.value.message
    upstream_closed(fake)
