"""GeminiProvider's tool calling and structured output against the fake upstream's
``/v1beta`` routes: declarations and tool choice as Gemini receives them, streamed
``functionCall`` parts as tool-call chunks, tool results as ``functionResponse`` parts,
``responseMimeType``/``responseSchema``, and the schema subset Gemini accepts."""

from __future__ import annotations

from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from upstream import collect

from chatgate.providers.base import Chunk, ProviderRequest, Unsupported
from chatgate.providers.gemini import GeminiProvider, gemini_schema, tool_call_delta
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.fake_tools import JSON_ANSWER
from chatgate.testing.servers import FakeLLM
from chatgate.vocabulary import (
    Message,
    OutputFormat,
    Tool,
    ToolCallDelta,
    ToolChoice,
    Tools,
)

STREAM_PATH = "/v1beta/models/gemini-test:streamGenerateContent"
#: What OpenAI-style clients send: keys Gemini's ``Schema`` refuses at several depths.
WEATHER_PARAMETERS: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "WeatherArgs",
    "type": "object",
    "additionalProperties": False,
    "strict": True,
    "properties": {
        "city": {"type": "string", "title": "City", "description": "where"},
        "days": {"type": ["integer", "null"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "place": {"$ref": "#/$defs/Place"},
    },
    "required": ["city"],
    "$defs": {
        "Place": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"lat": {"type": "number"}},
        }
    },
}
WEATHER_DECLARED: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "where"},
        "days": {"type": "integer", "nullable": True},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "place": {"type": "object", "properties": {"lat": {"type": "number"}}},
    },
    "required": ["city"],
}
WEATHER_ARGUMENTS = {"city": "fake", "days": 1, "unit": "celsius", "place": {"lat": 1.5}}
WEATHER = Tool("get_weather", "The weather in a city", WEATHER_PARAMETERS, strict=True)
TIME = Tool(
    "get_time", "The time in a city", {"type": "object", "properties": {"zone": {"type": "string"}}}
)
ASK: list[Message] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "weather in Paris?"},
]


@pytest.fixture
def provider(fake: FakeLLM, session: aiohttp.ClientSession) -> GeminiProvider:
    return GeminiProvider(fake.url, "test-key", session, default_model="gemini-test")


def request(
    messages: list[Message] = ASK,
    tools: tuple[Tool, ...] = (WEATHER, TIME),
    choice: ToolChoice | None = None,
    output: OutputFormat | None = None,
) -> ProviderRequest:
    return ProviderRequest(
        messages, "gemini-test", tools=Tools(tools, choice) if tools else None, output=output
    )


def calls_of(chunks: list[Chunk]) -> list[ToolCallDelta]:
    return [piece for chunk in chunks for piece in chunk.tool_calls]


def last_body(fake: FakeLLM) -> dict[str, Any]:
    record = fake.requests()[-1]
    assert record["path"] == STREAM_PATH
    body: dict[str, Any] = record["body"]
    return body


async def test_a_streamed_function_call_is_one_whole_tool_call_chunk(
    provider: GeminiProvider, fake: FakeLLM
) -> None:
    chunks = await collect(provider, request())
    assert calls_of(chunks) == [
        ToolCallDelta(0, "call_0", "get_weather", orjson.dumps(WEATHER_ARGUMENTS).decode())
    ]
    assert "".join(c.text for c in chunks) == ""
    assert chunks[-1].finish_reason == "stop"  # the chat service makes it tool_calls
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 1
    body = last_body(fake)
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "parameters": WEATHER_DECLARED,
                },
                {
                    "name": "get_time",
                    "description": "The time in a city",
                    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
                },
            ]
        }
    ]
    assert "toolConfig" not in body  # no choice: Gemini's default (AUTO)
    assert body["contents"] == [{"role": "user", "parts": [{"text": "weather in Paris?"}]}]


async def test_every_tool_is_two_calls_with_their_own_indexes(provider: GeminiProvider) -> None:
    ask: list[Message] = [{"role": "user", "content": "use every tool please"}]
    chunks = await collect(provider, request(ask))
    calls = calls_of(chunks)
    assert [(c.index, c.id, c.name) for c in calls] == [
        (0, "call_0", "get_weather"),
        (1, "call_1", "get_time"),
    ]
    assert orjson.loads(calls[1].arguments) == {"zone": "fake"}


async def test_tool_results_become_one_user_content_of_function_responses(
    provider: GeminiProvider, fake: FakeLLM
) -> None:
    history: list[Message] = [
        {"role": "user", "content": "weather and time in Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                {"id": "call_b", "name": "get_time", "arguments": ""},
            ],
        },
        {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": "call_a"},
        {"role": "tool", "content": "noon", "tool_call_id": "call_b", "name": "get_time"},
    ]
    chunks = await collect(provider, request(history))
    assert calls_of(chunks) == []  # after tool results the fake answers in words
    assert "".join(c.text for c in chunks) == fake_reply(40)
    assert last_body(fake)["contents"] == [
        {"role": "user", "parts": [{"text": "weather and time in Paris?"}]},
        {
            "role": "model",
            "parts": [
                {"text": "Let me look."},
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                {"functionCall": {"name": "get_time", "args": {}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temperature": 21}}},
                {"functionResponse": {"name": "get_time", "response": {"content": "noon"}}},
            ],
        },
    ]


async def test_a_result_for_an_unknown_call_is_unsupported_before_any_request(
    provider: GeminiProvider, fake: FakeLLM
) -> None:
    orphan: list[Message] = [
        {"role": "user", "content": "hi"},
        {"role": "tool", "content": "42", "tool_call_id": "call_x"},
    ]
    with pytest.raises(Unsupported) as caught:
        await collect(provider, request(orphan))
    assert "call_x" in caught.value.message and caught.value.retryable is False
    assert fake.requests() == []


@pytest.mark.parametrize(
    ("choice", "config", "called"),
    [
        (ToolChoice("auto"), {"mode": "AUTO"}, ["get_weather"]),
        (ToolChoice("none"), {"mode": "NONE"}, []),
        (ToolChoice("required"), {"mode": "ANY"}, ["get_weather"]),
        (
            ToolChoice("function", "get_time"),
            {"mode": "ANY", "allowedFunctionNames": ["get_time"]},
            ["get_time"],
        ),
    ],
    ids=["auto", "none", "required", "function"],
)
async def test_tool_choice_is_the_function_calling_config(
    provider: GeminiProvider,
    fake: FakeLLM,
    choice: ToolChoice,
    config: dict[str, Any],
    called: list[str],
) -> None:
    chunks = await collect(provider, request(choice=choice))
    assert last_body(fake)["toolConfig"] == {"functionCallingConfig": config}
    assert [call.name for call in calls_of(chunks)] == called
    if not called:
        assert "".join(c.text for c in chunks) == fake_reply(40)


async def test_a_tool_without_parameters_is_declared_without_them(
    provider: GeminiProvider, fake: FakeLLM
) -> None:
    bare = Tool(
        "ping", parameters={"type": "object", "properties": {}, "additionalProperties": False}
    )
    chunks = await collect(provider, request(tools=(bare,)))
    assert last_body(fake)["tools"] == [{"functionDeclarations": [{"name": "ping"}]}]
    assert calls_of(chunks) == [ToolCallDelta(0, "call_0", "ping", "{}")]


async def test_json_schema_output_reaches_gemini_sanitised_and_the_answer_parses(
    provider: GeminiProvider, fake: FakeLLM
) -> None:
    output = OutputFormat("json_schema", WEATHER_PARAMETERS, name="weather", strict=True)
    chunks = await collect(provider, request(tools=(), output=output))
    assert last_body(fake)["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseSchema": WEATHER_DECLARED,
    }
    assert len([c for c in chunks if c.text]) == 3  # the fake's JSON comes in three pieces
    assert orjson.loads("".join(c.text for c in chunks)) == WEATHER_ARGUMENTS
    assert chunks[-1].finish_reason == "stop"


async def test_json_output_without_a_schema_is_only_the_mime_type(
    provider: GeminiProvider, fake: FakeLLM
) -> None:
    chunks = await collect(provider, request(tools=(), output=OutputFormat("json")))
    assert last_body(fake)["generationConfig"] == {"responseMimeType": "application/json"}
    assert orjson.loads("".join(c.text for c in chunks)) == JSON_ANSWER


def test_gemini_schema_inlines_recursive_references_once_and_keeps_property_names() -> None:
    tree = {
        "$ref": "#/definitions/Node",
        "definitions": {
            "Node": {
                "type": "object",
                "properties": {
                    "title": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/definitions/Node"}},
                },
            }
        },
    }
    assert gemini_schema(tree) == {
        "type": "object",
        "properties": {"title": {"type": "string"}, "children": {"type": "array", "items": {}}},
    }
    assert gemini_schema({"oneOf": [{"type": "string"}, {"const": 1}], "enum": [1, 2]}) == {
        "anyOf": [{"type": "string"}, {}]
    }


def test_a_call_keeps_the_id_gemini_gave_it() -> None:
    assert tool_call_delta({"id": "abc", "name": "f", "args": {"x": 1}}, 2) == ToolCallDelta(
        2, "abc", "f", '{"x":1}'
    )
    assert tool_call_delta({"name": "f"}, 0) == ToolCallDelta(0, "call_0", "f", "{}")


@pytest.mark.parametrize(
    ("extra", "unknown"),
    [
        (
            {
                "tools": [
                    {
                        "functionDeclarations": [
                            {"name": "get_weather", "parameters": WEATHER_PARAMETERS}
                        ]
                    }
                ]
            },
            "$schema",
        ),
        (
            {
                "generationConfig": {
                    "responseMimeType": "application/json",
                    "responseSchema": {
                        "type": "object",
                        "properties": {"a": {"additionalProperties": False}},
                    },
                }
            },
            "additionalProperties",
        ),
    ],
    ids=["parameters", "responseSchema"],
)
def test_the_fake_refuses_schema_keys_gemini_does_not_know(
    fake: FakeLLM, extra: dict[str, Any], unknown: str
) -> None:
    """As Gemini does: so the sanitising above is what lets those schemas through."""
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], **extra}
    response = httpx.post(
        f"{fake.url}{STREAM_PATH}",
        params={"alt": "sse"},
        json=body,
        headers={"x-goog-api-key": "k"},
        timeout=5,
    )
    assert response.status_code == 400
    assert f'Unknown name "{unknown}"' in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "parts"),
    [
        (
            {
                "tools": [
                    {"functionDeclarations": [{"name": "get_time", "parameters": TIME.parameters}]}
                ]
            },
            [{"functionCall": {"name": "get_time", "args": {"zone": "fake"}}}],
        ),
        (
            {"generationConfig": {"responseMimeType": "application/json"}},
            [{"text": orjson.dumps(JSON_ANSWER).decode()}],
        ),
    ],
    ids=["tool call", "json"],
)
def test_the_fake_answers_tools_and_json_without_streaming(
    fake: FakeLLM, extra: dict[str, Any], parts: list[dict[str, Any]]
) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], **extra}
    response = httpx.post(
        f"{fake.url}/v1beta/models/gemini-test:generateContent",
        json=body,
        headers={"x-goog-api-key": "k"},
        timeout=5,
    )
    assert response.status_code == 200, response.text
    candidate = response.json()["candidates"][0]
    assert candidate["content"] == {"parts": parts, "role": "model"}
    assert candidate["finishReason"] == "STOP"
