"""OpenTelemetry traces, with the GenAI semantic conventions for the upstream calls.

Only imported when :func:`chatgate.telemetry.otel.export_for` says traces go out; without
it there is no middleware, no observer and no outgoing header, so tracing costs nothing.

Spans:

- ``SERVER`` per HTTP request (:class:`ServerSpans`, around the ASGI app), named by the
  matched route's template and continuing an incoming W3C ``traceparent``;
- ``SERVER`` ``chat turn`` per WebSocket turn, whose parent is the handshake's
  ``traceparent`` (the socket itself has no span: it may live for hours);
- ``CLIENT`` ``chat {model}`` per generation (:class:`GenerationSpans`), the child of
  either, made current in the generation's task so that every upstream request carries
  its ``traceparent``.

Prompt and answer text stay out of spans unless ``CHATGATE_TRACE_CONTENT`` is set.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatgate import __version__
from chatgate.chat.events import DoneEvent, ErrorEvent
from chatgate.chat.generation import Generation
from chatgate.chat.lifecycle import GenerationObserver
from chatgate.providers import _http
from chatgate.providers.base import ProviderError, ProviderRequest
from chatgate.telemetry.otel import Export

log = logging.getLogger("chatgate")
TRACER_NAME = "chatgate"
DEFAULT_SERVICE_NAME = "chatgate"
#: ``gen_ai.provider.name`` where the semantic conventions name a provider otherwise
#: than chatgate's registry does.
SEMCONV_PROVIDER_NAMES = {"gemini": "gcp.gemini", "local": "llama_cpp"}

#: The extracted handshake context of the WebSocket this task serves (set by
#: :class:`ServerSpans`): its turns get a server span each, children of it.
_HANDSHAKE: contextvars.ContextVar[otel_context.Context | None] = contextvars.ContextVar(
    "chatgate_websocket_handshake", default=None
)


@dataclass
class Tracing:
    """The process's tracer provider and the gateway's generation observer."""

    provider: TracerProvider
    observer: GenerationSpans

    def shutdown(self) -> None:
        """Flush what is queued and stop exporting (blocks: run it in a thread)."""
        if _inject_traceparent in _http.OUTGOING_HEADERS:
            _http.OUTGOING_HEADERS.remove(_inject_traceparent)
        self.provider.shutdown()


def start_tracing(export: Export, provider_name: str, *, trace_content: bool) -> Tracing:
    """Export spans as ``export`` says, make the provider global (the server spans use
    it) and have every upstream request carry ``traceparent``."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(_exporter(export)))
    trace.set_tracer_provider(provider)
    if _inject_traceparent not in _http.OUTGOING_HEADERS:
        _http.OUTGOING_HEADERS.append(_inject_traceparent)
    observer = GenerationSpans(
        provider.get_tracer(TRACER_NAME, __version__), provider_name, trace_content=trace_content
    )
    return Tracing(provider, observer)


def _exporter(export: Export) -> SpanExporter:
    """The OTLP exporter of ``export``'s protocol; it reads its endpoint, headers and
    timeout from the standard variables."""
    if export.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter()


def _inject_traceparent(headers: dict[str, str]) -> None:
    propagate.inject(headers)


@dataclass(eq=False)
class _Spans:
    client: Span
    turn: Span | None


class GenerationSpans(GenerationObserver):
    """A ``CLIENT`` span per generation, with the GenAI semantic conventions' attributes."""

    provides_context = True

    def __init__(self, tracer: trace.Tracer, provider_name: str, *, trace_content: bool = False) -> None:
        self._tracer = tracer
        self._provider = SEMCONV_PROVIDER_NAMES.get(provider_name, provider_name)
        self._trace_content = trace_content
        self._spans: dict[Generation, _Spans] = {}

    def task_context(
        self, generation: Generation, request: ProviderRequest, context: contextvars.Context
    ) -> contextvars.Context:
        parent = context.run(otel_context.get_current)
        handshake = context.get(_HANDSHAKE)
        turn = None
        if handshake is not None:
            turn = self._tracer.start_span("chat turn", context=handshake, kind=SpanKind.SERVER)
            turn.set_attribute("chatgate.generation.id", generation.id)
            parent = trace.set_span_in_context(turn, handshake)
        span = self._tracer.start_span(
            f"chat {request.model}", context=parent, kind=SpanKind.CLIENT,
            attributes=self._request_attributes(generation, request),
        )
        self._spans[generation] = _Spans(span, turn)
        generation.trace_id = format(span.get_span_context().trace_id, "032x")
        context.run(otel_context.attach, trace.set_span_in_context(span, parent))
        return context

    def _request_attributes(self, generation: Generation, request: ProviderRequest) -> dict[str, Any]:
        options = request.options
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self._provider,
            "gen_ai.request.model": request.model,
            "gen_ai.conversation.id": generation.conversation_id,
            "chatgate.generation.id": generation.id,
            "chatgate.agent": generation.agent,
        }
        for name, value in (
            ("gen_ai.request.temperature", options.temperature),
            ("gen_ai.request.max_tokens", options.max_tokens),
            ("gen_ai.request.top_p", options.top_p),
            ("gen_ai.request.top_k", options.top_k),
            ("gen_ai.request.seed", options.seed),
            ("gen_ai.request.frequency_penalty", options.frequency_penalty),
            ("gen_ai.request.presence_penalty", options.presence_penalty),
        ):
            if value is not None:
                attributes[name] = value
        if options.stop:
            attributes["gen_ai.request.stop_sequences"] = list(options.stop)
        if self._trace_content:
            attributes["gen_ai.input.messages"] = _json(
                [_semconv_message(message["role"], message["content"]) for message in request.messages]
            )
        return attributes

    def retried(self, generation: Generation, model: str, attempt: int, exc: ProviderError) -> None:
        spans = self._spans.get(generation)
        if spans is not None:
            spans.client.add_event(
                "chatgate.retry",
                {"gen_ai.request.model": model, "chatgate.attempt": attempt, "error.type": type(exc).__name__},
            )

    def fell_back(self, generation: Generation, failed: str, model: str, exc: ProviderError) -> None:
        spans = self._spans.get(generation)
        if spans is not None:
            spans.client.add_event(
                "chatgate.fallback",
                {"chatgate.fallback.from": failed, "chatgate.fallback.to": model, "error.type": type(exc).__name__},
            )

    def first_token(self, generation: Generation, ttft_s: float) -> None:
        spans = self._spans.get(generation)
        if spans is None:
            return
        attributes: dict[str, Any] = {"chatgate.time_to_first_token_ms": round(ttft_s * 1000, 3)}
        if generation.first_chunk_at is not None and generation.upstream_at is not None:
            to_first_chunk = generation.first_chunk_at - generation.upstream_at
            attributes["chatgate.time_to_first_chunk_ms"] = round(to_first_chunk * 1000, 3)
            attributes["gen_ai.response.time_to_first_chunk"] = to_first_chunk
        if generation.upstream_at is not None:
            attributes["chatgate.queue_ms"] = round((generation.upstream_at - generation.accepted_at) * 1000, 3)
        spans.client.set_attributes(attributes)
        spans.client.add_event("gen_ai.first_chunk")

    def finished(self, generation: Generation, done: DoneEvent) -> None:
        self._end(generation, "ok", done)

    def cancelled(self, generation: Generation, done: DoneEvent) -> None:
        self._end(generation, "cancelled", done)

    def failed(self, generation: Generation, error: ErrorEvent, exc: BaseException | None) -> None:
        spans = self._spans.get(generation)
        if spans is not None:
            error_type = type(exc).__name__ if exc is not None else error.get("code", "internal")
            spans.client.set_attribute("error.type", error_type)
            spans.client.set_attribute("chatgate.error.code", error.get("code", "internal"))
            spans.client.set_status(Status(StatusCode.ERROR, error.get("code")))
            if spans.turn is not None:
                spans.turn.set_attribute("error.type", error_type)
                spans.turn.set_status(Status(StatusCode.ERROR, error.get("code")))
        self._end(generation, "error", None)

    def _end(self, generation: Generation, outcome: str, done: DoneEvent | None) -> None:
        spans = self._spans.pop(generation, None)
        if spans is None:
            return
        span = spans.client
        span.set_attribute("chatgate.outcome", outcome)
        span.set_attribute("gen_ai.response.model", generation.model)
        if done is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [done["finish_reason"]])
            usage = done["usage"]
            if usage["prompt_tokens"]:  # 0: the upstream did not say
                span.set_attribute("gen_ai.usage.input_tokens", usage["prompt_tokens"])
            span.set_attribute("gen_ai.usage.output_tokens", usage["completion_tokens"])
        if self._trace_content and (generation.text or generation.tool_calls):
            message = _semconv_message("assistant", generation.text, generation.tool_calls)
            if done is not None:
                message["finish_reason"] = done["finish_reason"]
            span.set_attribute("gen_ai.output.messages", _json([message]))
        span.end()
        if spans.turn is not None:
            spans.turn.set_attribute("chatgate.outcome", outcome)
            spans.turn.end()


def _semconv_message(role: str, content: str, tool_calls: Any = ()) -> dict[str, Any]:
    """A message as the GenAI conventions' ``gen_ai.*.messages`` list it: a role and parts."""
    parts: list[dict[str, Any]] = [{"type": "text", "content": content}] if content else []
    for call in tool_calls:
        parts.append({"type": "tool_call", "id": call["id"], "name": call["name"], "arguments": call["arguments"]})
    return {"role": role, "parts": parts}


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


class ServerSpans:
    """Server spans for the app: HTTP requests through OpenTelemetry's ASGI middleware
    (without its per-message spans), named by route template once routing has matched;
    WebSockets only noted, so that each turn's span continues the handshake's trace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._http = OpenTelemetryMiddleware(
            _NameByRoute(app),
            default_span_details=_method_only,
            exclude_spans=["receive", "send"],
            meter_provider=NoOpMeterProvider(),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            token = _HANDSHAKE.set(propagate.extract(_headers(scope)))
            try:
                await self.app(scope, receive, send)
            finally:
                _HANDSHAKE.reset(token)
        else:
            await self.app(scope, receive, send)


def _method_only(scope: Scope) -> tuple[str, dict[str, Any]]:
    """The name until a route matches: never the raw path, which a client makes up."""
    return str(scope.get("method") or "HTTP"), {}


def _headers(scope: Scope) -> Mapping[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", ())}


class _NameByRoute:
    """Names the server span ``METHOD /route/{template}`` as the response starts: FastAPI
    has routed the request by then (it notes the route in the scope), and the span may
    end with the last body message, before the app returns."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        span = trace.get_current_span()

        async def naming_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None)
                if isinstance(route, str):
                    span.update_name(f"{scope.get('method', 'HTTP')} {route}")
                    span.set_attribute("http.route", route)
            await send(message)

        await self.app(scope, receive, naming_send)
