"""Size limits: all of them derived here from ``CHATGATE_MAX_MESSAGE_BYTES``, and the HTTP
body limit enforced before a body is parsed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatgate.api.errors import error_response, shape_of
from chatgate.chat.events import ChatError

if TYPE_CHECKING:
    from chatgate.config import Settings

#: What a body or frame may hold besides its message (ids, options, JSON punctuation).
ENVELOPE_BYTES = 4096
#: Clients that resend the conversation each turn (the OpenAI and Ollama APIs, CS_Agent's
#: frames) may send this many messages' worth.
HISTORY_FACTOR = 64


@dataclass(frozen=True, slots=True)
class SizeLimits:
    #: The new message of a turn, on every API.
    message_bytes: int
    #: An HTTP body or WebSocket frame carrying one message.
    body_bytes: int
    #: A body or frame that carries the client's whole conversation as well.
    history_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> SizeLimits:
        message = settings.max_message_bytes
        return cls(message, message + ENVELOPE_BYTES, HISTORY_FACTOR * message)


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Answer 413 to HTTP bodies over the limit (declared or streamed).

    Routes under ``history_prefixes`` carry the client's whole conversation in each body
    (the OpenAI and Ollama APIs), so they get ``history_max_bytes``; each message in them
    is still held to the message limit by the route.
    """

    def __init__(
        self, app: ASGIApp, limits: SizeLimits, *, history_prefixes: tuple[str, ...] = ("/v1/", "/api/")
    ) -> None:
        self.app = app
        self.max_bytes = limits.body_bytes
        self.history_max_bytes = limits.history_bytes
        self.history_prefixes = history_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.history_max_bytes if scope["path"].startswith(self.history_prefixes) else self.max_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    await _too_large(scope, receive, send, limit)
                    return
                break
        received = 0
        started = False
        rejected = False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Answer 413 here: the app may turn the exception into an answer of its
                    # own (FastAPI makes any body-reading error a 400), which is then dropped.
                    if not started and not rejected:
                        rejected = True
                        await _too_large(scope, receive, send, limit)
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            pass


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    """413 in the error shape of the API the path belongs to."""
    refused = ChatError("too_large", f"request body larger than {limit} bytes")
    await error_response(refused, shape_of(scope["path"]))(scope, receive, send)
