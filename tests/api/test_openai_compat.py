"""The OpenAI-compatible API, driven by the official ``openai`` package over real sockets
against the fake upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from chatgate.chat.agents import GENERAL_PROMPT
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway, wait_until

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]


def client_for(gw: RunningGateway, api_key: str = "x") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gw.url + "/v1", api_key=api_key, max_retries=0, timeout=10)


@pytest.fixture
async def client(gw: RunningGateway) -> AsyncIterator[AsyncOpenAI]:
    async with client_for(gw) as openai_client:
        yield openai_client


def sent_body(fake: FakeLLM) -> dict[str, Any]:
    body: dict[str, Any] = fake.requests()[-1]["body"]
    return body


async def test_streamed_chunks_are_shaped_like_openai(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="fake-model", messages=HELLO, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == fake_reply(40)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {(c.object, c.model, c.created) for c in chunks} == {
        ("chat.completion.chunk", "fake-model", chunks[0].created)
    }
    assert all(c.usage is None for c in chunks)


async def test_non_streamed_completion_has_content_usage_and_finish_reason(
    client: AsyncOpenAI, fake: FakeLLM
) -> None:
    completion = await client.chat.completions.create(model="fake-model", messages=HELLO)
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == "fake-model"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == fake_reply(40)
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 40)
    assert completion.usage.total_tokens == 42

    short = await client.chat.completions.create(model="fake-model", messages=HELLO, max_tokens=5)
    assert short.choices[0].message.content == fake_reply(5)
    assert short.choices[0].finish_reason == "length"


async def test_include_usage_adds_a_final_usage_chunk(client: AsyncOpenAI, fake: FakeLLM) -> None:
    fake.configure(tokens=7)
    stream = await client.chat.completions.create(
        model="fake-model", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        2,
        7,
        9,
    )
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:-1])


async def test_models_are_the_upstreams_and_the_agents(client: AsyncOpenAI) -> None:
    models = [model async for model in client.models.list()]
    ids = [m.id for m in models]
    assert ids == ["fake-model", "fake-backup", "agent:general"]
    assert {m.object for m in models} == {"model"}
    assert models[-1].owned_by == "chatgate"


async def test_models_without_an_upstream_are_just_the_agents(
    start_gateway: Any, closed_port_url: str
) -> None:
    with start_gateway(ollama_host=closed_port_url) as gw:
        async with client_for(gw) as client:
            assert [m.id async for m in client.models.list()] == ["agent:general"]


async def test_unknown_model_is_not_found(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        await client.chat.completions.create(model="missing-model", messages=HELLO)
    assert raised.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="missing-model", messages=HELLO, stream=True)
    with pytest.raises(openai.NotFoundError) as raised:
        await client.chat.completions.create(model="agent:nobody", messages=HELLO)
    assert "nobody" in raised.value.message


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"temperature": 7}, "temperature"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this?"},
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,AAAA"},
                            },
                        ],
                    }
                ]
            },
            "messages.0.content",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yes?"},
                ]
            },
            "messages",
        ),
        (
            {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]},
            "messages.0.tool_call_id",
        ),
    ],
    ids=["n", "tools", "functions", "temperature", "image", "last-not-user", "tool-message"],
)
async def test_unsupported_requests_are_refused_in_openais_shape(
    client: AsyncOpenAI, fake: FakeLLM, extra: dict[str, Any], param: str
) -> None:
    request: dict[str, Any] = {"model": "fake-model", "messages": HELLO, **extra}
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(**request)
    error = raised.value.body
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"] and "code" in error
    assert fake.requests() == []


def test_malformed_bodies_get_openai_errors_not_422(gw: RunningGateway) -> None:
    url = gw.url + "/v1/chat/completions"
    for content in (
        b"{not json",
        b"[1]",
        b'{"model": "fake-model"}',
        b'{"model": 5, "messages": []}',
    ):
        response = httpx.post(url, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, content
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_text_parts_are_joined(client: AsyncOpenAI, fake: FakeLLM) -> None:
    parts: list[Any] = [
        {"type": "text", "text": "first line"},
        {"type": "text", "text": "second line"},
    ]
    await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": parts}]
    )
    assert sent_body(fake)["messages"] == [{"role": "user", "content": "first line\nsecond line"}]


async def test_history_and_system_prompt_reach_the_upstream_exactly(
    client: AsyncOpenAI, fake: FakeLLM
) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    await client.chat.completions.create(model="fake-backup", messages=messages)
    body = sent_body(fake)
    assert body["model"] == "fake-backup"
    assert body["messages"] == messages
    assert "options" not in body


async def test_agent_model_applies_the_agent_prompt(client: AsyncOpenAI, fake: FakeLLM) -> None:
    completion = await client.chat.completions.create(model="agent:general", messages=HELLO)
    assert completion.model == "agent:general"
    body = sent_body(fake)
    assert body["model"] == "fake-model"
    assert body["messages"] == [{"role": "system", "content": GENERAL_PROMPT}, *HELLO]


async def test_options_are_mapped(client: AsyncOpenAI, fake: FakeLLM) -> None:
    await client.chat.completions.create(
        model="fake-model",
        messages=HELLO,
        temperature=0.25,
        max_tokens=9,
        stop=["END"],
        seed=42,
        top_p=0.5,
    )
    assert sent_body(fake)["options"] == {
        "temperature": 0.25,
        "num_predict": 9,
        "stop": ["END"],
        "seed": 42,
        "top_p": 0.5,
    }
    await client.chat.completions.create(
        model="fake-model", messages=HELLO, max_completion_tokens=3, stop="X"
    )
    assert sent_body(fake)["options"] == {"num_predict": 3, "stop": ["X"]}


async def test_stateless_by_default(client: AsyncOpenAI, gw: RunningGateway) -> None:
    raw = await client.chat.completions.with_raw_response.create(model="fake-model", messages=HELLO)
    assert "x-conversation-id" not in raw.headers
    assert httpx.get(gw.url + "/conversations").json() == {"conversations": []}


async def test_conversation_header_opts_into_server_memory(
    client: AsyncOpenAI, gw: RunningGateway, fake: FakeLLM
) -> None:
    header = {"X-Conversation-Id": "conv-openai"}
    first = await client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "first"}], extra_headers=header
    )
    assert first.headers["x-conversation-id"] == "conv-openai"
    stream = await client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "second"}],
        stream=True,
        extra_headers=header,
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == fake_reply(40)
    assert sent_body(fake)["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": fake_reply(40)},
        {"role": "user", "content": "second"},
    ]

    def stored() -> list[dict[str, Any]] | None:
        found: list[dict[str, Any]] = httpx.get(gw.url + "/conversations/conv-openai").json()[
            "messages"
        ]
        return found if len(found) == 4 else None

    messages = wait_until(stored, timeout=5, what="second answer stored")
    assert [m["content"] for m in messages] == ["first", fake_reply(40), "second", fake_reply(40)]

    # A client that sends its own conversation is answered from it, and the turn is stored.
    own = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "third"},
    ]
    await client.chat.completions.create(model="fake-model", messages=own, extra_headers=header)  # type: ignore[arg-type]
    assert sent_body(fake)["messages"] == own
    wait_until(
        lambda: len(httpx.get(gw.url + "/conversations/conv-openai").json()["messages"]) == 6,
        timeout=5,
    )


async def test_second_stream_in_a_busy_conversation_is_a_conflict(
    client: AsyncOpenAI, fake: FakeLLM
) -> None:
    fake.configure(tokens=1000, tps=100)
    header = {"X-Conversation-Id": "conv-busy"}
    stream = await client.chat.completions.create(
        model="fake-model", messages=HELLO, stream=True, extra_headers=header
    )
    async with stream:
        await anext(aiter(stream))
        with pytest.raises(openai.ConflictError):
            await client.chat.completions.create(
                model="fake-model", messages=HELLO, extra_headers=header
            )


async def test_closing_the_stream_cancels_the_upstream(client: AsyncOpenAI, fake: FakeLLM) -> None:
    fake.configure(tokens=1000, tps=100)
    stream = await client.chat.completions.create(model="fake-model", messages=HELLO, stream=True)
    async with stream:
        chunks = aiter(stream)
        for _ in range(3):
            await anext(chunks)
    record = wait_until(
        lambda: next((r for r in fake.requests() if r["disconnected_at"]), None),
        timeout=5,
        what="upstream closed",
    )
    assert not record["completed"]


async def test_failure_before_the_first_token_is_an_http_error(
    client: AsyncOpenAI, fake: FakeLLM
) -> None:
    fake.fault("http_500", times=3)
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(model="fake-model", messages=HELLO, stream=True)
    assert raised.value.status_code == 502
    assert raised.value.body["type"] == "server_error"  # type: ignore[index]


async def test_failure_after_the_first_token_is_an_error_event(
    client: AsyncOpenAI, fake: FakeLLM
) -> None:
    fake.fault("drop", after=3)
    stream = await client.chat.completions.create(model="fake-model", messages=HELLO, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == fake_reply(3)
    assert "closed the connection" in raised.value.message
    assert raised.value.body == {
        **raised.value.body,
        "type": "server_error",
        "code": "provider_error",
    }  # type: ignore[dict-item]


async def test_too_large_message_is_413(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "x" * 16_385}]
        )
    assert raised.value.status_code == 413


async def test_api_keys_are_required(start_gateway: Any) -> None:
    with start_gateway(api_keys="k1") as gw:
        async with client_for(gw, "k1") as good, client_for(gw, "wrong") as bad:
            completion = await good.chat.completions.create(model="fake-model", messages=HELLO)
            assert completion.choices[0].message.content == fake_reply(40)
            assert "agent:general" in [m.id async for m in good.models.list()]
            with pytest.raises(openai.AuthenticationError) as raised:
                await bad.chat.completions.create(model="fake-model", messages=HELLO)
            assert raised.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                await bad.models.list()


async def test_rate_limit_is_429_with_retry_after(start_gateway: Any) -> None:
    with start_gateway(rate_limit="1/minute") as gw:
        async with client_for(gw) as client:
            await client.chat.completions.create(model="fake-model", messages=HELLO)
            with pytest.raises(openai.RateLimitError) as raised:
                await client.chat.completions.create(model="fake-model", messages=HELLO)
    assert raised.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert 1 <= int(raised.value.response.headers["retry-after"]) <= 60


async def test_penalties_reach_the_upstream_and_what_cannot_is_refused(client: AsyncOpenAI, fake: FakeLLM) -> None:
    await client.chat.completions.create(
        model="fake-model", messages=HELLO, frequency_penalty=0.5, presence_penalty=-0.5, user="someone"
    )
    options = sent_body(fake)["options"]
    assert options["frequency_penalty"] == 0.5 and options["presence_penalty"] == -0.5
    sent = len(fake.requests())
    for extra, param in (
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ):
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(model="fake-model", messages=HELLO, **extra)  # type: ignore[call-overload]
        assert raised.value.body["param"] == param  # type: ignore[index]
    assert len(fake.requests()) == sent


async def test_legacy_text_completions(client: AsyncOpenAI, fake: FakeLLM) -> None:
    completion = await client.completions.create(model="fake-model", prompt="Once upon a time", max_tokens=5)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].text == fake_reply(5)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert sent_body(fake)["messages"] == [{"role": "user", "content": "Once upon a time"}]

    stream = await client.completions.create(
        model="fake-model", prompt="Once", stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == fake_reply(40)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 40

    for extra, param in (({"suffix": "end"}, "suffix"), ({"echo": True}, "echo"), ({"n": 2}, "n")):
        with pytest.raises(openai.BadRequestError) as raised:
            await client.completions.create(model="fake-model", prompt="x", **extra)  # type: ignore[call-overload]
        assert raised.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as raised:
        await client.completions.create(model="fake-model", prompt=["one", "two"])
    assert raised.value.body["param"] == "prompt"  # type: ignore[index]
