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

Tools and JSON mode are answered as ``fake_tools`` decides, from ``tools[].functionDeclarations``,
``toolConfig.functionCallingConfig`` (``NONE``: words; ``allowedFunctionNames``: the first of
them) and the last content (one holding a ``functionResponse`` is tool results: words). Every
call comes in one event, as ``functionCall`` parts with ``args`` objects and no ``id``, the way
the Gemini API sends them; then the usual last event with ``STOP``. ``responseMimeType:
application/json`` gets an instance of ``responseSchema`` (or ``responseJsonSchema``) in
``fake_tools.pieces``. A schema (tool parameters, ``responseSchema``) with a key Gemini's
``Schema`` does not have is refused with 400, as Gemini refuses it.

Pacing, faults and the request record are the fake's own (see ``fake_wire``); an ``error_line``
fault is an in-stream ``data: {"error": …}`` event, ``missing-*`` models are 404 ``NOT_FOUND``,
and a ``blocked-*`` model stops its answer with ``finishReason: SAFETY`` after its tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web

from chatgate.testing.fake_tools import FakeCall, choose_calls, json_answer, pieces
from chatgate.testing.fake_wire import (
    STATE,
    TOKEN_JSON,
    Dialect,
    Frames,
    Script,
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
#: The fields of Gemini's ``Schema`` (an OpenAPI subset): any other key is refused.
_SCHEMA_KEYS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "items", "properties",
    "required", "anyOf", "minItems", "maxItems", "minProperties", "maxProperties", "minLength",
    "maxLength", "pattern", "minimum", "maximum", "example", "default", "propertyOrdering",
})  # fmt: skip


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
    for where, schema in _schemas(body):
        unknown = _unknown_schema_key(schema, where)
        if unknown is not None:
            return unknown
    return None


def _declarations(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for tool in body.get("tools") or ():
        for declaration in (tool.get("functionDeclarations") or ()) if isinstance(tool, dict) else ():
            if isinstance(declaration, dict):
                yield declaration


def _schemas(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every ``Schema`` of the request, with where it is as Gemini's errors name it."""
    for index, declaration in enumerate(_declarations(body)):
        if "parameters" in declaration:
            yield f"tools[0].function_declarations[{index}].parameters", declaration["parameters"]
    config = body.get("generationConfig")
    if isinstance(config, dict) and "responseSchema" in config:
        yield "generation_config.response_schema", config["responseSchema"]


def _unknown_schema_key(schema: Any, where: str) -> str | None:
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if key not in _SCHEMA_KEYS:
            return f"Invalid JSON payload received. Unknown name \"{key}\" at '{where}': Cannot find field."
        nested: list[tuple[str, Any]] = []
        if key == "properties" and isinstance(value, dict):
            nested = [(f"{where}.properties[{name}].value", sub) for name, sub in value.items()]
        elif key == "items":
            nested = [(f"{where}.items", value)]
        elif key == "anyOf" and isinstance(value, list):
            nested = [(f"{where}.any_of[{i}]", sub) for i, sub in enumerate(value)]
        for place, sub in nested:
            unknown = _unknown_schema_key(sub, place)
            if unknown is not None:
                return unknown
    return None


def _script(body: dict[str, Any]) -> Script | None:
    """Tool calls or a JSON answer, as ``fake_tools`` decides for this request."""
    tools = [
        (declaration["name"], declaration.get("parameters"))
        for declaration in _declarations(body)
        if isinstance(declaration.get("name"), str)
    ]
    if tools:
        calls = choose_calls(tools, _choice(body), *_last_turn(body))
        if calls:
            return Script(steps=1, calls=tuple(calls))
    config = body.get("generationConfig")
    if isinstance(config, dict) and config.get("responseMimeType") == "application/json":
        text = json_answer(config.get("responseSchema") or config.get("responseJsonSchema"))
        return Script(steps=len(pieces(text)), text=text)
    return None


def _choice(body: dict[str, Any]) -> str | None:
    config = body.get("toolConfig")
    calling = config.get("functionCallingConfig") if isinstance(config, dict) else None
    if not isinstance(calling, dict):
        return None
    if calling.get("mode") == "NONE":
        return "none"
    allowed = calling.get("allowedFunctionNames")
    return allowed[0] if isinstance(allowed, list) and allowed else None


def _last_turn(body: dict[str, Any]) -> tuple[str, str]:
    """The role of the last content (``tool`` when it holds tool results) and its text."""
    last = (body.get("contents") or [{}])[-1]
    parts = [part for part in last.get("parts") or () if isinstance(part, dict)]
    if any("functionResponse" in part for part in parts):
        return "tool", ""
    role = "assistant" if last.get("role") == "model" else "user"
    return role, " ".join(str(part.get("text", "")) for part in parts)


def _parts(script: Script) -> list[dict[str, Any]]:
    if script.calls:
        return [_call_part(call) for call in script.calls]
    return [{"text": script.text}]


def _call_part(call: FakeCall) -> dict[str, Any]:
    return {"functionCall": {"name": call.name, "args": call.arguments}}


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

    def script(self, body: dict[str, Any]) -> Script | None:
        return _script(body)

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
        prefix = b'data: {"candidates":[{"content":{"parts":['
        suffix = (
            b'],"role":"model"},"index":0}],"usageMetadata":' + usage
            + b',"modelVersion":' + orjson.dumps(turn.model)
            + b',"responseId":' + orjson.dumps(self._response_id(turn)) + b"}\r\n\r\n"
        )  # fmt: skip
        error = {"error": {"code": 500, "message": "injected stream error", "status": "INTERNAL"}}
        script = turn.script
        if script is None:
            tokens = tuple(prefix + b'{"text":' + text + b"}" + suffix for text in TOKEN_JSON)
        elif script.calls:
            calls = b",".join(orjson.dumps(_call_part(call)) for call in script.calls)
            tokens = (prefix + calls + suffix,)
        else:
            tokens = tuple(
                prefix + orjson.dumps({"text": piece}) + suffix for piece in pieces(script.text)
            )
        return Frames(
            content_type="text/event-stream",
            head=b"",
            tokens=tokens,
            error=b"data: " + orjson.dumps(error) + b"\r\n\r\n",
            tail=lambda: b"data: " + orjson.dumps(self._response(turn, [{"text": ""}])) + b"\r\n\r\n",
        )

    def complete(self, turn: Turn, body: dict[str, Any]) -> bytes:
        if turn.script is not None:
            return orjson.dumps(self._response(turn, _parts(turn.script)))
        return orjson.dumps(self._response(turn, [{"text": fake_reply(turn.record.tokens_sent)}]))

    def _response(self, turn: Turn, parts: list[dict[str, Any]]) -> dict[str, Any]:
        completion = turn.record.tokens_sent
        blocked = turn.model.startswith("blocked")
        candidate: dict[str, Any] = {
            "content": {"parts": parts, "role": "model"},
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
