"""HTTP routes: health, agents, ``POST /chat`` (the Pi Agent contract), conversations,
metrics and the web page."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from chatgate import observability as obs
from chatgate.chat.events import ChatError, Event
from chatgate.chat.generation import Generation
from chatgate.chat.service import Turn
from chatgate.providers.base import ProviderError

if TYPE_CHECKING:
    from chatgate.gateway import Gateway

router = APIRouter()
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
STATUS_OF_ERROR = {"not_found": 502, "provider_unavailable": 502, "provider_error": 502, "timeout": 502}


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


class ChatBody(BaseModel):
    message: str = Field(min_length=1, max_length=4000)
    agent: str = Field(default="general", max_length=128)
    stream: bool = False
    conversation_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._~-]{1,128}$")


class ChatReply(BaseModel):
    reply: str
    conversation_id: str | None = None
    model: str | None = None
    provider: str | None = None


class ErrorBody(BaseModel):
    detail: str
    code: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 429, 502)
}


def install_error_handlers(app: FastAPI) -> None:
    async def chat_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ChatError)
        headers = None
        if exc.retry_after is not None:
            headers = {"Retry-After": str(math.ceil(exc.retry_after))}
        return ORJSONResponse(
            {"detail": exc.message, "code": exc.code}, status_code=exc.status, headers=headers
        )

    app.add_exception_handler(ChatError, chat_error)


async def _cancel_on_disconnect(receive: Receive, generation: Generation) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


async def _first_outcome(events: AsyncIterator[Event]) -> Event:
    """Skip to the first delta, done or error: until then, failures are still HTTP errors."""
    async for event in events:
        if event["type"] != "start":
            return event
    raise RuntimeError("generation ended without a terminal event")  # pragma: no cover


def _error_response(event: Event, conversation_id: str) -> ORJSONResponse:
    assert event["type"] == "error"
    status = STATUS_OF_ERROR.get(event["code"], 500)
    return ORJSONResponse(
        {"detail": event["message"], "code": event["code"]},
        status_code=status,
        headers={"X-Conversation-Id": conversation_id},
    )


class GenerationStream(Response):
    """Streams a generation's events, encoded by ``encode``; a client that goes away
    cancels the generation (its partial answer is stored by the chat service)."""

    def __init__(
        self,
        generation: Generation,
        events: AsyncIterator[Event],
        leading: list[Event],
        encode: Callable[[Event], bytes],
        media_type: str,
    ) -> None:
        # No body is set, so no Content-Length: the answer goes out chunked.
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(
            {
                "X-Conversation-Id": generation.conversation_id,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        self.generation = generation
        self.events = events
        self.leading = leading
        self.encode = encode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, self.generation))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            for event in self.leading:
                body = self.encode(event)
                if body:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            async for event in self.events:
                body = self.encode(event)
                if body:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            self.generation.cancel()
        finally:
            watcher.cancel()


def encode_text(event: Event) -> bytes:
    return event["text"].encode() if event["type"] == "delta" else b""


def encode_sse(event: Event) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


@router.post(
    "/chat",
    response_model=ChatReply,
    responses={**ERRORS, 200: {"content": {"text/plain": {}, "text/event-stream": {}}}},
)
async def chat(body: ChatBody, request: Request) -> Response:
    gateway = gateway_of(request)
    turn = Turn(
        message=body.message,
        conversation_id=body.conversation_id,
        agent=body.agent,
        owner=gateway.auth.identify(request),
        client=request.client.host if request.client else None,
    )
    generation = await gateway.service.start(turn)
    events = generation.events()
    sse = "text/event-stream" in request.headers.get("accept", "")
    if body.stream or sse:
        watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, generation))
        try:
            first = await _first_outcome(events)
        finally:
            watcher.cancel()
        if first["type"] == "error":
            return _error_response(first, generation.conversation_id)
        if sse:
            # Sent only now, the start event can name the model that answered (a fallback).
            leading: list[Event] = [generation.start_event(), first]
            return GenerationStream(generation, events, leading, encode_sse, "text/event-stream")
        return GenerationStream(generation, events, [first], encode_text, "text/plain; charset=utf-8")

    watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, generation))
    try:
        async for event in events:
            if event["type"] == "error":
                return _error_response(event, generation.conversation_id)
    finally:
        watcher.cancel()
    reply = ChatReply(
        reply=generation.text,
        conversation_id=generation.conversation_id,
        model=generation.model,
        provider=gateway.provider.name,
    )
    return ORJSONResponse(reply.model_dump(), headers={"X-Conversation-Id": generation.conversation_id})


async def _check(probe: Any, limit_s: float) -> dict[str, Any]:
    try:
        async with asyncio.timeout(limit_s):
            detail = await probe()
    except (ProviderError, TimeoutError, OSError, ConnectionError) as exc:
        return {"status": "down", "detail": getattr(exc, "message", None) or type(exc).__name__}
    except Exception as exc:
        return {"status": "down", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    return {"status": "ok", "detail": detail or "ok"}


async def _health(request: Request) -> tuple[bool, dict[str, Any]]:
    gateway = gateway_of(request)

    async def store_ping() -> str:
        await gateway.store.ping()
        return gateway.store.name

    timeout = gateway.settings.connect_timeout_s
    provider, store = await asyncio.gather(
        _check(gateway.provider.check, timeout), _check(store_ping, timeout)
    )
    provider["name"] = gateway.provider.name
    provider["model"] = gateway.provider.default_model
    healthy = provider["status"] == "ok" and store["status"] == "ok"
    return healthy, {"status": "ok" if healthy else "degraded", "checks": {"provider": provider, "store": store}}


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return (await _health(request))[1]


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    healthy, body = await _health(request)
    return ORJSONResponse(body, status_code=200 if healthy else 503)


@router.get("/agents")
async def agents(request: Request) -> dict[str, Any]:
    registry = gateway_of(request).agents
    return {"agents": registry.names(), "details": registry.details()}


@router.get("/conversations", responses=ERRORS)
async def list_conversations(request: Request) -> dict[str, Any]:
    gateway = gateway_of(request)
    infos = await gateway.service.conversations(gateway.auth.identify(request))
    return {"conversations": [_info(i) for i in infos]}


@router.get("/conversations/{conversation_id}", responses=ERRORS)
async def get_conversation(conversation_id: str, request: Request) -> dict[str, Any]:
    gateway = gateway_of(request)
    conversation = await gateway.service.conversation(gateway.auth.identify(request), conversation_id)
    return {
        **_info(conversation.info),
        "messages": [
            {"role": m.role, "content": m.content, "partial": m.partial, "created_at": m.created_at}
            for m in conversation.messages
        ],
    }


@router.delete("/conversations/{conversation_id}", status_code=204, responses=ERRORS)
async def delete_conversation(conversation_id: str, request: Request) -> Response:
    gateway = gateway_of(request)
    await gateway.service.delete(gateway.auth.identify(request), conversation_id)
    return Response(status_code=204)


def _info(info: Any) -> dict[str, Any]:
    return {
        "id": info.id,
        "agent": info.agent,
        "title": info.title,
        "created_at": info.created_at,
        "updated_at": info.updated_at,
        "message_count": info.message_count,
    }


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(obs.REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8")
