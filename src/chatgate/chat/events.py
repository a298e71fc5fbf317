"""Native events: what every transport and dialect codec is built on.

They are plain dicts (TypedDicts) so the hot path never validates per token; ``orjson``
serialises them directly.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

from chatgate.providers.base import (
    ModelNotFound,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    Unsupported,
)
from chatgate.vocabulary import FinishReason, ToolCall

ErrorCode = Literal[
    "bad_request", "too_large", "unauthorized", "forbidden", "not_found", "rate_limited",
    "busy", "provider_unavailable", "provider_error", "timeout", "internal",
]


class UsageDict(TypedDict):
    prompt_tokens: int
    completion_tokens: int


class TimingsDict(TypedDict):
    ttft_ms: float | None
    total_ms: float


class StartEvent(TypedDict):
    type: Literal["start"]
    id: str
    conversation_id: str
    model: str
    agent: str


class DeltaEvent(TypedDict):
    type: Literal["delta"]
    id: str
    seq: int
    text: str


class ToolCallEvent(TypedDict):
    """A piece of tool call ``index``, in the order the upstream sent it: the first piece
    of a call has its ``call_id`` and ``name``; each piece has a fragment of its
    ``arguments`` text, and the fragments of a call joined are the whole JSON text.
    ``seq`` counts on with the deltas' (resume skips what a client has seen)."""

    type: Literal["tool_call"]
    id: str
    seq: int
    index: int
    call_id: NotRequired[str]
    name: NotRequired[str]
    arguments: str


class DoneEvent(TypedDict):
    """The end of an answer; ``tool_calls`` holds the whole calls when the model made any
    (``finish_reason`` is then ``tool_calls``, unless a cap cut it)."""

    type: Literal["done"]
    id: str
    finish_reason: FinishReason
    usage: UsageDict
    timings: TimingsDict
    tool_calls: NotRequired[list[ToolCall]]


class ErrorEvent(TypedDict):
    type: Literal["error"]
    id: NotRequired[str]
    code: ErrorCode
    message: str
    retryable: bool


Event = StartEvent | DeltaEvent | ToolCallEvent | DoneEvent | ErrorEvent


def error_event(code: ErrorCode, message: str, *, id: str | None = None, retryable: bool = False) -> ErrorEvent:
    event: ErrorEvent = {"type": "error", "code": code, "message": message, "retryable": retryable}
    if id is not None:
        event["id"] = id
    return event


def provider_error_code(exc: ProviderError) -> ErrorCode:
    if isinstance(exc, ProviderUnavailable):
        return "provider_unavailable"
    if isinstance(exc, ProviderTimeout):
        return "timeout"
    if isinstance(exc, ModelNotFound):
        return "not_found"
    if isinstance(exc, Unsupported):
        return "bad_request"
    return "provider_error"


class ChatError(Exception):
    """A request refused; ``code`` is the native error code, which each protocol renders
    in its own terms (an HTTP status and body, an ``error`` frame)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after

    def event(self, id: str | None = None) -> ErrorEvent:
        return error_event(self.code, self.message, id=id, retryable=self.retryable)
