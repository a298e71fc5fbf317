"""OpenAI's Responses API: ``POST /v1/responses``, on the one chat service.

A response is a conversation: its id (``resp_<hex>``) is the turn's conversation id, so
with ``store`` (the default) the input and the answer are stored under it. A later
request's ``previous_response_id`` continues it by copying it into a conversation of its
own (:meth:`ChatService.branch`): any stored response can be continued, more than once,
and continuing one leaves it as it was. Input items before the turn's own (a client's own
history) are stored with it, so a later request continues what this one saw.
``instructions`` apply to one request, as OpenAI's do: sent first, never stored.

What chatgate cannot honour (background responses, server-side conversations, reasoning
effort, logprobs, hosted tools, non-text input…) is refused with 400 naming the field,
never dropped. Errors come back in OpenAI's shape, as under the rest of ``/v1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, StringConstraints

from chatgate.api import compat, tooling
from chatgate.api.auth import caller
from chatgate.api.errors import ORJSONResponse, RequestError
from chatgate.api.openai_compat import ErrorBody
from chatgate.chat.agents import client_system_refusal, refused_system_message
from chatgate.chat.events import ChatError, DoneEvent, ErrorEvent, Event, ToolCallEvent
from chatgate.chat.service import CONVERSATION_ID
from chatgate.options import OptionError, parse_options
from chatgate.store.base import StoredMessage
from chatgate.vocabulary import GenerationOptions, Message, OutputFormat, ToolCall, ToolResult

router = APIRouter()

# Requests ----------------------------------------------------------------------------

MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class ResponsesRequest(BaseModel):
    """The fields the model reads; tools, ``text`` and the sampling fields are read by
    :mod:`chatgate.api.tooling` and :func:`chatgate.options.parse_options`."""

    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[Annotated[str, StringConstraints(max_length=64)], MetadataValue] | None = Field(
        None, max_length=16
    )
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    stream_options: dict[str, Any] | None = None


class ResponsesRequestBody(ResponsesRequest):
    """A Responses API request as chatgate reads it, for the OpenAPI description."""

    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None


#: Fields read elsewhere than by :class:`ResponsesRequest`.
_READ_APART = ("tools", "tool_choice", "parallel_tool_calls", "text", "temperature", "top_p", "max_output_tokens")
#: Accepted, and only their defaults: each value allowed, and why anything else is refused.
_DEFAULTS_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "background": ((False,), "background responses are not supported: the answer comes while the request is open"),
    "conversation": ((), "conversation is not supported: continue a response with previous_response_id"),
    "include": (([],), "include is not supported: chatgate has nothing more to include"),
    "prompt": ((), "prompt templates are not supported: send input and instructions"),
    "truncation": (("disabled", "auto"), "truncation must be disabled or auto"),
    "top_logprobs": ((0,), "logprobs are not supported"),
    "service_tier": (("auto", "default"), "service_tier must be auto or default"),
    "max_tool_calls": ((), "max_tool_calls is not supported"),
}
#: Accepted and ignored: hints about caching upstream, which ask nothing of the answer.
_IGNORED = ("prompt_cache_retention",)
_ACCEPTED = {*ResponsesRequest.model_fields, *_READ_APART, *_DEFAULTS_ONLY, *_IGNORED, "reasoning"}


def _same(value: Any, allowed: Any) -> bool:
    """``value == allowed`` without ``True == 1`` or ``0 == False``."""
    return type(value) is type(allowed) and bool(value == allowed)


def _refuse_unsupported(data: dict[str, Any]) -> None:
    """Clear refusals for what chatgate cannot honour, before the schema's generic ones."""
    for field, (allowed, why) in _DEFAULTS_ONLY.items():
        value = data.get(field)
        if value is not None and not any(_same(value, a) for a in allowed):
            raise RequestError(why, param=field)
    reasoning = data.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, Mapping):
            raise RequestError("reasoning must be an object", param="reasoning")
        for key, value in reasoning.items():
            if value is not None:
                raise RequestError(f"reasoning.{key} is not supported: set it to null", param=f"reasoning.{key}")
    for field, value in data.items():
        if field not in _ACCEPTED and value is not None:
            raise RequestError(f"{field} is not supported", param=field)


def _text_format(text: Any) -> tuple[dict[str, Any], OutputFormat | None]:
    """``text`` as the response echoes it, and the output format it asks for."""
    if text is None:
        return {"format": {"type": "text"}}, None
    if not isinstance(text, Mapping):
        raise RequestError("text must be an object", param="text")
    for key, value in text.items():
        if key == "verbosity" and value not in (None, "medium"):
            raise RequestError("text.verbosity is not supported: leave it medium", param="text.verbosity")
        if key not in ("format", "verbosity"):
            raise RequestError(f"text.{key} is not supported", param=f"text.{key}")
    fmt = text.get("format")
    output = tooling.parse_response_format(fmt, field="text.format")
    return {"format": dict(fmt) if fmt is not None else {"type": "text"}}, output


def _options(data: dict[str, Any]) -> GenerationOptions:
    fields = {"temperature": data.get("temperature"), "top_p": data.get("top_p"),
              "max_tokens": data.get("max_output_tokens")}
    try:
        return parse_options(fields, where="")
    except OptionError as exc:
        if exc.field != "max_tokens":
            raise RequestError(exc.message, param=exc.field) from None
        message = exc.message.replace("max_tokens", "max_output_tokens", 1)
        raise RequestError(message, param="max_output_tokens") from None


# Input items -------------------------------------------------------------------------

_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "user": "user", "system": "system", "developer": "system", "assistant": "assistant",
}
_TEXT_PARTS = ("input_text", "output_text")


def input_messages(value: str | list[dict[str, Any]]) -> tuple[list[Message], list[str]]:
    """The input as prompt messages, and for each the param of the item it began with.
    Consecutive ``function_call`` items join the assistant message before them (or a new
    one); each ``function_call_output`` is a ``tool`` message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}], ["input"]
    messages: list[Message] = []
    params: list[str] = []
    for i, item in enumerate(value):
        where = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                continue
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = _call_id(item, where)
            messages.append({"role": "tool", "content": _output_text(item.get("output"), where), "tool_call_id": call_id})
        else:
            raise RequestError(
                f"{where}: input items of type {str(kind)[:40]!r} are not supported "
                "(only message, function_call and function_call_output)",
                param=f"{where}.type",
            )
        params.append(where)
    if not messages:
        raise RequestError("input must hold at least one item", param="input")
    return messages, params


def _message(item: Mapping[str, Any], where: str) -> Message:
    given = item.get("role")
    role = _ROLES.get(given) if isinstance(given, str) else None
    if role is None:
        raise RequestError(f"{where}.role must be user, system, developer or assistant", param=f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
    return {"role": role, "content": "\n".join(_part_text(part, f"{where}.content.{j}") for j, part in enumerate(content))}


def _part_text(part: Any, where: str) -> str:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind not in _TEXT_PARTS:
        raise RequestError(f"{where}: only text content is supported, not {str(kind)[:40]!r}", param=f"{where}.type")
    text = part.get("text")
    if not isinstance(text, str):
        raise RequestError(f"{where}.text must be a string", param=f"{where}.text")
    return text


def _call_id(item: Mapping[str, Any], where: str) -> str:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not 0 < len(call_id) <= tooling.MAX_TOOL_CALL_ID_CHARS:
        raise RequestError(f"{where}.call_id must be a non-empty string", param=f"{where}.call_id")
    return call_id


def _function_call(item: Mapping[str, Any], where: str) -> ToolCall:
    call_id = _call_id(item, where)
    name, arguments = item.get("name"), item.get("arguments")
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where}.name must be a non-empty string", param=f"{where}.name")
    if not isinstance(arguments, str):
        raise RequestError(f"{where}.arguments must be a JSON text", param=f"{where}.arguments")
    return {"id": call_id, "name": name, "arguments": arguments}


def _output_text(output: Any, where: str) -> str:
    if isinstance(output, list):
        return "".join(_part_text(part, f"{where}.output.{j}") for j, part in enumerate(output))
    if not isinstance(output, str):
        raise RequestError(f"{where}.output must be a string or a list of text parts", param=f"{where}.output")
    return output


def stored_form(messages: list[Message]) -> list[StoredMessage]:
    """Prompt messages as the store keeps them: consecutive tool results in one message."""
    now = time.time()
    stored: list[StoredMessage] = []
    for message in messages:
        if message["role"] != "tool":
            calls = tuple(message.get("tool_calls", ()))
            stored.append(StoredMessage(message["role"], message["content"], created_at=now, tool_calls=calls))
            continue
        result: ToolResult = {"tool_call_id": message.get("tool_call_id", ""), "content": message["content"]}
        if stored and stored[-1].role == "tool":
            stored[-1] = dataclasses.replace(stored[-1], tool_results=(*stored[-1].tool_results, result))
        else:
            stored.append(StoredMessage("tool", "", created_at=now, tool_results=(result,)))
    return stored


def _turn_size(messages: list[Message]) -> int:
    """How many messages at the end are the turn's own: its tool results, or one user message."""
    count = 0
    while count < len(messages) and messages[-1 - count]["role"] == "tool":
        count += 1
    if count:
        return count
    if messages[-1]["role"] != "user":
        raise RequestError("input must end with a user message or function_call_output items", param="input")
    return 1


def _check_answered(before: list[Message], own: list[Message], params: list[str]) -> None:
    """Function call outputs must answer calls of the assistant message just before them
    (in the input or the previous response): an upstream refuses others less clearly."""
    if own[-1]["role"] != "tool":
        return
    last = before[-1] if before else None
    calls = {call["id"] for call in last.get("tool_calls", ())} if last and last["role"] == "assistant" else set()
    for message, param in zip(own, params, strict=True):
        if message.get("tool_call_id") not in calls:
            raise RequestError(
                f"{param}: no function call with call_id {message.get('tool_call_id')!r} precedes this output",
                param=f"{param}.call_id",
            )


# Responses ---------------------------------------------------------------------------


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}


def _usage(done: DoneEvent) -> dict[str, Any]:
    prompt, completion = done["usage"]["prompt_tokens"], done["usage"]["completion_tokens"]
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _ending(done: DoneEvent) -> tuple[str, dict[str, Any] | None]:
    """The response's status and its ``incomplete_details``."""
    if done["finish_reason"] == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if done["finish_reason"] == "cancelled":
        return "cancelled", None
    return "completed", None


def _call_ids(done: DoneEvent) -> list[ToolCall]:
    """The answer's calls, each with a call id (made from its place if the upstream gave none)."""
    return [
        {**call, "id": call["id"] or f"call_{i}"} for i, call in enumerate(done.get("tool_calls") or ())
    ]


@dataclasses.dataclass(slots=True)
class Envelope:
    """What every copy of one response says besides its progress."""

    fields: dict[str, Any]

    def whole(
        self,
        status: str,
        output: list[dict[str, Any]],
        *,
        usage: dict[str, Any] | None = None,
        incomplete: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = {**self.fields, "status": status, "output": output, "usage": usage,
                "incomplete_details": incomplete, "error": error}
        if status != "in_progress":
            body["completed_at"] = int(time.time())
        return body


def _sse(kind: str, seq: int, fields: dict[str, Any]) -> bytes:
    data = orjson.dumps({"type": kind, "sequence_number": seq, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


@dataclasses.dataclass(slots=True)
class _OpenText:
    item_id: str
    index: int
    prefix: bytes
    parts: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True)
class _OpenCall:
    item: dict[str, Any]
    index: int
    call: int
    parts: list[str] = dataclasses.field(default_factory=list)


class StreamEncoder:
    """Native events → the Responses API's server-sent events. Output items open as text
    or calls arrive and close before the next one opens; a text delta costs one
    ``orjson.dumps`` of its text (its envelope is encoded when its item opens)."""

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: _OpenText | _OpenCall | None = None
        #: The call items by the native call index.
        self.calls: dict[int, dict[str, Any]] = {}

    def __call__(self, event: Event) -> bytes:
        if event["type"] == "delta":
            out = b"" if isinstance(self.open, _OpenText) else self._close("completed") + self._open_text()
            assert isinstance(self.open, _OpenText)
            self.open.parts.append(event["text"])
            seq, self.seq = self.seq, self.seq + 1
            return out + self.open.prefix + b"%d" % seq + b',"delta":' + orjson.dumps(event["text"]) + b"}\n\n"
        if event["type"] == "tool_call":
            return self._tool_call(event)
        if event["type"] == "start":
            response = self.envelope.whole("in_progress", [])
            return self._event("response.created", response=response) + self._event(
                "response.in_progress", response=response
            )
        if event["type"] == "done":
            return self._done(event)
        return self._failed(event)

    def _event(self, kind: str, **fields: Any) -> bytes:
        seq, self.seq = self.seq, self.seq + 1
        return _sse(kind, seq, fields)

    def _open_text(self) -> bytes:
        item_id, index = _item_id("msg"), len(self.output)
        head = {"type": "response.output_text.delta", "item_id": item_id, "output_index": index,
                "content_index": 0, "logprobs": []}
        prefix = b"event: response.output_text.delta\ndata: " + orjson.dumps(head)[:-1] + b',"sequence_number":'
        self.open = _OpenText(item_id, index, prefix)
        place = {"item_id": item_id, "output_index": index, "content_index": 0}
        return self._event(
            "response.output_item.added",
            output_index=index,
            item={"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []},
        ) + self._event(
            "response.content_part.added", **place,
            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
        )

    def _tool_call(self, event: ToolCallEvent) -> bytes:
        out = b""
        if not (isinstance(self.open, _OpenCall) and self.open.call == event["index"]):
            if event["index"] in self.calls:
                return b""  # a late piece of a call already closed: the end carries it whole
            out = self._close("completed")
            item = {
                "type": "function_call", "id": _item_id("fc"),
                "call_id": event.get("call_id") or f"call_{event['index']}",
                "name": event.get("name", ""), "arguments": "", "status": "in_progress",
            }
            self.open = _OpenCall(item, len(self.output), event["index"])
            self.calls[event["index"]] = item
            out += self._event("response.output_item.added", output_index=self.open.index, item=dict(item))
        assert isinstance(self.open, _OpenCall)
        if not event["arguments"]:
            return out
        self.open.parts.append(event["arguments"])
        return out + self._event(
            "response.function_call_arguments.delta",
            item_id=self.open.item["id"], output_index=self.open.index, delta=event["arguments"],
        )

    def _close(self, status: str) -> bytes:
        opened, self.open = self.open, None
        if opened is None:
            return b""
        if isinstance(opened, _OpenText):
            text = "".join(opened.parts)
            item = _text_item(opened.item_id, text, status)
            self.output.append(item)
            place = {"item_id": opened.item_id, "output_index": opened.index, "content_index": 0}
            return (
                self._event("response.output_text.done", **place, text=text, logprobs=[])
                + self._event("response.content_part.done", **place, part=item["content"][0])
                + self._event("response.output_item.done", output_index=opened.index, item=item)
            )
        item = opened.item
        item.update(arguments="".join(opened.parts), status=status)
        self.output.append(item)
        return self._event(
            "response.function_call_arguments.done",
            item_id=item["id"], output_index=opened.index, arguments=item["arguments"],
        ) + self._event("response.output_item.done", output_index=opened.index, item=item)

    def _done(self, done: DoneEvent) -> bytes:
        status, incomplete = _ending(done)
        out = self._close("completed" if status == "completed" else "incomplete")
        for index, call in enumerate(_call_ids(done)):
            item = self.calls.get(index)
            if item is None:  # never streamed: given whole
                item = {"type": "function_call", "id": _item_id("fc"), "call_id": call["id"],
                        "name": call["name"], "arguments": call["arguments"], "status": "completed"}
                self.calls[index] = item
                place = len(self.output)
                self.output.append(item)
                out += self._event("response.output_item.added", output_index=place, item=item)
                out += self._event("response.output_item.done", output_index=place, item=item)
            else:  # whole, should a piece have come after its item closed
                item.update(name=call["name"] or item["name"], arguments=call["arguments"])
        response = self.envelope.whole(status, self.output, usage=_usage(done), incomplete=incomplete)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + self._event(kind, response=response)

    def _failed(self, error: ErrorEvent) -> bytes:
        out = self._close("incomplete")
        code = "rate_limit_exceeded" if error.get("code") == "rate_limited" else "server_error"
        detail = {"code": code, "message": error.get("message", "the answer failed")}
        return out + self._event("response.failed", response=self.envelope.whole("failed", self.output, error=detail))


def _output(text: str, done: DoneEvent, status: str) -> list[dict[str, Any]]:
    """A whole answer's output items: its text, then each call."""
    items = [_text_item(_item_id("msg"), text, status)] if text else []
    items.extend(
        {"type": "function_call", "id": _item_id("fc"), "call_id": call["id"], "name": call["name"],
         "arguments": call["arguments"], "status": "completed"}
        for call in _call_ids(done)
    )
    return items


# The route ---------------------------------------------------------------------------


def _previous_not_found(previous_id: str) -> Response:
    message = f"Previous response with id '{previous_id}' not found."
    error = {"message": message, "type": "invalid_request_error", "param": "previous_response_id",
             "code": "previous_response_not_found"}
    return ORJSONResponse({"error": error}, status_code=404)


async def _history(
    request: Request, body: ResponsesRequest, response_id: str, store: bool, own: list[Message], agent: str
) -> list[StoredMessage] | None:
    """The conversation this turn continues: the previous response's and the client's
    own history items, written under ``response_id`` when ``store``; None when the
    previous response is not the caller's."""
    service = compat.gateway_of(request).service
    owner, previous = caller(request), body.previous_response_id
    extra = stored_form(own)
    if previous is not None and not CONVERSATION_ID.fullmatch(previous):
        return None
    try:
        if store:
            return await service.branch(owner, previous, response_id, extra=extra, agent=agent)
        if previous is not None:
            return [*(await service.conversation(owner, previous)).messages, *extra]
    except ChatError as exc:
        if exc.code == "not_found":
            return None
        raise
    return extra


@router.post(
    "/v1/responses",
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": compat.body_schema(ResponsesRequestBody)}}}},
    responses={
        **compat.error_responses(ErrorBody),
        200: {"content": {"application/json": {"schema": {"type": "object"}},
                          **compat.SSE_CONTENT}},
    },
)
async def create_response(request: Request) -> Response:
    gateway = compat.gateway_of(request)
    data = compat.read_json_object(await request.body())
    _refuse_unsupported(data)
    tools = tooling.parse_tools(data.get("tools"), data.get("tool_choice"), data.get("parallel_tool_calls"))
    text, output_format = _text_format(data.get("text"))
    options = _options(data)
    body = compat.validate(ResponsesRequest, {k: v for k, v in data.items() if k not in _READ_APART})
    messages, params = input_messages(body.input)
    own = _turn_size(messages)
    agent_name = compat.agent_of(body.model)
    agent = gateway.agents.get(agent_name)
    prompt: list[Message] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if agent_name is not None:
        refused = refused_system_message(agent, prompt + messages)
        if refused is not None:
            where = "instructions" if prompt and refused == 0 else f"{params[refused - len(prompt)]}.role"
            raise RequestError(client_system_refusal(agent), param=where)
    owner = caller(request)
    store = body.store is not False and gateway.service.memory_enabled
    response_id = _item_id("resp")
    history = await _history(request, body, response_id, store, messages[:-own], agent.name)
    if history is None:
        return _previous_not_found(str(body.previous_response_id))
    before = prompt + [m for stored in history for m in stored.as_prompt()]
    envelope = Envelope({
        "id": response_id, "object": "response", "created_at": int(time.time()), "model": body.model,
        "instructions": body.instructions, "metadata": body.metadata or {},
        "tools": data.get("tools") or [], "tool_choice": data.get("tool_choice") or "auto",
        "parallel_tool_calls": data.get("parallel_tool_calls") is not False,
        "temperature": options.temperature, "top_p": options.top_p,
        "max_output_tokens": options.max_tokens, "previous_response_id": body.previous_response_id,
        "store": store, "text": text, "truncation": data.get("truncation") or "disabled",
        "reasoning": {"effort": None, "summary": None}, "background": False, "user": body.user,
    })
    try:
        _check_answered(before, messages[-own:], params[-own:])
        turn = compat.make_turn(
            request, before + messages[-own:], model=body.model, options=options, owner=owner,
            conversation_id=None, tools=tools, output=output_format,
        )
        turn = dataclasses.replace(turn, conversation_id=response_id, remember=store)
        generation = await gateway.service.start(turn)
        if body.stream:
            encode = StreamEncoder(envelope)
            return await compat.stream(request, turn, generation, encode, "text/event-stream", start=True)
        done = await compat.answer(request, generation)
    except ChatError:
        if store:  # nothing answered: the copy made for it would never be named to anyone
            with contextlib.suppress(ChatError):
                await gateway.service.delete(owner, response_id)
        raise
    status, incomplete = _ending(done)
    item_status = "completed" if status == "completed" else "incomplete"
    whole = envelope.whole(
        status, _output(generation.text, done, item_status), usage=_usage(done), incomplete=incomplete
    )
    return ORJSONResponse(whole, headers=compat.conversation_headers(turn, generation))
