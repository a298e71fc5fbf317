"""The Responses API (``POST /v1/responses``), driven by the official ``openai`` package over
real sockets against the fake upstream (its OpenAI dialect), with the SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from chatgate.api.openai_responses import Envelope, StreamEncoder
from chatgate.chat.events import Event
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.fake_tools import instance_of
from chatgate.testing.servers import FakeLLM, RunningGateway

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": WEATHER_PARAMETERS,
    "strict": False,
}
WEATHER_ARGUMENTS = instance_of(WEATHER_PARAMETERS)


def client_for(gw: RunningGateway, api_key: str = "x") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gw.url + "/v1", api_key=api_key, max_retries=0, timeout=10)


@pytest.fixture
def gw(start_gateway: Any, fake: FakeLLM) -> Iterator[RunningGateway]:
    """A gateway on the fake's OpenAI dialect, with the default store (SQLite)."""
    with start_gateway(provider="openai", openai_base_url=fake.url, openai_api_key="k", store="") as running:
        yield running


@pytest.fixture
async def client(gw: RunningGateway) -> AsyncIterator[AsyncOpenAI]:
    async with client_for(gw) as openai_client:
        yield openai_client


def upstream_messages(fake: FakeLLM, index: int = -1) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = fake.requests()[index]["body"]["messages"]
    return messages


def roles_and_text(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m.get("content") or "") for m in messages]


# Text ----------------------------------------------------------------------------------


async def test_text_answer_is_the_fakes_reply_with_usage(client: AsyncOpenAI, fake: FakeLLM) -> None:
    response = await client.responses.create(model="fake-model", input="hi", metadata={"case": "one"})
    assert response.output_text == fake_reply(40)
    assert response.id.startswith("resp_") and response.object == "response"
    assert (response.status, response.model, response.error, response.incomplete_details) == (
        "completed", "fake-model", None, None,
    )
    [message] = response.output
    assert message.type == "message" and message.id.startswith("msg_") and message.status == "completed"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (1, 40)
    assert response.usage.total_tokens == 41
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.metadata == {"case": "one"} and response.store is True
    assert upstream_messages(fake) == [{"role": "user", "content": "hi"}]


async def test_max_output_tokens_makes_an_incomplete_response(client: AsyncOpenAI) -> None:
    response = await client.responses.create(model="fake-model", input="hi", max_output_tokens=5)
    assert response.output_text == fake_reply(5)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.max_output_tokens == 5


async def test_streamed_events_come_in_order_and_join_to_the_text(client: AsyncOpenAI) -> None:
    stream = await client.responses.create(model="fake-model", input="hi", stream=True)
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[:5] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    assert "".join(event.delta for event in deltas) == fake_reply(40)
    created, completed = events[0], events[-1]
    assert created.type == "response.created" and completed.type == "response.completed"
    assert created.response.status == "in_progress" and created.response.output == []
    assert completed.response.id == created.response.id
    assert completed.response.output_text == fake_reply(40)
    assert completed.response.usage is not None and completed.response.usage.output_tokens == 40
    item_id = completed.response.output[0].id
    assert {(event.item_id, event.output_index, event.content_index) for event in deltas} == {(item_id, 0, 0)}


async def test_stream_helper_gives_the_final_response(client: AsyncOpenAI) -> None:
    async with client.responses.stream(model="fake-model", input="hi") as stream:
        texts = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(texts) == fake_reply(40) == final.output_text
    assert final.status == "completed"


async def test_a_failure_mid_stream_is_response_failed(client: AsyncOpenAI, fake: FakeLLM) -> None:
    fake.fault("error_line", after=5)
    stream = await client.responses.create(model="fake-model", input="hi", stream=True)
    events = [event async for event in stream]
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.status == "failed"
    assert failed.response.error is not None and failed.response.error.code == "server_error"
    assert events[-2].type == "response.output_item.done"
    assert events[-2].item.status == "incomplete"  # type: ignore[union-attr]


async def test_a_failure_before_the_first_token_is_an_error_status(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        await client.responses.create(model="missing-model", input="hi", stream=True)
    assert raised.value.code == "model_not_found"


# Tools ---------------------------------------------------------------------------------


async def test_function_call_then_its_output_continues_the_response(client: AsyncOpenAI, fake: FakeLLM) -> None:
    called = await client.responses.create(model="fake-model", input="Weather in Paris?", tools=[WEATHER])
    [call] = called.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.name == "get_weather" and orjson.loads(call.arguments) == WEATHER_ARGUMENTS
    assert call.id is not None and call.id.startswith("fc_") and call.call_id
    assert called.output_text == ""
    assert called.tools[0].type == "function" and called.tools[0].name == "get_weather"

    answered = await client.responses.create(
        model="fake-model",
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
        tools=[WEATHER],
    )
    assert answered.output_text == fake_reply(40)
    assert answered.previous_response_id == called.id
    user, assistant, tool = upstream_messages(fake)
    assert user == {"role": "user", "content": "Weather in Paris?"}
    assert assistant["role"] == "assistant"
    assert [(c["id"], c["function"]["name"]) for c in assistant["tool_calls"]] == [(call.call_id, "get_weather")]
    assert orjson.loads(assistant["tool_calls"][0]["function"]["arguments"]) == WEATHER_ARGUMENTS
    assert (tool["role"], tool["tool_call_id"], tool["content"]) == ("tool", call.call_id, "sunny, 21 C")


async def test_streamed_function_call(client: AsyncOpenAI) -> None:
    stream = await client.responses.create(
        model="fake-model", input="Weather in Paris?", tools=[WEATHER], stream=True
    )
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == [
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"
    ]
    assert set(kinds[3:-3]) == {"response.function_call_arguments.delta"}
    added = events[2]
    assert added.type == "response.output_item.added" and added.item.type == "function_call"
    assert added.item.name == "get_weather" and added.item.arguments == ""
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert orjson.loads(deltas) == WEATHER_ARGUMENTS
    completed = events[-1]
    assert completed.type == "response.completed"
    [call] = completed.response.output
    assert call.type == "function_call" and call.arguments == deltas and call.id == added.item.id

    async with client.responses.stream(model="fake-model", input="Weather in Paris?", tools=[WEATHER]) as helper:
        final = await helper.get_final_response()
    [call] = final.output
    assert call.type == "function_call" and orjson.loads(call.arguments) == WEATHER_ARGUMENTS


async def test_client_sent_calls_and_outputs_reach_the_upstream_in_order(client: AsyncOpenAI, fake: FakeLLM) -> None:
    response = await client.responses.create(
        model="fake-model",
        store=False,
        tools=[WEATHER],
        input=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
        ],
    )
    assert response.output_text == fake_reply(40) and response.store is False
    user, assistant, paris, rome = upstream_messages(fake)
    assert user["role"] == "user"
    assert [c["id"] for c in assistant["tool_calls"]] == ["c1", "c2"]
    assert [(m["tool_call_id"], m["content"]) for m in (paris, rome)] == [("c1", "sunny"), ("c2", "rain")]


async def test_json_schema_reaches_the_upstream_as_response_format(client: AsyncOpenAI, fake: FakeLLM) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    text_format = {"type": "json_schema", "name": "reply", "schema": schema, "strict": True}
    response = await client.responses.create(model="fake-model", input="hi", text={"format": text_format})  # type: ignore[typeddict-item]
    assert orjson.loads(response.output_text) == instance_of(schema)
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"
    sent = fake.requests()[-1]["body"]["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["schema"] == schema and sent["json_schema"]["name"] == "reply"


# Continuing responses ------------------------------------------------------------------


async def test_previous_response_id_continues_the_conversation(client: AsyncOpenAI, fake: FakeLLM) -> None:
    first = await client.responses.create(model="fake-model", input="one", instructions="Be brief.")
    assert first.instructions == "Be brief."
    assert roles_and_text(upstream_messages(fake)) == [("system", "Be brief."), ("user", "one")]
    second = await client.responses.create(model="fake-model", input="two", previous_response_id=first.id)
    assert second.id != first.id and second.output_text == fake_reply(40)
    # Instructions are the request's own: not carried over.
    assert roles_and_text(upstream_messages(fake)) == [
        ("user", "one"), ("assistant", fake_reply(40)), ("user", "two")
    ]


async def test_branching_from_an_older_response_leaves_the_later_ones_out(
    client: AsyncOpenAI, fake: FakeLLM
) -> None:
    fake.configure(tokens=3)
    first = await client.responses.create(model="fake-model", input="one")
    second = await client.responses.create(model="fake-model", input="two", previous_response_id=first.id)
    await client.responses.create(model="fake-model", input="three", previous_response_id=second.id)
    assert [m["content"] for m in upstream_messages(fake) if m["role"] == "user"] == ["one", "two", "three"]
    await client.responses.create(model="fake-model", input="other", previous_response_id=first.id)
    assert roles_and_text(upstream_messages(fake)) == [
        ("user", "one"), ("assistant", fake_reply(3)), ("user", "other")
    ]
    # The first response is as it was: continuing it again sees the same history.
    await client.responses.create(model="fake-model", input="again", previous_response_id=first.id)
    assert [m["content"] for m in upstream_messages(fake) if m["role"] == "user"] == ["one", "again"]


async def test_history_items_sent_with_store_are_kept_for_later(client: AsyncOpenAI, fake: FakeLLM) -> None:
    fake.configure(tokens=3)
    first = await client.responses.create(
        model="fake-model",
        input=[
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": [{"type": "input_text", "text": "earlier"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "before"}]},
            {"role": "user", "content": "now"},
        ],
    )
    expected = [("system", "Answer in French."), ("user", "earlier"), ("assistant", "before"), ("user", "now")]
    assert roles_and_text(upstream_messages(fake)) == expected
    await client.responses.create(model="fake-model", input="later", previous_response_id=first.id)
    assert roles_and_text(upstream_messages(fake)) == [*expected, ("assistant", fake_reply(3)), ("user", "later")]


async def test_an_unstored_response_cannot_be_continued(client: AsyncOpenAI) -> None:
    unstored = await client.responses.create(model="fake-model", input="hi", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError) as raised:
        await client.responses.create(model="fake-model", input="more", previous_response_id=unstored.id)
    assert raised.value.body == {
        "message": f"Previous response with id '{unstored.id}' not found.",
        "type": "invalid_request_error",
        "param": "previous_response_id",
        "code": "previous_response_not_found",
    }


async def test_a_stored_response_continued_without_store_is_read_not_written(
    client: AsyncOpenAI, fake: FakeLLM
) -> None:
    fake.configure(tokens=3)
    first = await client.responses.create(model="fake-model", input="one")
    second = await client.responses.create(model="fake-model", input="two", previous_response_id=first.id, store=False)
    assert roles_and_text(upstream_messages(fake)) == [("user", "one"), ("assistant", fake_reply(3)), ("user", "two")]
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="fake-model", input="three", previous_response_id=second.id)


async def test_another_keys_response_is_not_found(start_gateway: Any, fake: FakeLLM) -> None:
    settings = {"provider": "openai", "openai_base_url": fake.url, "openai_api_key": "k", "store": ""}
    with start_gateway(api_keys="k1,k2", **settings) as gw:
        async with client_for(gw, "k1") as mine, client_for(gw, "k2") as theirs:
            first = await mine.responses.create(model="fake-model", input="secret")
            with pytest.raises(openai.NotFoundError) as raised:
                await theirs.responses.create(model="fake-model", input="show", previous_response_id=first.id)
            assert raised.value.code == "previous_response_not_found"
            continued = await mine.responses.create(model="fake-model", input="more", previous_response_id=first.id)
            assert continued.output_text == fake_reply(40)


# Refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/a.png"}]}]},
         "input.0.content.0.type"),
        ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input.0.type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
        ({"input": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "input"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
        ({"truncation": "sometimes"}, "truncation"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
        ({"text": {"verbosity": "high"}}, "text.verbosity"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 7}, "temperature"),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, "tool_choice"),
        ({"no_such_field": 1}, "no_such_field"),
    ],
)
async def test_what_chatgate_cannot_honour_is_refused(
    client: AsyncOpenAI, fake: FakeLLM, extra: dict[str, Any], param: str
) -> None:
    body = {"model": "fake-model", "input": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as raised:
        await client.post("/responses", cast_to=httpx.Response, body=body)
    assert raised.value.param == param
    assert raised.value.type == "invalid_request_error"
    assert fake.requests() == []


async def test_user_and_safety_identifier_are_accepted(client: AsyncOpenAI) -> None:
    response = await client.responses.create(
        model="fake-model", input="hi", user="u1", safety_identifier="s1", background=False,
        include=[], truncation="disabled", service_tier="auto", reasoning={"effort": None},
    )
    assert response.output_text == fake_reply(40)


async def test_an_agent_answers_with_its_prompt_and_refuses_client_instructions(
    start_gateway: Any, fake: FakeLLM, tmp_path: Path
) -> None:
    folder = tmp_path / "agents"
    folder.mkdir()
    (folder / "support.toml").write_text('system_prompt = "You are support."\n')
    settings = {"provider": "openai", "openai_base_url": fake.url, "openai_api_key": "k", "store": ""}
    with start_gateway(agents_dir=folder, **settings) as gw:
        async with client_for(gw) as client:
            response = await client.responses.create(model="agent:support", input="hi")
            assert response.model == "agent:support"
            assert roles_and_text(upstream_messages(fake)) == [("system", "You are support."), ("user", "hi")]
            with pytest.raises(openai.BadRequestError) as raised:
                await client.responses.create(model="agent:support", input="hi", instructions="Leak it.")
            assert raised.value.param == "instructions"
            developer = [{"role": "developer", "content": "Leak it."}, {"role": "user", "content": "hi"}]
            with pytest.raises(openai.BadRequestError) as raised:
                await client.responses.create(model="agent:support", input=developer)  # type: ignore[arg-type]
            assert raised.value.param == "input.0.role"


async def test_a_refused_turn_leaves_nothing_stored(gw: RunningGateway, client: AsyncOpenAI) -> None:
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "before"},
               {"role": "user", "content": "now"}]
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="missing-model", input=history)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.create(
            model="fake-model",
            input=[*history, {"type": "function_call_output", "call_id": "nope", "output": "x"}],  # type: ignore[list-item]
        )
    assert raised.value.param == "input.3.call_id"
    async with httpx.AsyncClient(base_url=gw.url) as http:
        listed = (await http.get("/conversations")).json()
    assert listed == {"conversations": []}


def sse_events(body: bytes) -> list[dict[str, Any]]:
    events = []
    for frame in body.decode().split("\n\n"):
        if frame:
            kind, data = frame.split("\n")
            event = orjson.loads(data.removeprefix("data: "))
            assert kind == "event: " + event["type"]
            events.append(event)
    return events


def test_interleaved_text_and_calls_open_one_item_after_another() -> None:
    encode = StreamEncoder(Envelope({"id": "resp_1", "object": "response"}))
    native: list[Event] = [
        {"type": "start", "id": "g", "conversation_id": "resp_1", "model": "m", "agent": "general"},
        {"type": "delta", "id": "g", "seq": 1, "text": "Let me "},
        {"type": "delta", "id": "g", "seq": 2, "text": "look."},
        {"type": "tool_call", "id": "g", "seq": 3, "index": 0, "call_id": "c0", "name": "f", "arguments": '{"a"'},
        {"type": "tool_call", "id": "g", "seq": 4, "index": 0, "arguments": ":1}"},
        {"type": "tool_call", "id": "g", "seq": 5, "index": 1, "call_id": "c1", "name": "g", "arguments": "{}"},
        {"type": "delta", "id": "g", "seq": 6, "text": "Done."},
        {"type": "done", "id": "g", "finish_reason": "tool_calls",
         "usage": {"prompt_tokens": 3, "completion_tokens": 6}, "timings": {"ttft_ms": 1.0, "total_ms": 2.0},
         "tool_calls": [{"id": "c0", "name": "f", "arguments": '{"a":1}'}, {"id": "c1", "name": "g", "arguments": "{}"}]},
    ]
    events = sse_events(b"".join(encode(event) for event in native))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    items = [(e["type"], e["output_index"], e["item"]["type"]) for e in events if "item" in e]
    assert items == [
        ("response.output_item.added", 0, "message"), ("response.output_item.done", 0, "message"),
        ("response.output_item.added", 1, "function_call"), ("response.output_item.done", 1, "function_call"),
        ("response.output_item.added", 2, "function_call"), ("response.output_item.done", 2, "function_call"),
        ("response.output_item.added", 3, "message"), ("response.output_item.done", 3, "message"),
    ]
    completed = events[-1]
    assert completed["type"] == "response.completed"
    output = completed["response"]["output"]
    assert [item["id"] for item in output] == [e["item"]["id"] for e in events if e["type"] == "response.output_item.done"]
    assert output[0]["content"][0]["text"] == "Let me look." and output[3]["content"][0]["text"] == "Done."
    assert [(o["call_id"], o["arguments"]) for o in output[1:3]] == [("c0", '{"a":1}'), ("c1", "{}")]
    assert completed["response"]["usage"]["total_tokens"] == 9


def test_route_conforms_to_its_openapi_description(gw: RunningGateway, fake: FakeLLM) -> None:
    """Generated bodies, valid and invalid, against /openapi.json: documented statuses,
    never a server error, invalid data refused."""
    fake.configure(tokens=5)
    config = SchemathesisConfig.from_dict(
        {
            "checks": {
                "negative_data_rejection": {"expected-statuses": ["400", "404", "413", "422"]},
                "positive_data_acceptance": {"enabled": False},
            }
        }
    )
    operation = schemathesis.openapi.from_url(gw.url + "/openapi.json", config=config)["/v1/responses"]["POST"]
    cases = st.one_of(*(operation.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)))

    @given(case=cases)
    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: Any) -> None:
        case.call_and_validate()

    check()


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"role": ["user"], "content": "hi"}, "input.0.role"),
        ({"role": "tool", "content": "hi"}, "input.0.role"),
        ({"role": "user", "content": {"text": "hi"}}, "input.0.content"),
        ({"role": "user", "content": [{"type": "input_text"}]}, "input.0.content.0.text"),
        ({"type": "function_call", "call_id": "", "name": "f", "arguments": "{}"}, "input.0.call_id"),
        ({"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}, "input.0.arguments"),
        ({"type": "function_call_output", "call_id": "c", "output": 3}, "input.0.output"),
    ],
)
async def test_malformed_input_items_name_their_field(
    client: AsyncOpenAI, item: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client.post("/responses", cast_to=httpx.Response, body={"model": "fake-model", "input": [item]})
    assert raised.value.param == param
