"""The OpenAI-compatible API: ``POST /v1/chat/completions`` and ``GET /v1/models``, for
the ``openai`` package, Open WebUI and anything else speaking OpenAI's chat format.

Answers are encoded from the native events of the one chat service; refusals and
failures come back in OpenAI's error shape (``{"error": {"message", "type", "param",
"code"}}``), so the ``openai`` package raises its usual exceptions.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from chatgate.api import catalog, compat
from chatgate.api.auth import caller
from chatgate.api.errors import ORJSONResponse, RequestError, openai_error, status_of
from chatgate.chat.events import ChatError, DoneEvent, Event
from chatgate.options import (
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    TOP_P_MAX,
    TOP_P_MIN,
    OptionError,
    parse_options,
)
from chatgate.vocabulary import GenerationOptions, Message, Role

# Wire models -------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class CompletionRequest(BaseModel):
    """What chatgate reads of a chat completion request besides its sampling fields;
    other fields are accepted and ignored. ``n`` above 1, tools and non-text content are
    refused."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1)
    tools: list[Any] | None = Field(None, max_length=0)
    functions: list[Any] | None = Field(None, max_length=0)


StopSequence = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = (
    Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]
    | Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)]
    | None
)
#: The request's sampling fields, read by :func:`parse_options` rather than the model.
SAMPLING_FIELDS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed")


class SamplingFields(BaseModel):
    """The sampling fields, as the OpenAPI description shows them; they are checked by
    :func:`chatgate.options.parse_options`, with the same ranges."""

    temperature: float | None = Field(None, ge=TEMPERATURE_MIN, le=TEMPERATURE_MAX)
    top_p: float | None = Field(None, ge=TOP_P_MIN, le=TOP_P_MAX)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    stop: Stop = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)


class CompletionRequestBody(CompletionRequest, SamplingFields):
    """A chat completion request: what chatgate reads of it; other fields are accepted
    and ignored. ``n`` above 1, tools and non-text content are refused."""


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[Choice]
    usage: CompletionUsage


class ModelCard(BaseModel):
    """The upstream's model object as it gave it; null what it does not say."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"]
    created: int | None
    owned_by: str | None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


router = APIRouter()
ERRORS = compat.error_responses(ErrorBody)


# Requests ----------------------------------------------------------------------------


def _refuse_unsupported(data: dict[str, Any]) -> None:
    """Clear refusals for what chatgate does not do, before the schema's generic ones."""
    n = data.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        raise RequestError("n > 1 is not supported: chatgate returns one choice", param="n")
    for field in ("tools", "functions"):
        if data.get(field):
            raise RequestError("tools and function calling are not supported", param=field)
    messages = data.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        if not isinstance(message, dict):
            continue
        if message.get("role") in ("tool", "function"):
            raise RequestError("tool messages are not supported", param=f"messages.{i}.role")
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") != "text":
                raise RequestError(
                    f"only text content is supported, not {part.get('type')!r}",
                    param=f"messages.{i}.content",
                )


def _messages(body: CompletionRequest) -> list[Message]:
    messages: list[Message] = []
    for message in body.messages:
        content = message.content
        text = (
            "\n".join(part.text for part in content) if isinstance(content, list) else content or ""
        )
        role: Role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": text})
    return messages


def _options(data: dict[str, Any]) -> GenerationOptions:
    """The body's sampling fields; ``max_completion_tokens`` wins over ``max_tokens``."""
    try:
        return parse_options({name: data.get(name) for name in SAMPLING_FIELDS}, where="")
    except OptionError as exc:
        raise RequestError(exc.message, param=exc.field) from None


def _finish_reason(done: DoneEvent) -> str:
    return "length" if done["finish_reason"] == "length" else "stop"


def _usage(done: DoneEvent) -> dict[str, int]:
    prompt, completion = done["usage"]["prompt_tokens"], done["usage"]["completion_tokens"]
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class ChunkEncoder:
    """Native events → ``chat.completion.chunk`` SSE frames, as OpenAI sends them; the
    envelope is encoded once, so a token costs one ``orjson.dumps`` of its text."""

    def __init__(self, completion_id: str, model: str, created: int, include_usage: bool) -> None:
        self.envelope: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self.include_usage = include_usage
        self.prefix = (
            b"data: " + orjson.dumps(self.envelope)[:-1] + b',"choices":[{"index":0,"delta":'
        )
        self.suffix = (
            b',"logprobs":null,"finish_reason":null}]'
            + (b',"usage":null' if include_usage else b"")
            + b"}\n\n"
        )

    def __call__(self, event: Event) -> bytes:
        if event["type"] == "delta":
            return self.prefix + b'{"content":' + orjson.dumps(event["text"]) + b"}" + self.suffix
        if event["type"] == "start":
            return self.prefix + b'{"role":"assistant","content":""}' + self.suffix
        if event["type"] == "done":
            return self._finish(event)
        detail = openai_error(event["code"], event["message"], status_of(event["code"]))
        return b"data: " + orjson.dumps({"error": detail}) + b"\n\n"

    def _finish(self, done: DoneEvent) -> bytes:
        choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(done)}
        last: dict[str, Any] = {**self.envelope, "choices": [choice]}
        if not self.include_usage:
            return b"data: " + orjson.dumps(last) + b"\n\ndata: [DONE]\n\n"
        usage = {**self.envelope, "choices": [], "usage": _usage(done)}
        return (
            b"data: " + orjson.dumps({**last, "usage": None}) + b"\n\n"
            b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n"
        )


# Routes ------------------------------------------------------------------------------


@router.post(
    "/v1/chat/completions",
    openapi_extra=compat.openapi_body(CompletionRequestBody),
    responses={
        **ERRORS,
        200: {
            "model": ChatCompletion,
            # Each Server-Sent Event carries one chat.completion.chunk as JSON in `data`.
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                    }
                }
            },
        },
    },
)
async def chat_completions(request: Request) -> Response:
    gateway = compat.gateway_of(request)
    owner = caller(request)
    data = compat.read_json_object(await request.body())
    _refuse_unsupported(data)
    body = compat.validate(
        CompletionRequest, {k: v for k, v in data.items() if k not in SAMPLING_FIELDS}
    )
    turn = compat.make_turn(
        request,
        _messages(body),
        model=body.model,
        options=_options(data),
        owner=owner,
        conversation_id=compat.conversation_id_of(request),
    )
    generation = await gateway.service.start(turn)
    completion_id = "chatcmpl-" + generation.id
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        encode = ChunkEncoder(completion_id, body.model, created, include_usage)
        return await compat.stream(request, turn, generation, encode, "text/event-stream", start=True)

    done = await compat.answer(request, generation)
    completion = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": generation.text, "refusal": None},
                "logprobs": None,
                "finish_reason": _finish_reason(done),
            }
        ],
        "usage": _usage(done),
    }
    return ORJSONResponse(completion, headers=compat.conversation_headers(turn, generation))


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def list_models(request: Request) -> Response:
    """The upstream's models with its ``created`` and ``owned_by``, then each agent."""
    return ORJSONResponse({"object": "list", "data": await catalog.openai_models(request)})


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERRORS)
async def retrieve_model(request: Request, model: str) -> Response:
    card = next((card for card in await catalog.openai_models(request) if card.get("id") == model), None)
    if card is None:
        raise ChatError("not_found", f"The model '{model}' does not exist")
    return ORJSONResponse(card)
