"""Native events: what every transport and dialect codec is built on.

They are plain dicts (TypedDicts) so the hot path never validates per token; ``orjson``
serialises them directly.
"""

from __future__ import annotations

from typing import Literal, TypedDict

from chatgate.providers.base import (
    EmbeddingsUnsupported,
    ModelNotFound,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
)
from chatgate.vocabulary import FinishReason

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


class DoneEvent(TypedDict):
    type: Literal["done"]
    id: str
    finish_reason: FinishReason
    usage: UsageDict
    timings: TimingsDict


class ErrorEvent(TypedDict, total=False):
    type: Literal["error"]
    id: str
    code: ErrorCode
    message: str
    retryable: bool


Event = StartEvent | DeltaEvent | DoneEvent | ErrorEvent


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
    if isinstance(exc, EmbeddingsUnsupported):
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
