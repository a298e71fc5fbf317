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

from chatgate.api import catalog, compat, tooling
from chatgate.api.auth import caller
from chatgate.api.errors import ORJSONResponse, RequestError, openai_error, status_of
from chatgate.chat.events import ChatError, DoneEvent, Event, ToolCallEvent
from chatgate.options import (
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    PENALTY_MAX,
    PENALTY_MIN,
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


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCallBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolBody(BaseModel):
    type: Literal["function"]
    function: FunctionTool


class CompletionRequest(BaseModel):
    """What chatgate reads of a chat completion request besides its sampling fields; the
    fields in :data:`IGNORED_FIELDS` are accepted and ignored, those in
    :data:`REFUSED_FIELDS` refused. ``n`` above 1 and non-text content are refused."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1)
    tools: list[ToolBody] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


StopSequence = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = (
    Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]
    | Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)]
    | None
)
#: The request's sampling fields, read by :func:`parse_options` rather than the model.
SAMPLING_FIELDS = (
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
    "frequency_penalty", "presence_penalty",
)


class SamplingFields(BaseModel):
    """The sampling fields, as the OpenAPI description shows them; they are checked by
    :func:`chatgate.options.parse_options`, with the same ranges."""

    temperature: float | None = Field(None, ge=TEMPERATURE_MIN, le=TEMPERATURE_MAX)
    top_p: float | None = Field(None, ge=TOP_P_MIN, le=TOP_P_MAX)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    stop: Stop = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    frequency_penalty: float | None = Field(None, ge=PENALTY_MIN, le=PENALTY_MAX)
    presence_penalty: float | None = Field(None, ge=PENALTY_MIN, le=PENALTY_MAX)


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
    content: str | None
    refusal: None
    tool_calls: list[ToolCallBody] | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length", "tool_calls"]


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


#: Fields that change what the model answers and that chatgate cannot pass on: refused,
#: never silently dropped. Each maps to why.
REFUSED_FIELDS = {
    "functions": "functions (the deprecated form of tools) is not supported: send tools",
    "function_call": "function_call (the deprecated form of tool_choice) is not supported: send tool_choice",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "logit_bias": "logit_bias is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported: chatgate has no hosted tools",
}
#: Fields accepted and ignored: they ask nothing of the answer (bookkeeping upstream).
IGNORED_FIELDS = (
    "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
    "reasoning_effort", "verbosity",
)


def _refuse_unsupported(data: dict[str, Any]) -> None:
    """Clear refusals for what chatgate does not do, before the schema's generic ones."""
    n = data.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        raise RequestError("n > 1 is not supported: chatgate returns one choice", param="n")
    for field, why in REFUSED_FIELDS.items():
        if data.get(field) not in (None, False, [], {}):
            raise RequestError(why, param=field)
    modalities = data.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise RequestError("only text output is supported", param="modalities")
    messages = data.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        if not isinstance(message, dict):
            continue
        if message.get("role") == "function":
            raise RequestError("function messages (deprecated) are not supported: send tool messages", param=f"messages.{i}.role")
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") != "text":
                raise RequestError(
                    f"only text content is supported, not {part.get('type')!r}",
                    param=f"messages.{i}.content",
                )


def _messages(body: CompletionRequest) -> list[Message]:
    messages: list[Message] = []
    for i, message in enumerate(body.messages):
        content = message.content
        text = (
            "\n".join(part.text for part in content) if isinstance(content, list) else content or ""
        )
        if message.role == "tool":
            if not message.tool_call_id:
                raise RequestError("a tool message needs its tool_call_id", param=f"messages.{i}.tool_call_id")
            tool: Message = {"role": "tool", "content": text, "tool_call_id": message.tool_call_id}
            if message.name:
                tool["name"] = message.name
            messages.append(tool)
            continue
        role: Role = "system" if message.role == "developer" else message.role
        entry: Message = {"role": role, "content": text}
        if message.tool_calls:
            if role != "assistant":
                raise RequestError("only assistant messages carry tool_calls", param=f"messages.{i}.tool_calls")
            entry["tool_calls"] = tooling.parse_tool_calls(
                [call.model_dump() for call in message.tool_calls], f"messages.{i}.tool_calls"
            )
        messages.append(entry)
    return messages


def _options(data: dict[str, Any]) -> GenerationOptions:
    """The body's sampling fields; ``max_completion_tokens`` wins over ``max_tokens``."""
    try:
        return parse_options({name: data.get(name) for name in SAMPLING_FIELDS}, where="")
    except OptionError as exc:
        raise RequestError(exc.message, param=exc.field) from None


def _finish_reason(done: DoneEvent) -> str:
    reason = done["finish_reason"]
    return reason if reason == "length" or reason == "tool_calls" else "stop"


def _tool_calls(done: DoneEvent) -> list[dict[str, Any]] | None:
    calls = done.get("tool_calls")
    if not calls:
        return None
    return [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
        for call in calls
    ]


def completion_usage(done: DoneEvent) -> dict[str, int]:
    """OpenAI's ``usage`` of an answer (chat and text completions alike)."""
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
        if event["type"] == "tool_call":
            return self.prefix + orjson.dumps({"tool_calls": [_call_piece(event)]}) + self.suffix
        if event["type"] == "done":
            return self._finish(event)
        detail = openai_error(event["code"], event["message"], status_of(event["code"]))
        return b"data: " + orjson.dumps({"error": detail}) + b"\n\n"

    def _finish(self, done: DoneEvent) -> bytes:
        choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(done)}
        last: dict[str, Any] = {**self.envelope, "choices": [choice]}
        if not self.include_usage:
            return b"data: " + orjson.dumps(last) + b"\n\ndata: [DONE]\n\n"
        usage = {**self.envelope, "choices": [], "usage": completion_usage(done)}
        return (
            b"data: " + orjson.dumps({**last, "usage": None}) + b"\n\n"
            b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n"
        )


def _call_piece(event: ToolCallEvent) -> dict[str, Any]:
    """A tool call piece as OpenAI streams it: id, type and name on a call's first piece
    only (clients join every string field they are sent)."""
    function: dict[str, Any] = {"arguments": event["arguments"]}
    piece: dict[str, Any] = {"index": event["index"]}
    if "call_id" in event:
        piece["id"] = event["call_id"]
        piece["type"] = "function"
    if "name" in event:
        function = {"name": event["name"], **function}
    piece["function"] = function
    return piece


# Routes ------------------------------------------------------------------------------


@router.post(
    "/v1/chat/completions",
    openapi_extra=compat.openapi_body(CompletionRequestBody),
    responses={
        **ERRORS,
        200: {
            "model": ChatCompletion,
            # Each Server-Sent Event carries one chat.completion.chunk as JSON in `data`.
            "content": compat.SSE_CONTENT,
        },
    },
)
async def chat_completions(request: Request) -> Response:
    gateway = compat.gateway_of(request)
    owner = caller(request)
    data = compat.read_json_object(await request.body())
    _refuse_unsupported(data)
    # Read first: their messages name the problem better than the schema's.
    tools = tooling.parse_tools(data.get("tools"), data.get("tool_choice"), data.get("parallel_tool_calls"))
    output = tooling.parse_response_format(data.get("response_format"))
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
        tools=tools,
        output=output,
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
                "message": _message(generation.text, done),
                "logprobs": None,
                "finish_reason": _finish_reason(done),
            }
        ],
        "usage": completion_usage(done),
    }
    return ORJSONResponse(completion, headers=compat.conversation_headers(turn, generation))


def _message(text: str, done: DoneEvent) -> dict[str, Any]:
    calls = _tool_calls(done)
    message: dict[str, Any] = {
        "role": "assistant", "content": text if text or not calls else None, "refusal": None
    }
    if calls:
        message["tool_calls"] = calls
    return message


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
