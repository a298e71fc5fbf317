"""Tool calling and structured output end to end: the official ``openai`` and ``ollama``
packages, the native WebSocket protocol and ``POST /chat``, against the fake upstream in
each of its wire formats (Ollama, OpenAI, Gemini), on the default SQLite store.

The fake answers a request that offers tools with a call of the first tool (or of each,
when the user's message says ``every tool``), its arguments an instance of the tool's
schema (``chatgate.testing.fake_tools``); after tool results it answers its usual text.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import ollama
import openai
import orjson
import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import connect

from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.fake_tools import instance_of, json_answer
from chatgate.testing.frames import send, until
from chatgate.testing.servers import FakeLLM, RunningGateway

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "the city"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER_PARAMETERS},
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}
WEATHER_ARGUMENTS = instance_of(WEATHER_PARAMETERS)
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "temperature": {"type": "number"}},
    "required": ["city", "temperature"],
    "additionalProperties": False,
}


@pytest.fixture(params=["ollama", "openai", "gemini"])
def upstream(request: pytest.FixtureRequest) -> str:
    """Which adapter the gateway talks to the fake through."""
    return str(request.param)


@pytest.fixture
def tools_gw(start_gateway: Any, fake: FakeLLM, upstream: str) -> Iterator[RunningGateway]:
    """A gateway on the default store (SQLite), through the ``upstream`` adapter."""
    adapters: dict[str, dict[str, Any]] = {
        "ollama": {"provider": "ollama", "ollama_host": fake.url, "model": "fake-model"},
        "openai": {"provider": "openai", "openai_base_url": fake.url + "/v1", "model": "fake-model"},
        "gemini": {"provider": "gemini", "gemini_base_url": fake.url, "gemini_api_key": "k", "model": "fake-model"},
    }
    with start_gateway(store="", **adapters[upstream]) as gw:
        yield gw


@pytest.fixture
async def client(tools_gw: RunningGateway) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=tools_gw.url + "/v1", api_key="x", max_retries=0, timeout=20) as openai_client:
        yield openai_client


def chat_requests(fake: FakeLLM) -> list[dict[str, Any]]:
    """The generation requests the fake received, in order, in whatever wire format."""
    return [
        r for r in fake.requests()
        if r["path"].endswith(("/api/chat", "/chat/completions")) or "GenerateContent" in r["path"]
    ]


def upstream_turns(record: dict[str, Any]) -> list[str]:
    """What each message of a recorded upstream request was, in the adapter-neutral terms
    ``user``, ``assistant``, ``call:<name>`` and ``result:<text>``, whatever the wire format."""
    body = record["body"]
    turns: list[str] = []
    for message in body.get("messages") or ():
        if message["role"] == "tool":
            turns.append(f"result:{message['content']}")
        elif message.get("tool_calls"):
            turns.extend(f"call:{call['function']['name']}" for call in message["tool_calls"])
        elif message["role"] in ("user", "assistant"):
            turns.append(message["role"])
    for content in body.get("contents") or ():  # Gemini
        for part in content["parts"]:
            if "functionCall" in part:
                turns.append(f"call:{part['functionCall']['name']}")
            elif "functionResponse" in part:
                response = part["functionResponse"]["response"]
                turns.append(f"result:{response.get('content', json.dumps(response, separators=(',', ':')))}")
            else:
                turns.append("user" if content["role"] == "user" else "assistant")
    return turns


# The official openai package ------------------------------------------------------------


async def test_a_non_streamed_tool_round_trip(client: AsyncOpenAI, fake: FakeLLM) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = await client.chat.completions.create(model="fake-model", messages=messages, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].type == "function" and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == WEATHER_ARGUMENTS
    assert calls[0].id

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": "18 degrees and sunny"},
    ]
    final = await client.chat.completions.create(model="fake-model", messages=messages, tools=[WEATHER_TOOL])
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == fake_reply(40)
    assert upstream_turns(chat_requests(fake)[-1]) == ["user", "call:get_weather", "result:18 degrees and sunny"]


async def test_a_streamed_tool_round_trip(client: AsyncOpenAI, fake: FakeLLM) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather and time, please: use every tool"}]
    stream = await client.chat.completions.create(
        model="fake-model", messages=messages, tools=[WEATHER_TOOL, TIME_TOOL], stream=True
    )
    chunks = [chunk async for chunk in stream]
    pieces = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or ()]
    assert {piece.index for piece in pieces} == {0, 1}
    # id, type and name come once per call: the openai package joins every string it is sent.
    assert [p.index for p in pieces if p.id] == [0, 1]
    assert [p.function.name for p in pieces if p.function and p.function.name] == ["get_weather", "get_time"]
    arguments = {
        index: "".join(p.function.arguments or "" for p in pieces if p.index == index and p.function)
        for index in (0, 1)
    }
    assert json.loads(arguments[0]) == WEATHER_ARGUMENTS and json.loads(arguments[1]) == {"tz": "fake"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The stream helper puts the same pieces back together.
    async with client.chat.completions.stream(
        model="fake-model", messages=messages, tools=[WEATHER_TOOL, TIME_TOOL]
    ) as helper:
        completion = await helper.get_final_completion()
    calls = completion.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", WEATHER_ARGUMENTS), ("get_time", {"tz": "fake"})
    ]
    messages += [
        completion.choices[0].message.model_dump(exclude_none=True, exclude={"parsed"}),
        *({"role": "tool", "tool_call_id": c.id, "content": f"result {i}"} for i, c in enumerate(calls)),
    ]
    stream = await client.chat.completions.create(
        model="fake-model", messages=messages, tools=[WEATHER_TOOL, TIME_TOOL], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == fake_reply(40)
    assert upstream_turns(chat_requests(fake)[-1]) == [
        "user", "call:get_weather", "call:get_time", "result:result 0", "result:result 1"
    ]


async def test_tool_choice_none_answers_text(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].message.content == fake_reply(40)


async def test_structured_output_reaches_the_upstream_and_parses(
    client: AsyncOpenAI, fake: FakeLLM, upstream: str
) -> None:
    completion = await client.chat.completions.parse(
        model="fake-model",
        messages=[{"role": "user", "content": "Weather in Paris as JSON"}],
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": ANSWER_SCHEMA, "strict": True}},
    )
    content = completion.choices[0].message.content
    assert content is not None and json.loads(content) == instance_of(ANSWER_SCHEMA)
    body = chat_requests(fake)[-1]["body"]
    if upstream == "openai":
        assert body["response_format"]["json_schema"]["schema"] == ANSWER_SCHEMA
    elif upstream == "ollama":
        assert body["format"] == ANSWER_SCHEMA
    else:
        config = body["generationConfig"]
        assert config["responseMimeType"] == "application/json"
        assert config["responseSchema"]["properties"] == ANSWER_SCHEMA["properties"]


async def test_a_tool_result_that_answers_no_call_is_refused(client: AsyncOpenAI, fake: FakeLLM) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(
            model="fake-model",
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "tool", "tool_call_id": "call_nobody_made", "content": "42"},
            ],
        )
    assert raised.value.body["param"] == "messages.1.tool_call_id"  # type: ignore[index]
    assert chat_requests(fake) == []


# The official ollama package --------------------------------------------------------------


def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather in a city.

    Args:
        city: The city
        unit: celsius or fahrenheit
    """
    return f"18 degrees {unit} in {city}"


async def test_ollama_chat_with_a_python_function_as_tool(tools_gw: RunningGateway, fake: FakeLLM) -> None:
    client = ollama.AsyncClient(host=tools_gw.url)
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    response = await client.chat(model="fake-model", messages=messages, tools=[get_weather])
    calls = response.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].function.name == "get_weather"
    arguments = dict(calls[0].function.arguments)
    assert arguments["city"] == "fake"
    messages += [response.message, {"role": "tool", "content": get_weather(**arguments), "tool_name": "get_weather"}]

    parts = [part async for part in await client.chat(model="fake-model", messages=messages, tools=[get_weather], stream=True)]
    assert "".join(part.message.content or "" for part in parts) == fake_reply(40)
    assert parts[-1].done
    assert upstream_turns(chat_requests(fake)[-1]) == ["user", "call:get_weather", f"result:{get_weather(**arguments)}"]

    streamed = [part async for part in await client.chat(
        model="fake-model", messages=messages[:1], tools=[get_weather], stream=True
    )]
    streamed_calls = [call for part in streamed for call in part.message.tool_calls or ()]
    assert [call.function.name for call in streamed_calls] == ["get_weather"]
    assert streamed[-1].done and streamed[-1].done_reason == "stop"


async def test_ollama_format_with_a_json_schema_reaches_the_upstream(
    tools_gw: RunningGateway, fake: FakeLLM, upstream: str
) -> None:
    client = ollama.AsyncClient(host=tools_gw.url)
    response = await client.chat(
        model="fake-model", messages=[{"role": "user", "content": "Weather in Paris as JSON"}], format=ANSWER_SCHEMA
    )
    assert json.loads(response.message.content or "") == instance_of(ANSWER_SCHEMA)
    body = chat_requests(fake)[-1]["body"]
    if upstream == "ollama":
        assert body["format"] == ANSWER_SCHEMA
    elif upstream == "openai":
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["schema"] == ANSWER_SCHEMA
    else:
        assert body["generationConfig"]["responseMimeType"] == "application/json"

    plain = await client.generate(model="fake-model", prompt="any JSON please", format="json")
    assert json.loads(plain.response) == json.loads(json_answer(None))


# The native WebSocket protocol and POST /chat -----------------------------------------------


async def test_native_tool_calls_stream_and_results_continue_the_remembered_conversation(
    tools_gw: RunningGateway, fake: FakeLLM
) -> None:
    async with connect(tools_gw.ws_url + "/ws") as ws:
        await send(ws, {
            "type": "chat", "id": "t1", "conversation_id": "trip", "message": "Weather in Paris?",
            "tools": [WEATHER_TOOL],
        })
        done, frames = await until(ws, "done", "error")
        assert done["type"] == "done" and done["finish_reason"] == "tool_calls"
        pieces = [f for f in frames if f["type"] == "tool_call"]
        assert pieces and pieces[0]["name"] == "get_weather" and pieces[0]["call_id"]
        assert json.loads("".join(p["arguments"] for p in pieces)) == WEATHER_ARGUMENTS
        [call] = done["tool_calls"]
        assert call["name"] == "get_weather" and json.loads(call["arguments"]) == WEATHER_ARGUMENTS

        # The moment the call ends, its result: the conversation holds the call.
        await send(ws, {
            "type": "chat", "id": "t2", "conversation_id": "trip", "tools": [WEATHER_TOOL],
            "tool_results": [{"tool_call_id": call["id"], "content": {"temperature": 18}}],
        })
        done, frames = await until(ws, "done", "error")
        assert done["type"] == "done" and done["finish_reason"] == "stop"
        assert "".join(f["text"] for f in frames if f["type"] == "delta") == fake_reply(40)
    assert upstream_turns(chat_requests(fake)[-1]) == ["user", "call:get_weather", 'result:{"temperature":18}']

    stored = httpx.get(f"{tools_gw.url}/conversations/trip").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert stored[1]["tool_calls"] == [call]
    assert stored[2]["tool_results"] == [{"tool_call_id": call["id"], "content": '{"temperature":18}'}]


async def test_native_tool_calls_resume_without_repeating_pieces(tools_gw: RunningGateway, fake: FakeLLM) -> None:
    async with connect(tools_gw.ws_url + "/ws") as ws:
        await send(ws, {"type": "chat", "id": "r1", "message": "every tool", "tools": [WEATHER_TOOL, TIME_TOOL]})
        done, frames = await until(ws, "done")
        seqs = [f["seq"] for f in frames if f["type"] == "tool_call"]
        assert len(seqs) >= 2 and seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        await send(ws, {"type": "resume", "id": "r1", "after": seqs[0]})
        resumed, replayed = await until(ws, "done")
    assert [f["seq"] for f in replayed if f["type"] == "tool_call"] == seqs[1:]
    assert resumed["tool_calls"] == done["tool_calls"]


async def test_post_chat_answers_tool_calls_and_takes_results(tools_gw: RunningGateway) -> None:
    url = f"{tools_gw.url}/chat"
    first = httpx.post(url, json={"message": "Weather in Paris?", "tools": [WEATHER_TOOL]}, timeout=20)
    assert first.status_code == 200, first.text
    reply = first.json()
    assert reply["finish_reason"] == "tool_calls" and reply["tool_calls"][0]["name"] == "get_weather"
    second = httpx.post(url, json={
        "conversation_id": reply["conversation_id"], "tools": [WEATHER_TOOL],
        "tool_results": [{"tool_call_id": reply["tool_calls"][0]["id"], "content": "sunny"}],
    }, timeout=20)
    assert second.status_code == 200, second.text
    assert second.json()["reply"] == fake_reply(40) and "tool_calls" not in second.json()

    with httpx.stream("POST", url, json={"message": "every tool", "tools": [WEATHER_TOOL, TIME_TOOL]},
                      headers={"Accept": "text/event-stream"}, timeout=20) as streamed:
        events = [orjson.loads(line[5:]) for line in streamed.iter_lines() if line.startswith("data:")]
    assert [e["name"] for e in events if e["type"] == "tool_call" and "name" in e] == ["get_weather", "get_time"]
    assert events[-1]["type"] == "done" and len(events[-1]["tool_calls"]) == 2

    plain = httpx.post(url, json={"message": "x", "tools": [WEATHER_TOOL], "stream": True}, timeout=20)
    assert plain.status_code == 400 and "event-stream" in plain.json()["detail"]


async def test_parallel_tool_calls_false_passes_on_one_call(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "use every tool"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        parallel_tool_calls=False,
    )
    calls = completion.choices[0].message.tool_calls or []
    assert [call.function.name for call in calls] == ["get_weather"]
    assert completion.choices[0].finish_reason == "tool_calls"


# The Responses API through every adapter ---------------------------------------------------

RESPONSES_WEATHER: dict[str, Any] = {"type": "function", **WEATHER_TOOL["function"]}


async def test_responses_function_round_trip_through_each_upstream(client: AsyncOpenAI, fake: FakeLLM) -> None:
    async with client.responses.stream(
        model="fake-model", input="Weather in Paris?", tools=[RESPONSES_WEATHER]  # type: ignore[list-item]
    ) as stream:
        kinds = [event.type async for event in stream]
        first = await stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == WEATHER_ARGUMENTS

    second = await client.responses.create(
        model="fake-model",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees"}],
        tools=[RESPONSES_WEATHER],  # type: ignore[list-item]
    )
    assert second.output_text == fake_reply(40)
    assert upstream_turns(chat_requests(fake)[-1]) == ["user", "call:get_weather", "result:18 degrees"]

    streamed = await client.responses.create(
        model="fake-model", previous_response_id=second.id, input="And tomorrow?", stream=True
    )
    deltas = [event.delta async for event in streamed if event.type == "response.output_text.delta"]
    assert "".join(deltas) == fake_reply(40)
    assert upstream_turns(chat_requests(fake)[-1]) == [
        "user", "call:get_weather", "result:18 degrees", "assistant", "user"
    ]
