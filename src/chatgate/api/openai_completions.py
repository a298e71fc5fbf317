"""OpenAI's legacy text completions: ``POST /v1/completions``, for the clients and tools
that still speak it (LangChain's ``OpenAI`` class, editors' completion plugins).

The ``prompt`` becomes one user message of a turn (stateless unless ``X-Conversation-Id``
names a conversation, as for chat completions), as Ollama's own
OpenAI-compatible server does it, so the upstream applies its chat template; the answer
comes back as a ``text_completion`` (streamed as SSE chunks, then ``data: [DONE]``). What a
chat model cannot do here (``suffix``, ``echo``, ``best_of``, ``logprobs``, ``n`` > 1, token
arrays, several prompts) is refused with 400 naming the field.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from chatgate.api import compat
from chatgate.api.auth import caller
from chatgate.api.errors import ORJSONResponse, RequestError, openai_error, status_of
from chatgate.api.openai_compat import ERRORS, SamplingFields, StreamOptions, completion_usage
from chatgate.chat.events import DoneEvent, Event
from chatgate.options import OptionError, parse_options

router = APIRouter()

#: The sampling fields, read by :func:`parse_options`.
SAMPLING = ("temperature", "top_p", "max_tokens", "stop", "seed", "frequency_penalty", "presence_penalty")
REFUSED = {
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "echo": "echo is not supported",
    "best_of": "best_of is not supported",
    "logprobs": "logprobs are not supported",
    "logit_bias": "logit_bias is not supported",
}


class CompletionRequest(BaseModel):
    """A text completion request; ``user`` is accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    prompt: str | list[str]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1)


class CompletionRequestBody(CompletionRequest, SamplingFields):
    """The request as the OpenAPI description shows it."""


def _prompt(value: str | list[str]) -> str:
    prompt = value[0] if isinstance(value, list) and len(value) == 1 else value
    if not isinstance(prompt, str):
        raise RequestError("prompt must be one string (several prompts are not supported)", param="prompt")
    if not prompt:
        raise RequestError("prompt must not be empty", param="prompt")
    return prompt


def _refuse_unsupported(data: dict[str, Any]) -> None:
    n = data.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        raise RequestError("n > 1 is not supported: chatgate returns one choice", param="n")
    for field, why in REFUSED.items():
        if data.get(field) not in (None, False, "", {}) and not (field == "best_of" and data[field] == 1):
            raise RequestError(why, param=field)


def _finish_reason(done: DoneEvent) -> str:
    return "length" if done["finish_reason"] == "length" else "stop"


class TextChunkEncoder:
    """Native events → ``text_completion`` SSE chunks; the envelope is encoded once."""

    def __init__(self, envelope: dict[str, Any], include_usage: bool) -> None:
        self.envelope = envelope
        self.include_usage = include_usage
        self.prefix = b"data: " + orjson.dumps(envelope)[:-1] + b',"choices":[{"text":'
        self.suffix = b',"index":0,"logprobs":null,"finish_reason":null}]}\n\n'

    def __call__(self, event: Event) -> bytes:
        if event["type"] == "delta":
            return self.prefix + orjson.dumps(event["text"]) + self.suffix
        if event["type"] == "done":
            choice = {"text": "", "index": 0, "logprobs": None, "finish_reason": _finish_reason(event)}
            last = b"data: " + orjson.dumps({**self.envelope, "choices": [choice]}) + b"\n\n"
            if self.include_usage:
                usage = {**self.envelope, "choices": [], "usage": completion_usage(event)}
                last += b"data: " + orjson.dumps(usage) + b"\n\n"
            return last + b"data: [DONE]\n\n"
        if event["type"] == "error":
            detail = openai_error(event["code"], event["message"], status_of(event["code"]))
            return b"data: " + orjson.dumps({"error": detail}) + b"\n\n"
        return b""


class TextChoice(BaseModel):
    text: str
    index: int
    logprobs: None
    finish_reason: str


class TextCompletion(BaseModel):
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: None
    choices: list[TextChoice]
    usage: dict[str, int]


@router.post(
    "/v1/completions",
    openapi_extra=compat.openapi_body(CompletionRequestBody),
    responses={
        **ERRORS,
        200: {
            "model": TextCompletion,
            # Each Server-Sent Event carries one text_completion chunk as JSON in `data`.
            "content": compat.SSE_CONTENT,
        },
    },
)
async def completions(request: Request) -> Response:
    gateway = compat.gateway_of(request)
    data = compat.read_json_object(await request.body())
    _refuse_unsupported(data)
    body = compat.validate(CompletionRequest, {k: v for k, v in data.items() if k not in SAMPLING})
    try:
        options = parse_options({name: data.get(name) for name in SAMPLING}, where="")
    except OptionError as exc:
        raise RequestError(exc.message, param=exc.field) from None
    turn = compat.make_turn(
        request,
        [{"role": "user", "content": _prompt(body.prompt)}],
        model=body.model,
        options=options,
        owner=caller(request),
        conversation_id=compat.conversation_id_of(request),
    )
    generation = await gateway.service.start(turn)
    envelope = {
        "id": "cmpl-" + generation.id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": None,
    }
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        encode = TextChunkEncoder(envelope, include_usage)
        return await compat.stream(request, turn, generation, encode, "text/event-stream", start=False)
    done = await compat.answer(request, generation)
    choice = {"text": generation.text, "index": 0, "logprobs": None, "finish_reason": _finish_reason(done)}
    return ORJSONResponse(
        {**envelope, "choices": [choice], "usage": completion_usage(done)},
        headers=compat.conversation_headers(turn, generation),
    )
