"""What the OpenAI- and Ollama-compatible APIs share: reading a request body into a
typed model, turning a client's message list into a :class:`Turn`, ``agent:<name>``
models, and consuming a generation until its first outcome or its end.

Both APIs are stateless by default, as their clients expect: the client sends the whole
conversation, the last user message becomes ``Turn.message`` and the rest
``Turn.history``, and nothing is stored. ``X-Conversation-Id: <id>`` opts into server
memory for that conversation.

Errors are raised as :class:`ChatError` (the native codes) and rendered in each API's own
shape by :mod:`chatgate.api.errors`, so FastAPI's 422 validation answers never reach these
clients.

A client's ``system`` messages go upstream as sent with a plain model name, where no
agent prompt is added. With ``agent:<name>`` the agent's prompt comes first, and a client
system message is refused (400, ``param`` naming it) unless the agent allows them
(:func:`chatgate.chat.agents.refused_system_message`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from fastapi import Request, Response
from pydantic import BaseModel, ValidationError

from chatgate.api.errors import RequestError
from chatgate.api.limits import SizeLimits
from chatgate.api.responses import Codec, GenerationResponse, first_outcome, run_to_end
from chatgate.chat.agents import client_system_refusal, refused_system_message
from chatgate.chat.events import ChatError, DoneEvent, Event
from chatgate.chat.generation import Generation
from chatgate.chat.service import CONVERSATION_ID, Turn
from chatgate.providers.base import ProviderError
from chatgate.vocabulary import GenerationOptions, Message, OutputFormat, ToolResult, Tools

if TYPE_CHECKING:
    from chatgate.gateway import Gateway

AGENT_PREFIX = "agent:"
CONVERSATION_HEADER = "X-Conversation-Id"
MAX_CONVERSATION_ID_CHARS = 128
#: Every status these routes answer with besides 200, for the OpenAPI description.
ERROR_STATUSES = (400, 401, 403, 404, 409, 413, 429, 500, 502)

ModelT = TypeVar("ModelT", bound=BaseModel)


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


# Request bodies ------------------------------------------------------------------------


def read_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object (its Content-Type was checked by ``api.browsers.JsonBodiesOnly``)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    return data


def validate(model: type[ModelT], data: dict[str, Any]) -> ModelT:
    """Validate strictly (no "1" for 1), naming the first bad field."""
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        where = f"{param}: " if param else ""
        raise RequestError(f"{where}{error['msg']}", param=param) from None


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined, for ``openapi_extra``: routes
    that read their body themselves still describe it in /openapi.json."""
    schema = model.model_json_schema()
    definitions: dict[str, Any] = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    body: dict[str, Any] = inline(schema)
    return body


#: How the OpenAPI description shows a Server-Sent Events answer: each event, its ``data``
#: (one JSON document as text) and its ``event`` name.
SSE_CONTENT: dict[str, Any] = {
    "text/event-stream": {
        "schema": {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
    }
}


def error_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for every error status, each answered with ``model``."""
    return {status: {"model": model} for status in ERROR_STATUSES}


def openapi_body(
    model: type[BaseModel], media_types: tuple[str, ...] = ("application/json",)
) -> dict[str, Any]:
    schema = body_schema(model)
    return {
        "requestBody": {
            "required": True,
            "content": {media: {"schema": schema} for media in media_types},
        },
        "parameters": [
            {
                "name": CONVERSATION_HEADER,
                "in": "header",
                "required": False,
                "description": "Opt into server memory: the conversation to continue and store.",
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_CONVERSATION_ID_CHARS,
                    "pattern": CONVERSATION_ID.pattern,
                },
            }
        ],
    }


# Turns ---------------------------------------------------------------------------------


def conversation_id_of(request: Request) -> str | None:
    value = request.headers.get(CONVERSATION_HEADER)
    if value is None:
        return None
    if not CONVERSATION_ID.fullmatch(value):
        raise RequestError(
            f"{CONVERSATION_HEADER} must be 1 to {MAX_CONVERSATION_ID_CHARS} of the characters "
            "A-Z a-z 0-9 . _ ~ -",
            param=CONVERSATION_HEADER,
        )
    return value


def agent_of(model: str) -> str | None:
    """``agent:<name>`` names an agent; any other model goes to the upstream as it is."""
    return model.removeprefix(AGENT_PREFIX) if model.startswith(AGENT_PREFIX) else None


def make_turn(
    request: Request,
    messages: list[Message],
    *,
    model: str,
    options: GenerationOptions,
    owner: str | None,
    conversation_id: str | None,
    tools: Tools | None = None,
    output: OutputFormat | None = None,
) -> Turn:
    """The last message is the turn's (or the trailing ``tool`` messages, answering the
    calls of the assistant message before them); the ones before are the client's history.

    With a conversation id the server remembers: its stored window is the history,
    unless the client sent a conversation of its own (a non-system message before the
    turn's). With ``agent:<name>`` a system message the agent does not allow is refused,
    whether or not it would have been sent.
    """
    results = _trailing_tool_results(messages)
    if results:
        turn_messages, message = len(results), ""
        size = sum(len(result["content"].encode()) for result in results)
    else:
        if not messages or messages[-1]["role"] != "user":
            raise RequestError("the last message must be a user message (or tool results)", param="messages")
        turn_messages, message = 1, messages[-1]["content"]
        size = len(message.encode())
    gateway = gateway_of(request)
    limit = SizeLimits.of(gateway.settings).message_bytes
    if size > limit:
        raise ChatError("too_large", f"the last message is larger than {limit} bytes")
    agent = agent_of(model)
    if agent is not None:
        chosen = gateway.agents.get(agent)
        refused = refused_system_message(chosen, messages)
        if refused is not None:
            raise RequestError(client_system_refusal(chosen), param=f"messages.{refused}.role")
    history: list[Message] | None = messages[:-turn_messages]
    if results:
        _check_answered(messages, len(messages) - turn_messages)
    remember = conversation_id is not None
    if remember and not any(m["role"] != "system" for m in messages[:-turn_messages]):
        history = None
    return Turn(
        message=message,
        conversation_id=conversation_id,
        agent=agent,
        model=None if agent is not None else model,
        options=options,
        owner=owner,
        client=request.client.host if request.client else None,
        history=history,
        remember=remember,
        apply_agent_prompt=agent is not None,
        tool_results=results or None,
        tools=tools,
        output=output,
    )


def _check_answered(messages: list[Message], first: int) -> None:
    """The tool messages from ``first`` on must answer calls of the assistant message just
    before them: an upstream refuses results it cannot match, later and less clearly."""
    before = messages[first - 1] if first > 0 else None
    calls = {call["id"] for call in before.get("tool_calls", ())} if before and before["role"] == "assistant" else set()
    for i in range(first, len(messages)):
        if messages[i].get("tool_call_id") not in calls:
            raise RequestError(
                "this tool message answers no tool call of the assistant message before it",
                param=f"messages.{i}.tool_call_id",
            )


def _trailing_tool_results(messages: list[Message]) -> list[ToolResult]:
    """The tool messages that end ``messages``, as the turn's results, in order."""
    results: list[ToolResult] = []
    for message in reversed(messages):
        if message["role"] != "tool":
            break
        result: ToolResult = {"tool_call_id": message.get("tool_call_id", ""), "content": message["content"]}
        if "name" in message:
            result["name"] = message["name"]
        results.append(result)
    results.reverse()
    return results


async def upstream_model(gateway: Gateway, name: str) -> str:
    """The upstream model that ``name`` (a model or ``agent:<name>``) answers with; 404
    when the upstream lists its models and ``name`` is not among them."""
    agent = agent_of(name)
    if agent is not None:
        return gateway.agents.get(agent).model or gateway.provider.default_model
    try:
        known = await gateway.provider.models()
    except (ProviderError, OSError, TimeoutError):
        return name  # the upstream cannot say; the first chat will find out
    if not {name, name.removesuffix(":latest"), f"{name}:latest"} & set(known):
        raise ChatError("not_found", f"model '{name}' not found")
    return name


# Generations ---------------------------------------------------------------------------


def _refusal(event: Event) -> ChatError:
    """A generation that failed before its first token, as an error of the request."""
    assert event["type"] == "error"
    return ChatError(event["code"], event["message"], retryable=event.get("retryable", False))


async def stream(
    request: Request, turn: Turn, generation: Generation, codec: Codec, media_type: str, *, start: bool
) -> Response:
    """Stream the answer encoded by ``codec``, after the ``start`` event if ``start``; a
    failure before the first token is an error status in the API's own shape."""
    index, first = await first_outcome(request.receive, generation)
    if first["type"] == "error":
        raise _refusal(first)
    leading: list[Event] = [generation.start_event(), first] if start else [first]
    return GenerationResponse(
        generation, codec, media_type, leading=leading, index=index,
        headers=conversation_headers(turn, generation),
    )


async def answer(request: Request, generation: Generation) -> DoneEvent:
    """The whole answer, for non-streaming requests; a failure is an error status."""
    end = await run_to_end(request.receive, generation)
    if end["type"] == "error":
        raise _refusal(end)
    return end


def conversation_headers(turn: Turn, generation: Generation) -> dict[str, str]:
    """Only a remembered conversation is worth naming to the client."""
    return {CONVERSATION_HEADER: generation.conversation_id} if turn.remember else {}
