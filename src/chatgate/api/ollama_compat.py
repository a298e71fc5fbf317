"""The Ollama-compatible API: ``POST /api/chat``, ``POST /api/generate``, ``GET /api/tags``,
``POST /api/show``, ``GET /api/ps`` and ``GET /api/version``, for the ``ollama`` package,
Open WebUI and anything else pointed at an Ollama server.

Answers stream as NDJSON (``stream`` defaults to true) encoded from the native events of
the one chat service; the last line carries Ollama's counts and nanosecond durations.
Errors are ``{"error": "..."}`` with an HTTP status, or that line mid-stream.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

from chatgate.api import catalog, compat
from chatgate.api.auth import caller
from chatgate.api.errors import ORJSONResponse, RequestError
from chatgate.chat.events import DoneEvent, Event
from chatgate.options import (
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    NUM_PREDICT_MIN,
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    TOP_P_MAX,
    TOP_P_MIN,
    OptionError,
    parse_options,
)
from chatgate.vocabulary import GenerationOptions, Message

#: The Ollama release whose API these routes follow; clients gate features on it.
OLLAMA_API_VERSION = "0.6.0"
NDJSON = "application/x-ndjson"


# Wire models -------------------------------------------------------------------------


StopSequence = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class Options(BaseModel):
    """The options chatgate maps; Ollama's others are accepted and ignored. This model
    only describes them in the OpenAPI schema: :func:`chatgate.options.parse_options`
    reads and checks them, with the same ranges (``num_predict`` -2, -1 and 0: no limit)."""

    model_config = ConfigDict(extra="allow")
    temperature: float | None = Field(None, ge=TEMPERATURE_MIN, le=TEMPERATURE_MAX)
    num_predict: int | None = Field(None, ge=NUM_PREDICT_MIN, le=INT32_MAX)
    num_ctx: int | None = Field(None, ge=1, le=INT32_MAX)
    top_p: float | None = Field(None, ge=TOP_P_MIN, le=TOP_P_MAX)
    stop: (
        Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]
        | Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)]
        | None
    ) = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)


#: A request's ``options``: validated as any object here, then by ``parse_options``.
OptionsObject = Annotated[
    dict[str, Any] | None,
    WithJsonSchema({"anyOf": [Options.model_json_schema(), {"type": "null"}]}),
]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str = ""
    images: list[str] | None = Field(None, max_length=0)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = []
    stream: bool | None = None
    options: OptionsObject = None
    tools: list[Any] | None = Field(None, max_length=0)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    prompt: str = ""
    system: str | None = None
    stream: bool | None = None
    options: OptionsObject = None
    images: list[str] | None = Field(None, max_length=0)


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, min_length=1, max_length=256)
    name: str | None = Field(None, min_length=1, max_length=256)


class ErrorBody(BaseModel):
    error: str


class AnswerMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Answer(BaseModel):
    """A non-streamed answer (``message`` for chat, ``response`` for generate)."""

    model: str
    created_at: str
    message: AnswerMessage | None = None
    response: str | None = None
    done: Literal[True]
    done_reason: str
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ModelDetails(BaseModel):
    model_config = ConfigDict(extra="allow")
    parent_model: str | None = None
    format: str | None = None
    family: str | None = None
    families: list[str] | None = None
    parameter_size: str | None = None
    quantization_level: str | None = None


class Tag(BaseModel):
    """An upstream's entry as it gave it (Ollama's, whole); null what it does not say."""

    model_config = ConfigDict(extra="allow")
    name: str
    model: str
    modified_at: str | None
    size: int | None
    digest: str | None
    details: ModelDetails | None


class Tags(BaseModel):
    models: list[Tag]


class Show(BaseModel):
    model_config = ConfigDict(extra="allow")
    modelfile: str | None
    parameters: str | None
    template: str | None
    details: ModelDetails | None
    model_info: dict[str, Any] | None
    capabilities: list[str] | None
    modified_at: str | None


class Version(BaseModel):
    version: str


router = APIRouter()
ERRORS = compat.error_responses(ErrorBody)
ANSWERS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {"model": Answer, "content": {NDJSON: {"schema": {"type": "string"}}}},
}


# Encoding ----------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _chat_content(text: str) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": text}}


def _generate_content(text: str) -> dict[str, Any]:
    return {"response": text}


Content = Callable[[str], dict[str, Any]]


def _line(model: str, content: Content, text: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "created_at": _now(), **content(text), **fields}


def _final(model: str, content: Content, text: str, done: DoneEvent) -> dict[str, Any]:
    total_ms = done["timings"]["total_ms"]
    ttft_ms = min(done["timings"]["ttft_ms"] or 0.0, total_ms)
    return _line(
        model,
        content,
        text,
        done=True,
        done_reason="length" if done["finish_reason"] == "length" else "stop",
        total_duration=round(total_ms * 1e6),
        load_duration=0,
        prompt_eval_count=done["usage"]["prompt_tokens"],
        prompt_eval_duration=round(ttft_ms * 1e6),
        eval_count=done["usage"]["completion_tokens"],
        eval_duration=round((total_ms - ttft_ms) * 1e6),
    )


class LineEncoder:
    """Native events → Ollama's NDJSON lines for one answer."""

    def __init__(self, model: str, content: Content) -> None:
        self.model = model
        self.content = content

    def __call__(self, event: Event) -> bytes:
        if event["type"] == "delta":
            return orjson.dumps(_line(self.model, self.content, event["text"], done=False)) + b"\n"
        if event["type"] == "done":
            return orjson.dumps(_final(self.model, self.content, "", event)) + b"\n"
        if event["type"] == "error":
            return orjson.dumps({"error": event["message"]}) + b"\n"
        return b""


# Requests ----------------------------------------------------------------------------


def _refuse_unsupported(data: dict[str, Any]) -> None:
    """Clear refusals for what chatgate does not do, before the schema's generic ones."""
    messages = data.get("messages")
    messages = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    if data.get("tools") or any(m.get("role") == "tool" for m in messages):
        raise RequestError("tools are not supported", param="tools")
    if data.get("images") or any(m.get("images") for m in messages):
        raise RequestError("images are not supported", param="images")


def _options(options: dict[str, Any] | None) -> GenerationOptions:
    """Ollama's -1 (no limit) and -2 (fill the context) for ``num_predict`` are unset."""
    try:
        return parse_options(options)
    except OptionError as exc:
        raise RequestError(exc.message, param=exc.field) from None


async def _answer(
    request: Request,
    model: str,
    messages: list[Message],
    options: GenerationOptions,
    stream: bool,
    content: Content,
) -> Response:
    """Chat and generate alike: no message loads the model (Ollama's warm-up request);
    otherwise one turn, streamed as NDJSON or answered as one object."""
    gateway = compat.gateway_of(request)
    owner = caller(request)
    conversation_id = compat.conversation_id_of(request)
    if not any(m["role"] != "system" for m in messages):
        await compat.upstream_model(gateway, model)
        return ORJSONResponse(_line(model, content, "", done=True, done_reason="load"))
    turn = compat.make_turn(
        request,
        messages,
        model=model,
        options=options,
        owner=owner,
        conversation_id=conversation_id,
    )
    generation = await gateway.service.start(turn)
    if stream:
        return await compat.stream(request, turn, generation, LineEncoder(model, content), NDJSON, start=False)
    done = await compat.answer(request, generation)
    answer = _final(model, content, generation.text, done)
    return ORJSONResponse(answer, headers=compat.conversation_headers(turn, generation))


# Routes ------------------------------------------------------------------------------


@router.post("/api/chat", openapi_extra=compat.openapi_body(ChatRequest), responses=ANSWERS)
async def chat(request: Request) -> Response:
    data = compat.read_json_object(await request.body())
    _refuse_unsupported(data)
    body = compat.validate(ChatRequest, data)
    messages: list[Message] = [{"role": m.role, "content": m.content} for m in body.messages]
    options = _options(body.options)
    return await _answer(
        request, body.model, messages, options, body.stream is not False, _chat_content
    )


@router.post("/api/generate", openapi_extra=compat.openapi_body(GenerateRequest), responses=ANSWERS)
async def generate(request: Request) -> Response:
    data = compat.read_json_object(await request.body())
    _refuse_unsupported(data)
    body = compat.validate(GenerateRequest, data)
    messages: list[Message] = [{"role": "system", "content": body.system}] if body.system else []
    if body.prompt:
        messages.append({"role": "user", "content": body.prompt})
    options = _options(body.options)
    return await _answer(
        request, body.model, messages, options, body.stream is not False, _generate_content
    )


@router.get("/api/tags", response_model=Tags, responses=ERRORS)
async def tags(request: Request) -> Response:
    """The upstream's models as it describes them, then each agent as ``agent:NAME``."""
    return ORJSONResponse({"models": await catalog.ollama_tags(request)})


@router.post(
    "/api/show",
    # The body only: showing a model takes no conversation (no X-Conversation-Id).
    openapi_extra={"requestBody": compat.openapi_body(ShowRequest)["requestBody"]},
    response_model=Show,
    responses=ERRORS,
)
async def show(request: Request) -> Response:
    body = compat.validate(ShowRequest, compat.read_json_object(await request.body()))
    name = body.model or body.name
    if name is None:
        raise RequestError("model is required", param="model")
    return ORJSONResponse(await catalog.ollama_show(request, name))


@router.get("/api/ps", response_model=Tags, responses=ERRORS)
async def running(request: Request) -> Response:
    """What the upstream holds in memory, as it says (none for an upstream that does not)."""
    return ORJSONResponse({"models": await catalog.ollama_running(request)})


@router.get("/api/version", response_model=Version)
async def version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION}
