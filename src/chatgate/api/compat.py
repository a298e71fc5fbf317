"""What the OpenAI- and Ollama-compatible APIs share: reading a request body into a
typed model, turning a client's message list into a :class:`Turn`, ``agent:<name>``
models, and consuming a generation until its first outcome or its end.

Both APIs are stateless by default, as their clients expect: the client sends the whole
conversation, the last user message becomes ``Turn.message`` and the rest
``Turn.history``, and nothing is stored. ``X-Conversation-Id: <id>`` opts into server
memory for that conversation.

Errors are raised as :class:`ChatError` (the native codes); each API's route class
renders them in its own shape, so FastAPI's 422 validation answers never reach these
clients.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from chatgate.api.http import GenerationStream, _cancel_on_disconnect, _first_outcome
from chatgate.chat.events import ChatError, DoneEvent, ErrorCode, Event
from chatgate.chat.generation import Generation
from chatgate.chat.service import CONVERSATION_ID, Turn
from chatgate.providers.base import GenerationOptions, Message, ProviderError

if TYPE_CHECKING:
    from chatgate.gateway import Gateway

AGENT_PREFIX = "agent:"
CONVERSATION_HEADER = "X-Conversation-Id"
MAX_CONVERSATION_ID_CHARS = 128
STATUS_OF_CODE: dict[ErrorCode, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "busy": 409,
    "too_large": 413,
    "rate_limited": 429,
    "internal": 500,
    "provider_unavailable": 502,
    "provider_error": 502,
    "timeout": 502,
}
INT32 = 2**31 - 1
INT64 = 2**63 - 1
#: Every status these routes answer with besides 200, for the OpenAPI description.
ERROR_STATUSES = (400, 401, 403, 404, 409, 413, 429, 500, 502)

ModelT = TypeVar("ModelT", bound=BaseModel)


class RequestError(ChatError):
    """A request refused as malformed or unsupported; ``param`` names the field."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__("bad_request", message, status=400)
        self.param = param


def error_route(render: Callable[[ChatError], Response]) -> type[APIRoute]:
    """A route class answering every :class:`ChatError` its endpoints raise with ``render``."""

    class CompatRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except ChatError as exc:
                    response = render(exc)
                    if exc.retry_after is not None:
                        response.headers["Retry-After"] = str(math.ceil(exc.retry_after))
                    return response

            return handle

    return CompatRoute


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


# Request bodies ------------------------------------------------------------------------


def read_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, whatever its Content-Type (``curl -d`` sends a form's)."""
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


class TooLargeBody(BaseModel):
    """The answer of the body-size middleware, which runs before any route."""

    detail: str
    code: Literal["too_large"]


def error_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for every error status, each answered with ``model``."""
    responses: dict[int | str, dict[str, Any]] = {
        status: {"model": model} for status in ERROR_STATUSES
    }
    too_large = {"anyOf": [body_schema(model), body_schema(TooLargeBody)]}
    responses[413] = {
        "description": "Too large",
        "content": {"application/json": {"schema": too_large}},
    }
    return responses


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
) -> Turn:
    """The last message is the turn's; the ones before it are the client's history.

    With a conversation id the server remembers: its stored window is the history,
    unless the client sent a conversation of its own (more than one non-system message).
    """
    if not messages or messages[-1]["role"] != "user":
        raise RequestError("the last message must be a user message", param="messages")
    message = messages[-1]["content"]
    limit = gateway_of(request).settings.max_message_bytes
    if len(message.encode()) > limit:
        raise ChatError("too_large", f"the last message is larger than {limit} bytes", status=413)
    history: list[Message] | None = messages[:-1]
    remember = conversation_id is not None
    if remember and sum(m["role"] != "system" for m in messages) <= 1:
        history = None
    agent = agent_of(model)
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
    )


async def model_names(gateway: Gateway) -> list[str]:
    """The upstream's models (none when it cannot say), then every agent as ``agent:<name>``."""
    try:
        upstream = await gateway.provider.models()
    except (ProviderError, OSError, TimeoutError):
        upstream = []
    names = list(dict.fromkeys(name for name in upstream if name))
    return names + [AGENT_PREFIX + name for name in gateway.agents.names()]


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
        raise ChatError("not_found", f"model '{name}' not found", status=404)
    return name


# Generations ---------------------------------------------------------------------------


def generation_error(event: Event) -> ChatError:
    assert event["type"] == "error"
    code = event["code"]
    return ChatError(code, event["message"], status=STATUS_OF_CODE.get(code, 500))


async def first_outcome(
    request: Request, generation: Generation
) -> tuple[AsyncIterator[Event], Event]:
    """Wait for the first delta or the end; a failure until then is an HTTP error.
    Returns the event iterator, positioned after that first outcome, and the outcome."""
    events = generation.events()
    watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, generation))
    try:
        first = await _first_outcome(events)
    finally:
        watcher.cancel()
    if first["type"] == "error":
        raise generation_error(first)
    return events, first


async def run_to_end(request: Request, generation: Generation) -> DoneEvent:
    """The whole answer, for non-streaming requests; any failure is an HTTP error."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, generation))
    try:
        async for event in generation.events():
            if event["type"] == "error":
                raise generation_error(event)
            if event["type"] == "done":
                return event
    finally:
        watcher.cancel()
    raise RuntimeError("generation ended without a terminal event")  # pragma: no cover


def conversation_headers(turn: Turn, generation: Generation) -> dict[str, str]:
    """Only a remembered conversation is worth naming to the client."""
    return {CONVERSATION_HEADER: generation.conversation_id} if turn.remember else {}


def stream_response(
    turn: Turn,
    generation: Generation,
    events: AsyncIterator[Event],
    leading: list[Event],
    encode: Callable[[Event], bytes],
    media_type: str,
) -> GenerationStream:
    response = GenerationStream(generation, events, leading, encode, media_type)
    if not turn.remember:
        del response.headers[CONVERSATION_HEADER]
    return response
