"""Request size limits, enforced before a body is parsed."""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Answer 413 to HTTP bodies over the limit (declared or streamed).

    Routes under ``history_prefixes`` carry the client's whole conversation in each body
    (the OpenAI and Ollama APIs), so they get ``history_max_bytes``; each message in them
    is still held to the message limit by the route.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        *,
        history_max_bytes: int | None = None,
        history_prefixes: tuple[str, ...] = ("/v1/", "/api/"),
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.history_max_bytes = history_max_bytes or max_bytes
        self.history_prefixes = history_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.history_max_bytes if scope["path"].startswith(self.history_prefixes) else self.max_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    await _too_large(send, limit)
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
                        await _too_large(send, limit)
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


async def _too_large(send: Send, limit: int) -> None:
    body = orjson.dumps({"detail": f"request body larger than {limit} bytes", "code": "too_large"})
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
