"""Client options over the wire: a bad one is refused by every API, naming the field,
before anything reaches the upstream; a good one reaches it under its upstream name."""

from __future__ import annotations

import json
from typing import Any

import httpx
import orjson
import pytest
from websockets.sync.client import ClientConnection, connect

from chatgate.testing.servers import FakeLLM, RunningGateway

HELLO = [{"role": "user", "content": "Hello there"}]
INT64 = 2**63 - 1

# (the options object, the field the error must name)
BAD_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"max_tokens": -5}, "options.max_tokens"),
    ({"max_tokens": 0}, "options.max_tokens"),
    ({"max_tokens": 1e30}, "options.max_tokens"),
    ({"max_tokens": 2**31}, "options.max_tokens"),
    ({"max_tokens": 5.5}, "options.max_tokens"),
    ({"max_tokens": "5"}, "options.max_tokens"),
    ({"max_completion_tokens": -1}, "options.max_completion_tokens"),
    ({"num_predict": -3}, "options.num_predict"),
    ({"num_ctx": 0}, "options.num_ctx"),
    ({"temperature": -1}, "options.temperature"),
    ({"temperature": 2.5}, "options.temperature"),
    ({"temperature": True}, "options.temperature"),
    ({"temperature": "hot"}, "options.temperature"),
    ({"top_p": 1.5}, "options.top_p"),
    ({"seed": INT64 + 1}, "options.seed"),
    ({"seed": 2**70}, "options.seed"),
    ({"seed": -INT64 - 2}, "options.seed"),
    ({"seed": 1.5}, "options.seed"),
    ({"stop": 5}, "options.stop"),
    ({"stop": ["x"] * 17}, "options.stop"),
    ({"stop": ["x" * 257]}, "options.stop"),
]
BAD_IDS = [f"{next(iter(o))}={next(iter(o.values()))!r}"[:40] for o, _ in BAD_OPTIONS]
OPENAI_FIELDS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed")
BAD_OPENAI = [
    pytest.param(options, field, id=name)
    for (options, field), name in zip(BAD_OPTIONS, BAD_IDS, strict=True)
    if next(iter(options)) in OPENAI_FIELDS
]


def recv(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(ws.recv(timeout=10))
    return frame


def send(ws: ClientConnection, frame: Any) -> None:
    ws.send(json.dumps(frame))  # orjson refuses integers beyond 64 bits; a client may not


def assert_open(ws: ClientConnection) -> None:
    send(ws, {"type": "ping"})
    assert recv(ws) == {"type": "pong"}


# Native WebSocket ----------------------------------------------------------------------


@pytest.mark.parametrize(("options", "field"), BAD_OPTIONS, ids=BAD_IDS)
def test_ws_refuses_a_bad_option_naming_it(
    gw: RunningGateway, fake: FakeLLM, options: dict[str, Any], field: str
) -> None:
    with connect(gw.ws_url + "/ws") as ws:
        send(ws, {"type": "chat", "id": "t1", "message": "hi", "options": options})
        error = recv(ws)
        assert error["type"] == "error" and error["code"] == "bad_request", error
        assert error["id"] == "t1" and error["retryable"] is False
        assert error["message"].startswith(field + " must be "), error
        assert_open(ws)
    assert fake.requests() == []


@pytest.mark.parametrize("options", [[], "x", 5, True])
def test_ws_refuses_options_that_are_not_an_object(
    gw: RunningGateway, fake: FakeLLM, options: Any
) -> None:
    with connect(gw.ws_url + "/ws") as ws:
        send(ws, {"type": "chat", "message": "hi", "options": options})
        error = recv(ws)
        assert error["code"] == "bad_request" and error["message"].startswith("options must be an object")
        assert_open(ws)
    assert fake.requests() == []


@pytest.mark.parametrize("kind", [{"a": 1}, ["chat"], 5, 1.5, None, True, "x" * 1000])
def test_ws_frame_type_of_any_json_value_is_bad_request(
    gw: RunningGateway, fake: FakeLLM, kind: Any
) -> None:
    with connect(gw.ws_url + "/ws") as ws:
        send(ws, {"type": kind, "message": "hi"})
        error = recv(ws)
        assert error["type"] == "error" and error["code"] == "bad_request", error
        assert error["message"].startswith("unknown frame type ")
        assert len(error["message"]) < 200
        assert_open(ws)
    assert fake.requests() == []


def test_ws_valid_options_reach_the_upstream_under_ollamas_names(
    gw: RunningGateway, fake: FakeLLM
) -> None:
    options = {
        "temperature": 0,
        "max_tokens": 7.0,
        "num_ctx": 2048,
        "top_p": 1,
        "stop": "END",
        "seed": -INT64 - 1,
        "top_k": 20,
    }
    with connect(gw.ws_url + "/ws") as ws:
        send(ws, {"type": "chat", "message": "hi", "options": options})
        while (frame := recv(ws))["type"] != "done":
            assert frame["type"] in ("start", "delta"), frame
    (sent,) = fake.requests()
    assert sent["body"]["options"] == {
        "temperature": 0.0,
        "num_predict": 7,
        "num_ctx": 2048,
        "top_p": 1.0,
        "stop": ["END"],
        "seed": -INT64 - 1,
        "top_k": 20,
    }


# Other dialects: a value that is not a string where one is expected ------------------


@pytest.mark.parametrize(
    "frame",
    [
        {"messages": [{"role": {"a": 1}, "content": "hi"}]},
        {"messages": [{"role": ["user"], "content": "hi"}]},
        {"type": {"a": 1}, "messages": [{"role": "user", "content": "hi"}]},
    ],
)
def test_cs_agent_frames_with_unhashable_values_are_refused(
    gw: RunningGateway, fake: FakeLLM, frame: dict[str, Any]
) -> None:
    with connect(gw.ws_url + "/ws/chat") as ws:
        send(ws, frame)
        error = recv(ws)
        assert error["type"] == "error" and "internal" not in orjson.dumps(error).decode()
        send(ws, {"type": "ping"})
        assert recv(ws) == {"type": "pong"}
    assert fake.requests() == []


# OpenAI-compatible ---------------------------------------------------------------------


@pytest.mark.parametrize(("options", "field"), BAD_OPENAI)
def test_openai_refuses_a_bad_field_in_openais_shape(
    gw: RunningGateway, fake: FakeLLM, options: dict[str, Any], field: str
) -> None:
    body = {"model": "fake-model", "messages": HELLO, **options}
    response = httpx.post(gw.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    param = field.removeprefix("options.")
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["code"] == "bad_request"
    assert error["message"].startswith(param + " must be "), error
    assert fake.requests() == []


def test_openai_max_tokens_message_names_the_range(gw: RunningGateway, fake: FakeLLM) -> None:
    body = {"model": "fake-model", "messages": HELLO, "max_tokens": -5}
    response = httpx.post(gw.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "max_tokens must be an integer from 1 to 2147483647, not -5",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "bad_request",
    }
    assert fake.requests() == []


def test_openai_does_not_read_ollamas_names_at_the_top_level(
    gw: RunningGateway, fake: FakeLLM
) -> None:
    body = {"model": "fake-model", "messages": HELLO, "num_predict": -7, "num_ctx": "x"}
    assert httpx.post(gw.url + "/v1/chat/completions", json=body).status_code == 200
    assert "options" not in fake.requests()[-1]["body"]


def test_openai_valid_fields_reach_the_upstream(gw: RunningGateway, fake: FakeLLM) -> None:
    body = {
        "model": "fake-model",
        "messages": HELLO,
        "temperature": 2,
        "max_tokens": 50,
        "max_completion_tokens": 4.0,
        "top_p": 0,
        "stop": ["a", "b"],
        "seed": INT64,
    }
    assert httpx.post(gw.url + "/v1/chat/completions", json=body).status_code == 200
    assert fake.requests()[-1]["body"]["options"] == {
        "temperature": 2.0,
        "num_predict": 4,
        "top_p": 0.0,
        "stop": ["a", "b"],
        "seed": INT64,
    }


# Ollama-compatible ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
@pytest.mark.parametrize(("options", "field"), BAD_OPTIONS, ids=BAD_IDS)
def test_ollama_refuses_a_bad_option_in_ollamas_shape(
    gw: RunningGateway, fake: FakeLLM, path: str, options: dict[str, Any], field: str
) -> None:
    body: dict[str, Any] = {"model": "fake-model", "options": options, "stream": False}
    body.update({"messages": HELLO} if path == "/api/chat" else {"prompt": "hi"})
    response = httpx.post(gw.url + path, json=body)
    assert response.status_code == 400
    error = response.json()
    assert list(error) == ["error"] and error["error"].startswith(field + " must be "), error
    assert fake.requests() == []


def test_ollama_negative_temperature_is_refused(gw: RunningGateway, fake: FakeLLM) -> None:
    body = {"model": "fake-model", "messages": HELLO, "options": {"temperature": -1}}
    response = httpx.post(gw.url + "/api/chat", json=body)
    assert response.status_code == 400
    assert response.json() == {"error": "options.temperature must be a number from 0 to 2, not -1"}
    assert fake.requests() == []


def test_ollama_options_that_are_not_an_object_are_refused(gw: RunningGateway, fake: FakeLLM) -> None:
    body = {"model": "fake-model", "messages": HELLO, "options": [1]}
    response = httpx.post(gw.url + "/api/chat", json=body)
    assert response.status_code == 400 and "options" in response.json()["error"]
    assert fake.requests() == []


def test_ollama_valid_options_reach_the_upstream(gw: RunningGateway, fake: FakeLLM) -> None:
    options = {
        "temperature": 1.5,
        "num_predict": 12,
        "num_ctx": 1024,
        "top_p": 0.5,
        "stop": ["\n\n"],
        "seed": 3,
        "top_k": 40,
        "repeat_penalty": 1.1,
        "num_gpu": -1,
    }
    body = {"model": "fake-model", "messages": HELLO, "options": options, "stream": False}
    assert httpx.post(gw.url + "/api/chat", json=body).status_code == 200
    assert fake.requests()[-1]["body"]["options"] == {
        "temperature": 1.5,
        "num_predict": 12,
        "num_ctx": 1024,
        "top_p": 0.5,
        "stop": ["\n\n"],
        "seed": 3,
        "top_k": 40,
        "repeat_penalty": 1.1,
        "num_gpu": -1,
    }


@pytest.mark.parametrize("unlimited", [-1, -2])
def test_ollama_num_predict_without_limit_sends_none(
    gw: RunningGateway, fake: FakeLLM, unlimited: int
) -> None:
    body = {"model": "fake-model", "prompt": "hi", "options": {"num_predict": unlimited}, "stream": False}
    assert httpx.post(gw.url + "/api/generate", json=body).status_code == 200
    assert "options" not in fake.requests()[-1]["body"]
