"""Tools and structured output through the OpenAI and Ollama adapters, against the fake
upstream served in this process: what each adapter puts on its wire, and how it reads the
calls and JSON the fake answers (as ``fake_tools`` decides them)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from upstream import collect

from chatgate.providers.base import (
    Chunk,
    Provider,
    ProviderRequest,
    ProviderStreamError,
    Unsupported,
)
from chatgate.providers.ollama import OllamaProvider
from chatgate.providers.openai import OpenAIProvider
from chatgate.testing.fake_llm import FakeServer, FakeSettings, fake_reply, start_fake_llm
from chatgate.testing.fake_tools import EVERY_TOOL, JSON_ANSWER, instance_of, json_answer, pieces
from chatgate.vocabulary import (
    Message,
    OutputFormat,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Tools,
)

TOKENS = 5
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
CLOCK_PARAMETERS = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC"]}}}
WEATHER = Tool("weather", "The forecast for a city", WEATHER_PARAMETERS)
CLOCK = Tool("clock", parameters=CLOCK_PARAMETERS, strict=True)
ASK: list[Message] = [{"role": "user", "content": "what is the weather in Paris"}]
SCHEMA = {"type": "object", "properties": {"temperature": {"type": "number"}, "sunny": {"type": "boolean"}}}
WIRES = ["openai", "ollama"]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeServer]:
    server = await start_fake_llm(settings=FakeSettings(tokens=TOKENS))
    yield server
    await server.close()


def provider_for(wire: str, upstream: FakeServer, session: aiohttp.ClientSession) -> Provider:
    if wire == "openai":
        return OpenAIProvider(upstream.url, "sk-test", session, default_model="fake-model")
    return OllamaProvider(upstream.url, session, default_model="fake-model")


async def last_body(upstream: FakeServer, session: aiohttp.ClientSession) -> dict[str, Any]:
    async with session.get(f"{upstream.url}/_fake/requests") as response:
        records = (await response.json())["requests"]
    body: dict[str, Any] = records[-1]["body"]
    return body


def request(
    messages: list[Message] = ASK,
    tools: Tools | None = None,
    output: OutputFormat | None = None,
) -> ProviderRequest:
    return ProviderRequest(messages, "fake-model", tools=tools, output=output)


def call_pieces(chunks: list[Chunk]) -> list[ToolCallDelta]:
    return [piece for chunk in chunks for piece in chunk.tool_calls]


def joined(chunks: list[Chunk]) -> dict[int, dict[str, str]]:
    """The calls the pieces make up, by index, as the chat service gathers them."""
    calls: dict[int, dict[str, str]] = {}
    for piece in call_pieces(chunks):
        call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
        call["id"] = piece.id or call["id"]
        call["name"] = piece.name or call["name"]
        call["arguments"] += piece.arguments
    return calls


def arguments_of(parameters: dict[str, Any]) -> str:
    return orjson.dumps(instance_of(parameters)).decode()


async def test_openai_streams_a_call_in_pieces_as_they_arrive(
    upstream: FakeServer, session: aiohttp.ClientSession
) -> None:
    provider = provider_for("openai", upstream, session)
    chunks = await collect(provider, request(tools=Tools((WEATHER,))))
    first, *fragments = call_pieces(chunks)
    assert first.index == 0 and first.name == "weather" and first.id == "call_fake_1_0"
    assert len(fragments) >= 2
    assert all(p.index == 0 and p.id is None and p.name is None and p.arguments for p in fragments)
    assert [p.arguments for p in fragments] == pieces(arguments_of(WEATHER_PARAMETERS))
    assert joined(chunks)[0]["arguments"] == arguments_of(WEATHER_PARAMETERS)
    assert all(not c.text for c in chunks)
    assert chunks[-1].finish_reason == "tool_calls" and not chunks[-1].tool_calls
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 1 + len(fragments)


async def test_openai_sends_tools_choice_and_parallel_as_openai_spells_them(
    upstream: FakeServer, session: aiohttp.ClientSession
) -> None:
    provider = provider_for("openai", upstream, session)
    tools = Tools((WEATHER, CLOCK), ToolChoice("function", "clock"), parallel=False)
    chunks = await collect(provider, request(tools=tools))
    body = await last_body(upstream, session)
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "The forecast for a city",
                "parameters": WEATHER_PARAMETERS,
            },
        },
        {"type": "function", "function": {"name": "clock", "parameters": CLOCK_PARAMETERS, "strict": True}},
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "clock"}}
    assert body["parallel_tool_calls"] is False
    assert joined(chunks) == {
        0: {"id": "call_fake_1_0", "name": "clock", "arguments": arguments_of(CLOCK_PARAMETERS)}
    }


@pytest.mark.parametrize("mode", ["auto", "required"])
async def test_openai_sends_a_choice_by_its_mode(
    upstream: FakeServer, session: aiohttp.ClientSession, mode: Any
) -> None:
    await collect(provider_for("openai", upstream, session), request(tools=Tools((WEATHER,), ToolChoice(mode))))
    assert (await last_body(upstream, session))["tool_choice"] == mode


@pytest.mark.parametrize("wire", WIRES)
async def test_every_tool_is_called_in_order(
    upstream: FakeServer, session: aiohttp.ClientSession, wire: str
) -> None:
    ask: list[Message] = [{"role": "user", "content": f"use {EVERY_TOOL} you have"}]
    chunks = await collect(provider_for(wire, upstream, session), request(ask, Tools((WEATHER, CLOCK))))
    calls = joined(chunks)
    assert sorted(calls) == [0, 1]
    assert [calls[0]["name"], calls[1]["name"]] == ["weather", "clock"]
    assert calls[0]["arguments"] == arguments_of(WEATHER_PARAMETERS)
    assert calls[1]["arguments"] == arguments_of(CLOCK_PARAMETERS)
    assert calls[0]["id"] and calls[1]["id"] and calls[0]["id"] != calls[1]["id"]
    assert chunks[-1].finish_reason == ("tool_calls" if wire == "openai" else "stop")


async def test_ollama_yields_each_call_whole_with_an_id_of_the_answer(
    upstream: FakeServer, session: aiohttp.ClientSession
) -> None:
    ask: list[Message] = [{"role": "user", "content": EVERY_TOOL}]
    chunks = await collect(provider_for("ollama", upstream, session), request(ask, Tools((WEATHER, CLOCK))))
    assert call_pieces(chunks) == [
        ToolCallDelta(0, "call_0", "weather", arguments_of(WEATHER_PARAMETERS)),
        ToolCallDelta(1, "call_1", "clock", arguments_of(CLOCK_PARAMETERS)),
    ]
    assert len([c for c in chunks if c.tool_calls]) == 1
    body = await last_body(upstream, session)
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "The forecast for a city",
                "parameters": WEATHER_PARAMETERS,
            },
        },
        {"type": "function", "function": {"name": "clock", "parameters": CLOCK_PARAMETERS}},
    ]
    assert "tool_choice" not in body and "parallel_tool_calls" not in body


def answered_history(with_name: bool) -> list[Message]:
    call: ToolCall = {"id": "call_abc", "name": "weather", "arguments": '{"city": "Paris"}'}
    result: Message = {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_abc"}
    if with_name:
        result["name"] = "weather"
    return [*ASK, {"role": "assistant", "content": "", "tool_calls": [call]}, result]


@pytest.mark.parametrize("with_name", [True, False])
@pytest.mark.parametrize("wire", WIRES)
async def test_tool_results_get_text_and_reach_upstream_in_its_format(
    upstream: FakeServer, session: aiohttp.ClientSession, wire: str, with_name: bool
) -> None:
    chunks = await collect(
        provider_for(wire, upstream, session), request(answered_history(with_name), Tools((WEATHER,)))
    )
    assert "".join(c.text for c in chunks) == fake_reply(TOKENS)
    assert not call_pieces(chunks) and chunks[-1].finish_reason == "stop"
    messages = (await last_body(upstream, session))["messages"]
    assert messages[0] == ASK[0]
    if wire == "openai":
        assert messages[1:] == [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_abc", "content": "sunny, 21 C"},
        ]
    else:
        assert messages[1:] == [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}],
            },
            {"role": "tool", "content": "sunny, 21 C", "tool_name": "weather"},
        ]


async def test_ollama_sends_arguments_that_are_not_an_object_as_an_empty_one(
    upstream: FakeServer, session: aiohttp.ClientSession
) -> None:
    history: list[Message] = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "weather", "arguments": "[1]"}]},
        {"role": "tool", "content": "?", "tool_call_id": "unknown"},
    ]
    await collect(provider_for("ollama", upstream, session), request(history))
    messages = (await last_body(upstream, session))["messages"]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {}
    assert messages[2] == {"role": "tool", "content": "?"}


OUTPUTS = [
    (OutputFormat("json"), {"type": "json_object"}, "json", None),
    (
        OutputFormat("json_schema", SCHEMA, name="weather_report", strict=True),
        {"type": "json_schema", "json_schema": {"name": "weather_report", "schema": SCHEMA, "strict": True}},
        SCHEMA,
        SCHEMA,
    ),
    (
        OutputFormat("json_schema", SCHEMA),
        {"type": "json_schema", "json_schema": {"name": "response", "schema": SCHEMA}},
        SCHEMA,
        SCHEMA,
    ),
]


@pytest.mark.parametrize(("output", "response_format", "ollama_format", "schema"), OUTPUTS)
@pytest.mark.parametrize("wire", WIRES)
async def test_output_format_reaches_upstream_exactly_and_json_comes_back(
    upstream: FakeServer,
    session: aiohttp.ClientSession,
    wire: str,
    output: OutputFormat,
    response_format: dict[str, Any],
    ollama_format: Any,
    schema: Any,
) -> None:
    chunks = await collect(provider_for(wire, upstream, session), request(output=output))
    body = await last_body(upstream, session)
    if wire == "openai":
        assert body["response_format"] == response_format and "format" not in body
    else:
        assert body["format"] == ollama_format and "response_format" not in body
    text = json_answer(schema)
    assert [c.text for c in chunks if c.text] == pieces(text)
    assert orjson.loads("".join(c.text for c in chunks)) == (instance_of(schema) if schema else JSON_ANSWER)
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(pieces(text))


@pytest.mark.parametrize("wire", WIRES)
async def test_tool_choice_none_gets_text(
    upstream: FakeServer, session: aiohttp.ClientSession, wire: str
) -> None:
    tools = Tools((WEATHER,), ToolChoice("none"))
    chunks = await collect(provider_for(wire, upstream, session), request(tools=tools))
    assert "".join(c.text for c in chunks) == fake_reply(TOKENS)
    assert not call_pieces(chunks) and chunks[-1].finish_reason == "stop"
    body = await last_body(upstream, session)
    if wire == "openai":
        assert body["tool_choice"] == "none" and body["tools"]
    else:
        assert "tools" not in body


async def test_ollama_refuses_to_force_a_call(upstream: FakeServer, session: aiohttp.ClientSession) -> None:
    provider = provider_for("ollama", upstream, session)
    with pytest.raises(Unsupported, match=r"cannot force a tool call \(tool_choice=required\)") as caught:
        await collect(provider, request(tools=Tools((WEATHER,), ToolChoice("required"))))
    assert caught.value.retryable is False
    with pytest.raises(Unsupported, match="'nowhere'"):
        await collect(provider, request(tools=Tools((WEATHER,), ToolChoice("function", "nowhere"))))
    async with session.get(f"{upstream.url}/_fake/requests") as response:
        assert (await response.json())["requests"] == []


async def test_ollama_offers_only_the_chosen_function(
    upstream: FakeServer, session: aiohttp.ClientSession
) -> None:
    tools = Tools((WEATHER, CLOCK), ToolChoice("function", "clock"), parallel=True)
    chunks = await collect(provider_for("ollama", upstream, session), request(tools=tools))
    assert [p.name for p in call_pieces(chunks)] == ["clock"]
    body = await last_body(upstream, session)
    assert [tool["function"]["name"] for tool in body["tools"]] == ["clock"]


@pytest.mark.parametrize("wire", WIRES)
async def test_plain_request_bodies_have_no_tool_or_format_keys(
    upstream: FakeServer, session: aiohttp.ClientSession, wire: str
) -> None:
    history: list[Message] = [{"role": "system", "content": "be brief"}, *ASK]
    for tools in (None, Tools()):
        chunks = await collect(provider_for(wire, upstream, session), request(history, tools))
        assert "".join(c.text for c in chunks) == fake_reply(TOKENS)
        body = await last_body(upstream, session)
        assert body["messages"] == history
        expected = {"model", "messages", "stream"} | ({"stream_options"} if wire == "openai" else set())
        assert set(body) == expected


async def test_a_call_cut_short_is_a_stream_error_after_its_first_pieces(
    upstream: FakeServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{upstream.url}/_fake/faults", json={"faults": [{"kind": "drop", "after": 2}]}):
        pass
    chunks: list[Chunk] = []
    with pytest.raises(ProviderStreamError):
        await collect(provider_for("openai", upstream, session), request(tools=Tools((WEATHER,))), chunks)
    assert [p.arguments for p in call_pieces(chunks)] == ["", pieces(arguments_of(WEATHER_PARAMETERS))[0]]


@pytest.mark.parametrize("wire", WIRES)
async def test_paced_upstream_paces_call_and_json_pieces(
    upstream: FakeServer, session: aiohttp.ClientSession, wire: str
) -> None:
    async with session.post(f"{upstream.url}/_fake/config", json={"tps": 20}):
        pass
    provider = provider_for(wire, upstream, session)
    await collect(provider, request(output=OutputFormat("json")))
    async with session.get(f"{upstream.url}/_fake/requests") as response:
        record = (await response.json())["requests"][-1]
    assert record["tokens_sent"] == len(pieces(json_answer(None))) == 3
    assert record["finished_at"] - record["first_token_at"] >= 2 / 20 * 0.9
