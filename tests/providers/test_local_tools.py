"""The embedded provider and the tool-calling and structured-output parts of a request:
tools refused before anything is generated, JSON answers constrained by llama.cpp's grammar."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from chatgate.providers.base import Chunk, ProviderRequest, Unsupported
from chatgate.providers.local import LocalProvider
from chatgate.vocabulary import GenerationOptions, Message, OutputFormat, Tool, Tools

pytestmark = pytest.mark.slow
shares_model = pytest.mark.asyncio(loop_scope="module")

WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}},
)
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
ASK: list[Message] = [{"role": "user", "content": "What is the capital of France?"}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider() -> AsyncIterator[LocalProvider]:
    local = LocalProvider()
    yield local
    await local.aclose()


async def answer(provider: LocalProvider, request: ProviderRequest) -> list[Chunk]:
    return [chunk async for chunk in provider.stream(request)]


@pytest.mark.parametrize(
    ("messages", "tools"),
    [
        (ASK, Tools((WEATHER,))),
        (
            [
                {"role": "user", "content": "weather in Paris?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"id": "call_0", "name": "get_weather", "arguments": '{"city": "Paris"}'}
                    ],
                },
                {"role": "tool", "content": "sunny", "tool_call_id": "call_0"},
            ],
            None,
        ),
    ],
    ids=["tools offered", "tool calls in history"],
)
async def test_tools_are_unsupported_before_the_model_is_touched(
    messages: list[Message], tools: Tools | None
) -> None:
    local = LocalProvider()
    stream = local.stream(ProviderRequest(messages, local.default_model, tools=tools))
    with pytest.raises(Unsupported) as caught:
        await stream.__anext__()
    assert "does not support tool calling" in caught.value.message
    assert caught.value.retryable is False
    assert local._llm is None and not local.busy  # nothing loaded, nothing generated


@shares_model
async def test_an_empty_tool_list_is_no_tool_use(provider: LocalProvider) -> None:
    request = ProviderRequest(
        ASK, provider.default_model, GenerationOptions(max_tokens=2), tools=Tools(())
    )
    chunks = await answer(provider, request)
    assert chunks[-1].finish_reason == "length"


@shares_model
@pytest.mark.parametrize(
    ("question", "output", "keys"),
    [
        # Unconstrained, the model answers both questions in prose.
        (ASK[0]["content"], OutputFormat("json_schema", CITY_SCHEMA, name="city"), {"city"}),
        ("Say hello.", OutputFormat("json"), None),
    ],
    ids=["json_schema", "json"],
)
async def test_json_output_parses(
    provider: LocalProvider, question: str, output: OutputFormat, keys: set[str] | None
) -> None:
    request = ProviderRequest(
        [{"role": "user", "content": question}],
        provider.default_model,
        GenerationOptions(max_tokens=48, temperature=0),
        output=output,
    )
    chunks = await answer(provider, request)
    assert chunks[-1].finish_reason == "stop"
    parsed: Any = json.loads("".join(chunk.text for chunk in chunks))
    assert isinstance(parsed, dict)
    if keys is not None:
        assert set(parsed) == keys and isinstance(parsed["city"], str)
