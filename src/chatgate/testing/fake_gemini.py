"""Gemini's wire format for the fake upstream, mounted by ``fake_llm.create_app``.

It answers what the Gemini API (``generativelanguage.googleapis.com``) answers for the calls
chatgate and Google's SDKs make:

- ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse``: one ``data:`` event per token,
  ``candidates[0].content.parts[0].text`` with role ``model``, then a last event with
  ``finishReason`` (``STOP``, or ``MAX_TOKENS`` when ``generationConfig.maxOutputTokens`` cuts
  the answer short) and the ``usageMetadata`` counts. Events end with CRLF CRLF, as Google's do.
- ``POST /v1beta/models/{model}:generateContent``: the whole answer as one JSON object.
- ``GET /v1beta/models``: the fake's models, plus one embedding model that cannot generate.

Every call needs an API key, in the ``x-goog-api-key`` header or the ``key`` query parameter:
without one the answer is 403 ``PERMISSION_DENIED``, and a key starting with ``invalid`` gets
400 ``INVALID_ARGUMENT``, as Google answers. Errors have Google's shape,
``{"error": {"code", "message", "status"}}``. A body without ``contents``, or with a role other
than ``user`` and ``model``, is refused with 400 the way Gemini refuses it.

Pacing, faults and the request record are the fake's own (see ``fake_wire``); an ``error_line``
fault is an in-stream ``data: {"error": …}`` event, ``missing-*`` models are 404 ``NOT_FOUND``,
and a ``blocked-*`` model stops its answer with ``finishReason: SAFETY`` after its tokens.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from chatgate.testing.fake_wire import (
    STATE,
    TOKEN_JSON,
    Dialect,
    Frames,
    Turn,
    fake_reply,
    json_response,
    token_limit,
    turn_handler,
    word_count,
)

API = "/v1beta"
EMBEDDING_MODEL = "text-embedding-fake"
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_FINISH_REASONS = {"stop": "STOP", "length": "MAX_TOKENS"}
_ROLES = ("user", "model")
_MODEL_PATH = API + "/models/{model:[^/:]+}"
_GENERATING = ["generateContent", "streamGenerateContent", "countTokens"]


def gemini_error(status: int, message: str) -> web.Response:
    body = {
        "error": {
            "code": status,
            "message": message,
            "status": _STATUS_NAMES.get(status, "UNKNOWN"),
        }
    }
    return json_response(body, status)


def key_refusal(request: web.Request) -> web.Response | None:
    """Google's answers to a request without a usable API key."""
    key = request.headers.get("x-goog-api-key") or request.query.get("key")
    if not key:
        return gemini_error(
            403,
            "Method doesn't allow unregistered callers (callers without established identity)."
            " Please use API Key or other form of API consumer identity to call this API.",
        )
    if key.startswith("invalid"):
        return gemini_error(400, "API key not valid. Please pass a valid API key.")
    return None


def _shape_problem(body: dict[str, Any]) -> str | None:
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    for content in contents:
        if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
            return "* GenerateContentRequest.contents: each content needs parts"
        if content.get("role", "user") not in _ROLES:
            return "Please use a valid role: user, model."
    return None


class _Gemini(Dialect):
    stream_default = False

    def __init__(self, *, streaming: bool) -> None:
        self.streaming = streaming

    def wants_stream(self, body: dict[str, Any]) -> bool:
        return self.streaming

    def refusal(self, request: web.Request, body: dict[str, Any] | None) -> web.Response | None:
        refused = key_refusal(request)
        if refused is not None:
            return refused
        if self.streaming and request.query.get("alt") != "sse":
            return gemini_error(400, "this fake streams only server-sent events: add ?alt=sse")
        problem = _shape_problem(body) if body is not None else None
        return gemini_error(400, problem) if problem else None

    def model(self, request: web.Request, body: dict[str, Any]) -> Any:
        return request.match_info["model"]

    def error(self, status: int, message: str) -> web.Response:
        return gemini_error(status, message)

    def not_found(self, model: str) -> web.Response:
        return gemini_error(
            404,
            f"models/{model} is not found for API version v1beta, or is not supported for"
            " generateContent. Call ListModels to see the list of available models and their"
            " supported methods.",
        )

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        config = body.get("generationConfig")
        return token_limit(config.get("maxOutputTokens")) if isinstance(config, dict) else None

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        system = body.get("systemInstruction")
        words = word_count(system.get("parts")) if isinstance(system, dict) else 0
        return words + sum(
            word_count(content.get("parts")) for content in body.get("contents") or ()
        )

    def frames(self, turn: Turn, body: dict[str, Any]) -> Frames:
        usage = orjson.dumps(
            {"promptTokenCount": turn.prompt_tokens, "totalTokenCount": turn.prompt_tokens}
        )
        prefix = b'data: {"candidates":[{"content":{"parts":[{"text":'
        suffix = (
            b'}],"role":"model"},"index":0}],"usageMetadata":' + usage
            + b',"modelVersion":' + orjson.dumps(turn.model)
            + b',"responseId":' + orjson.dumps(self._response_id(turn)) + b"}\r\n\r\n"
        )  # fmt: skip
        error = {"error": {"code": 500, "message": "injected stream error", "status": "INTERNAL"}}
        return Frames(
            content_type="text/event-stream",
            head=b"",
            tokens=tuple(prefix + text + suffix for text in TOKEN_JSON),
            error=b"data: " + orjson.dumps(error) + b"\r\n\r\n",
            tail=lambda: b"data: " + orjson.dumps(self._response(turn, "")) + b"\r\n\r\n",
        )

    def complete(self, turn: Turn, body: dict[str, Any]) -> bytes:
        return orjson.dumps(self._response(turn, fake_reply(turn.record.tokens_sent)))

    def _response(self, turn: Turn, text: str) -> dict[str, Any]:
        completion = turn.record.tokens_sent
        blocked = turn.model.startswith("blocked")
        candidate: dict[str, Any] = {
            "content": {"parts": [{"text": text}], "role": "model"},
            "finishReason": "SAFETY" if blocked else _FINISH_REASONS[turn.finish_reason],
            "index": 0,
        }
        if blocked:
            candidate["safetyRatings"] = [
                {
                    "category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                    "probability": "HIGH",
                    "blocked": True,
                }
            ]
        return {
            "candidates": [candidate],
            "usageMetadata": {
                "promptTokenCount": turn.prompt_tokens,
                "candidatesTokenCount": completion,
                "totalTokenCount": turn.prompt_tokens + completion,
            },
            "modelVersion": turn.model,
            "responseId": self._response_id(turn),
        }

    @staticmethod
    def _response_id(turn: Turn) -> str:
        return f"fake-{turn.record.id}"


def _model_entry(name: str, methods: list[str]) -> dict[str, Any]:
    return {
        "name": f"models/{name}",
        "version": "001",
        "displayName": name,
        "description": "A model of the fake upstream.",
        "inputTokenLimit": 8192,
        "outputTokenLimit": 2048,
        "supportedGenerationMethods": methods,
    }


async def _list_models(request: web.Request) -> web.Response:
    refused = key_refusal(request)
    if refused is not None:
        return refused
    names = request.app[STATE].settings.models
    models = [_model_entry(name, _GENERATING) for name in names]
    models.append(_model_entry(EMBEDDING_MODEL, ["embedContent"]))
    return json_response({"models": models})


def add_gemini_routes(app: web.Application) -> None:
    app.router.add_get(API + "/models", _list_models)
    app.router.add_post(
        _MODEL_PATH + ":streamGenerateContent", turn_handler(_Gemini(streaming=True))
    )
    app.router.add_post(_MODEL_PATH + ":generateContent", turn_handler(_Gemini(streaming=False)))
