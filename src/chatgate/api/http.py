"""HTTP routes: health, agents, ``POST /chat`` (the Pi Agent contract), conversations,
metrics and the web page."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, StrictBool, model_validator

from chatgate import __version__
from chatgate.api.auth import authenticated, caller, ticket_for
from chatgate.api.errors import UPSTREAM_FAILURE, ORJSONResponse, RequestError, error_response
from chatgate.api.responses import GenerationResponse, first_outcome, run_to_end
from chatgate.api.tooling import parse_response_format, parse_tool_results, parse_tools
from chatgate.chat.events import ChatError, ErrorEvent, Event
from chatgate.chat.service import Turn
from chatgate.providers.base import ProviderError

if TYPE_CHECKING:
    from chatgate.gateway import Gateway

router = APIRouter()
WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


class ToolResultBody(BaseModel):
    tool_call_id: str = Field(min_length=1, max_length=256)
    content: Any = None
    name: str | None = None


class ChatBody(BaseModel):
    """A user's ``message``, or ``tool_results`` answering the calls of the conversation's
    last answer; ``tools``, ``tool_choice``, ``parallel_tool_calls`` and
    ``response_format`` as in OpenAI's chat completions."""

    message: str | None = Field(default=None, min_length=1, max_length=4000)
    agent: str = Field(default="general", max_length=128)
    # A JSON boolean only: 0.0 or "yes" is a client bug worth a 422, not a guess.
    stream: StrictBool = False
    conversation_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._~-]{1,128}$")
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    tool_results: list[ToolResultBody] | None = Field(default=None, min_length=1)
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> ChatBody:
        if (self.message is None) == (self.tool_results is None):
            raise ValueError("send either message or tool_results")
        return self


class ToolCallBody(BaseModel):
    id: str
    name: str
    arguments: str


class ChatReply(BaseModel):
    reply: str
    conversation_id: str | None = None
    model: str | None = None
    provider: str | None = None
    finish_reason: str | None = None
    tool_calls: list[ToolCallBody] | None = None


class ErrorBody(BaseModel):
    detail: str
    code: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 429, 502)
}


def _upstream_failure(event: ErrorEvent, conversation_id: str) -> Response:
    """A generation that failed before its first token: 502, as the Pi Agent contract says."""
    return error_response(
        ChatError(event["code"], event["message"], retryable=event.get("retryable", False)),
        "native",
        status=UPSTREAM_FAILURE,
        headers={"X-Conversation-Id": conversation_id},
    )


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
    tools = parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    sse = "text/event-stream" in request.headers.get("accept", "")
    if tools is not None and body.stream and not sse:
        raise RequestError(
            "a plain-text stream cannot carry tool calls: ask for Server-Sent Events "
            "(Accept: text/event-stream) or the JSON answer",
            param="stream",
        )
    results = (
        parse_tool_results([r.model_dump(exclude_none=True) for r in body.tool_results])
        if body.tool_results else None
    )
    turn = Turn(
        message=body.message or "",
        conversation_id=body.conversation_id,
        agent=body.agent,
        owner=caller(request),
        client=request.client.host if request.client else None,
        tool_results=results,
        tools=tools,
        output=parse_response_format(body.response_format),
    )
    generation = await gateway.service.start(turn)
    headers = {"X-Conversation-Id": generation.conversation_id}
    if body.stream or sse:
        index, first = await first_outcome(request.receive, generation)
        if first["type"] == "error":
            return _upstream_failure(first, generation.conversation_id)
        if sse:
            # Sent only now, the start event can name the model that answered (a fallback).
            leading: list[Event] = [generation.start_event(), first]
            return GenerationResponse(
                generation, encode_sse, "text/event-stream", leading=leading, index=index, headers=headers
            )
        return GenerationResponse(
            generation, encode_text, "text/plain; charset=utf-8", leading=[first], index=index, headers=headers
        )

    end = await run_to_end(request.receive, generation)
    if end["type"] == "error":
        return _upstream_failure(end, generation.conversation_id)
    reply: dict[str, Any] = {
        "reply": generation.text,
        "conversation_id": generation.conversation_id,
        "model": generation.model,
        "provider": gateway.provider.name,
    }
    if end.get("tool_calls"):  # only then: the Pi Agent contract's reply has four fields
        reply["finish_reason"] = end["finish_reason"]
        reply["tool_calls"] = end["tool_calls"]
    return ORJSONResponse(reply, headers=headers)


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
    provider["breaker"] = gateway.service.breaker.state
    healthy = provider["status"] == "ok" and store["status"] == "ok"
    status = "ok" if healthy else "degraded"
    if gateway.draining:  # shutting down: a load balancer should send nothing new here
        healthy, status = False, "draining"
    return healthy, {"status": status, "version": __version__, "checks": {"provider": provider, "store": store}}


@router.get("/health", responses={503: {"description": "the gateway is draining: shutting down"}})
async def health(request: Request, response: Response) -> dict[str, Any]:
    """200 while serving, also when degraded (the checks say what is down); 503 during
    the drain on shutdown."""
    body = (await _health(request))[1]
    if body["status"] == "draining":
        response.status_code = 503
    return body


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    """Open to orchestrators when keys are on; then only the statuses, no details."""
    healthy, body = await _health(request)
    if not authenticated(request):
        body = {
            "status": body["status"],
            "checks": {name: {"status": check["status"]} for name, check in body["checks"].items()},
        }
    return ORJSONResponse(body, status_code=200 if healthy else 503)


@router.post("/auth/ticket", responses=ERRORS)
async def ticket(request: Request) -> Response:
    """A single-use ticket, valid for ``expires_in`` seconds, for a browser's WebSocket
    (``?ticket=``), which cannot send the key in a header (:mod:`chatgate.api.tickets`)."""
    return ORJSONResponse(ticket_for(request), headers={"Cache-Control": "no-store"})


@router.get("/agents")
async def agents(request: Request) -> dict[str, Any]:
    registry = gateway_of(request).agents
    return {"agents": registry.names(), "details": registry.details()}


@router.get("/conversations", responses=ERRORS)
async def list_conversations(request: Request) -> dict[str, Any]:
    gateway = gateway_of(request)
    infos = await gateway.service.conversations(caller(request))
    return {"conversations": [_info(i) for i in infos]}


@router.get("/conversations/{conversation_id}", responses=ERRORS)
async def get_conversation(conversation_id: str, request: Request) -> dict[str, Any]:
    gateway = gateway_of(request)
    conversation = await gateway.service.conversation(caller(request), conversation_id)
    return {
        **_info(conversation.info),
        "messages": [
            {
                "role": m.role, "content": m.content, "partial": m.partial, "created_at": m.created_at,
                **(m.tools_json() or {}),
            }
            for m in conversation.messages
        ],
    }


@router.delete("/conversations/{conversation_id}", status_code=204, responses=ERRORS)
async def delete_conversation(conversation_id: str, request: Request) -> Response:
    gateway = gateway_of(request)
    await gateway.service.delete(caller(request), conversation_id)
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
async def metrics(request: Request) -> Response:
    return Response(generate_latest(gateway_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


#: The page runs only its own files: no inline script, nothing from another origin; its
#: WebSocket goes back to the same host ('self' covers ws:/wss: there in current browsers).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
#: The page's own files change with chatgate and are revalidated each time; the vendored
#: ones change only with their pinned versions.
_REVALIDATE = "no-cache"
_VENDOR_CACHE = "public, max-age=604800"
ASSET_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".map": "application/json",
    ".json": "application/json",
    ".md": "text/markdown; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}


def _web_file(relative: str) -> Path | None:
    """``relative`` inside the web directory, or ``None``: nothing outside it, whether by
    ``..``, an absolute path or a symbolic link, and only the types the page uses."""
    parts = relative.split("/")
    if not relative or "\\" in relative or "\0" in relative or any(p in ("", ".", "..") for p in parts):
        return None
    path = (WEB_DIR / relative).resolve()
    if not path.is_relative_to(WEB_DIR) or path.suffix not in ASSET_TYPES or not path.is_file():
        return None
    return path


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(
        WEB_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={**PAGE_HEADERS, "Cache-Control": _REVALIDATE},
    )


@router.get("/assets/{relative:path}", include_in_schema=False)
async def asset(relative: str) -> Response:
    """The page's scripts, styles and images, and the vendored libraries under ``vendor/``."""
    path = _web_file(relative)
    if path is None:
        return error_response(ChatError("not_found", "no such asset"), "native", headers=PAGE_HEADERS)
    cache = _VENDOR_CACHE if relative.startswith("vendor/") else _REVALIDATE
    return FileResponse(path, media_type=ASSET_TYPES[path.suffix], headers={**PAGE_HEADERS, "Cache-Control": cache})


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    return FileResponse(
        WEB_DIR / "favicon.svg", media_type="image/svg+xml", headers={**PAGE_HEADERS, "Cache-Control": _REVALIDATE}
    )
