"""The one table from error codes to HTTP statuses, and each API's error shape."""

from __future__ import annotations

from typing import get_args

import httpx
import orjson
import pytest

from chatgate.api.errors import STATUS, RequestError, error_response, shape_of
from chatgate.chat.events import ChatError, ErrorCode
from chatgate.testing.servers import RunningGateway


def test_every_error_code_has_a_status() -> None:
    assert set(STATUS) == set(get_args(ErrorCode))
    assert STATUS["not_found"] == 404 and STATUS["busy"] == 409 and STATUS["provider_error"] == 502


@pytest.mark.parametrize(
    ("path", "shape"),
    [("/v1/chat/completions", "openai"), ("/v1", "openai"), ("/api/chat", "ollama"),
     ("/chat", "native"), ("/conversations/x", "native"), ("/apis", "native"), ("/v10", "native")],
)
def test_each_path_has_its_apis_shape(path: str, shape: str) -> None:
    assert shape_of(path) == shape


def test_the_shapes() -> None:
    refused = RequestError("temperature must be from 0 to 2", param="temperature")
    openai = error_response(refused, "openai")
    assert openai.status_code == 400
    assert orjson.loads(openai.body) == {"error": {
        "message": "temperature must be from 0 to 2", "type": "invalid_request_error",
        "param": "temperature", "code": "bad_request"}}
    ollama = error_response(ChatError("not_found", "model 'x' not found"), "ollama")
    assert (ollama.status_code, orjson.loads(ollama.body)) == (404, {"error": "model 'x' not found"})
    native = error_response(ChatError("rate_limited", "slow down", retry_after=2.2), "native")
    assert (native.status_code, orjson.loads(native.body)) == (429, {"detail": "slow down", "code": "rate_limited"})
    assert native.headers["retry-after"] == "3"


def test_an_oversized_body_is_refused_in_its_apis_shape(gw: RunningGateway) -> None:
    too_big = b"x" * (64 * gw.settings.max_message_bytes + 1)
    openai = httpx.post(f"{gw.url}/v1/chat/completions", content=too_big, headers={"content-type": "application/json"})
    assert openai.status_code == 413 and openai.json()["error"]["code"] == "too_large"
    ollama = httpx.post(f"{gw.url}/api/chat", content=too_big, headers={"content-type": "application/json"})
    assert ollama.status_code == 413 and "larger than" in ollama.json()["error"]
    native = httpx.post(f"{gw.url}/chat", content=too_big, headers={"content-type": "application/json"})
    assert native.status_code == 413 and native.json()["code"] == "too_large"


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/v1/assistants"), ("GET", "/v1/nothing")]
)
def test_an_unknown_openai_route_is_a_404_in_openais_shape(gw: RunningGateway, method: str, path: str) -> None:
    response = httpx.request(method, f"{gw.url}{path}", json={})
    assert response.status_code == 404
    assert response.json() == {"error": {
        "message": f"Invalid URL ({method} {path})", "type": "invalid_request_error", "param": None, "code": None}}


def test_an_unknown_ollama_route_is_a_404_in_ollamas_shape(gw: RunningGateway) -> None:
    response = httpx.post(f"{gw.url}/api/nothing", json={})
    assert (response.status_code, response.json()) == (404, {"error": "Invalid URL (POST /api/nothing)"})


def test_a_wrong_method_is_a_405_in_its_apis_shape(gw: RunningGateway) -> None:
    response = httpx.delete(f"{gw.url}/v1/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert httpx.get(f"{gw.url}/api/chat").json() == {"error": "Method GET is not allowed for /api/chat"}


def test_other_paths_keep_fastapis_shape(gw: RunningGateway) -> None:
    response = httpx.get(f"{gw.url}/nothing")
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})


def test_the_openai_package_raises_not_found_for_an_unknown_route(gw: RunningGateway) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as raised:
        client.post("/assistants", body={"model": "fake-model"}, cast_to=object)
    assert raised.value.status_code == 404
    assert raised.value.body == {
        "message": "Invalid URL (POST /v1/assistants)", "type": "invalid_request_error", "param": None, "code": None}
