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

from chatgate.api import catalog, compat, tooling
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
    parse_ollama_options,
)
from chatgate.vocabulary import GenerationOptions, Message, OutputFormat, ToolCall, Tools

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


class CallFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: dict[str, Any] | str = {}


class ToolCallBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    function: CallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = Field(None, max_length=0)
    tool_calls: list[ToolCallBody] | None = None
    #: The tool a ``tool`` message answers (``name`` in older clients).
    tool_name: str | None = None


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionTool


#: ``format``: ``"json"`` or a JSON schema for the answer.
FormatField = Annotated[
    str | dict[str, Any] | None,
    WithJsonSchema({"anyOf": [{"type": "string", "enum": ["", "json"]}, {"type": "object"}, {"type": "null"}]}),
]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = []
    stream: bool | None = None
    options: OptionsObject = None
    tools: list[ToolBody] | None = None
    format: FormatField = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    prompt: str = ""
    system: str | None = None
    stream: bool | None = None
    options: OptionsObject = None
    images: list[str] | None = Field(None, max_length=0)
    format: FormatField = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, min_length=1, max_length=256)
    name: str | None = Field(None, min_length=1, max_length=256)


class ErrorBody(BaseModel):
    error: str


class AnswerMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    tool_calls: list[ToolCallBody] | None = None


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
        done_reason="length" if done["finish_reason"] == "length" else "stop",  # Ollama's for calls too
        total_duration=round(total_ms * 1e6),
        load_duration=0,
        prompt_eval_count=done["usage"]["prompt_tokens"],
        prompt_eval_duration=round(ttft_ms * 1e6),
        eval_count=done["usage"]["completion_tokens"],
        eval_duration=round((total_ms - ttft_ms) * 1e6),
    )


def ollama_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Tool calls as Ollama sends them: arguments as an object (``{}`` when the model's
    text was not a JSON object)."""
    shaped = []
    for call in calls:
        try:
            arguments = orjson.loads(call["arguments"] or "{}")
        except orjson.JSONDecodeError:
            arguments = {}
        shaped.append({"function": {"name": call["name"], "arguments": arguments if isinstance(arguments, dict) else {}}})
    return shaped


class LineEncoder:
    """Native events → Ollama's NDJSON lines for one answer. Ollama sends a tool call
    whole, so its pieces are held and sent as one line before the last."""

    def __init__(self, model: str, content: Content) -> None:
        self.model = model
        self.content = content

    def __call__(self, event: Event) -> bytes:
        if event["type"] == "delta":
            return orjson.dumps(_line(self.model, self.content, event["text"], done=False)) + b"\n"
        if event["type"] == "done":
            final = orjson.dumps(_final(self.model, self.content, "", event)) + b"\n"
            calls = event.get("tool_calls")
            if not calls:
                return final
            line = _line(self.model, self.content, "", done=False)
            line["message"]["tool_calls"] = ollama_tool_calls(calls)
            return orjson.dumps(line) + b"\n" + final
        if event["type"] == "error":
            return orjson.dumps({"error": event["message"]}) + b"\n"
        return b""


# Requests ----------------------------------------------------------------------------


#: Fields that change the answer and that chatgate cannot pass on: refused, never
#: silently dropped. Ollama's others (``keep_alive``, unknown ``options``) are ignored.
REFUSED_FIELDS = {
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "template": "a prompt template is not supported: the upstream's own applies",
    "raw": "raw prompts are not supported",
    "context": "context (the deprecated conversation state) is not supported: send messages",
    "think": "thinking output is not supported",
}


def _refuse_unsupported(data: dict[str, Any]) -> None:
    """Clear refusals for what chatgate does not do, before the schema's generic ones."""
    messages = data.get("messages")
    messages = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    if data.get("images") or any(m.get("images") for m in messages):
        raise RequestError("images are not supported", param="images")
    for field, why in REFUSED_FIELDS.items():
        if data.get(field) not in (None, False, "", []):
            raise RequestError(why, param=field)


def _messages(body: ChatRequest) -> list[Message]:
    """The body's messages; a ``tool`` message answers the earlier assistant message's
    calls in order (Ollama's carry no ids: chatgate names each call by its position)."""
    messages: list[Message] = []
    pending: list[ToolCall] = []
    for i, message in enumerate(body.messages):
        if message.role == "tool":
            name = message.tool_name or getattr(message, "name", None)
            call = next((c for c in pending if c["name"] == name), pending[0] if pending else None)
            if call is not None:
                pending.remove(call)
            tool: Message = {"role": "tool", "content": message.content, "tool_call_id": call["id"] if call else f"call_{i}"}
            if isinstance(name, str) and name:
                tool["name"] = name
            messages.append(tool)
            continue
        entry: Message = {"role": message.role, "content": message.content}
        if message.tool_calls:
            if message.role != "assistant":
                raise RequestError("only assistant messages carry tool_calls", param=f"messages.{i}.tool_calls")
            calls = tooling.parse_tool_calls(
                [call.model_dump() for call in message.tool_calls], f"messages.{i}.tool_calls"
            )
            calls = [{**call, "id": f"call_{i}_{n}"} for n, call in enumerate(calls)]
            entry["tool_calls"], pending = calls, list(calls)
        messages.append(entry)
    return messages


def _options(options: dict[str, Any] | None) -> GenerationOptions:
    """Ollama's -1 (no limit) and -2 (fill the context) for ``num_predict`` are unset."""
    try:
        return parse_ollama_options(options)
    except OptionError as exc:
        raise RequestError(exc.message, param=exc.field) from None


async def _answer(
    request: Request,
    model: str,
    messages: list[Message],
    options: GenerationOptions,
    stream: bool,
    content: Content,
    *,
    tools: Tools | None = None,
    output: OutputFormat | None = None,
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
        tools=tools,
        output=output,
    )
    generation = await gateway.service.start(turn)
    if stream:
        return await compat.stream(request, turn, generation, LineEncoder(model, content), NDJSON, start=False)
    done = await compat.answer(request, generation)
    answer = _final(model, content, generation.text, done)
    if done.get("tool_calls") and "message" in answer:
        answer["message"]["tool_calls"] = ollama_tool_calls(done["tool_calls"])
    return ORJSONResponse(answer, headers=compat.conversation_headers(turn, generation))


# Routes ------------------------------------------------------------------------------


@router.post("/api/chat", openapi_extra=compat.openapi_body(ChatRequest), responses=ANSWERS)
async def chat(request: Request) -> Response:
    data = compat.read_json_object(await request.body())
    _refuse_unsupported(data)
    tools = tooling.parse_tools(data.get("tools"))
    output = tooling.parse_ollama_format(data.get("format"))
    body = compat.validate(ChatRequest, data)
    options = _options(body.options)
    return await _answer(
        request, body.model, _messages(body), options, body.stream is not False, _chat_content,
        tools=tools, output=output,
    )


@router.post("/api/generate", openapi_extra=compat.openapi_body(GenerateRequest), responses=ANSWERS)
async def generate(request: Request) -> Response:
    data = compat.read_json_object(await request.body())
    _refuse_unsupported(data)
    output = tooling.parse_ollama_format(data.get("format"))
    body = compat.validate(GenerateRequest, data)
    messages: list[Message] = [{"role": "system", "content": body.system}] if body.system else []
    if body.prompt:
        messages.append({"role": "user", "content": body.prompt})
    options = _options(body.options)
    return await _answer(
        request, body.model, messages, options, body.stream is not False, _generate_content, output=output
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
