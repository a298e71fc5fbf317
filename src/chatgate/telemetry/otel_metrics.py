"""The Prometheus measurements (:mod:`.metrics`) also sent over OTLP, through the
OpenTelemetry metrics SDK, when :func:`chatgate.telemetry.otel.export_for` says so.

Instruments are named like the Prometheus families, dotted and without the unit
(``chatgate_time_to_first_token_seconds`` is ``chatgate.time_to_first_token``, in ``s``),
with the same attributes. Each gateway has a meter provider of its own (not the global
one), read every ``OTEL_METRIC_EXPORT_INTERVAL`` ms and flushed when the gateway closes.
This module and the SDK are imported only when the export is on.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource

from chatgate import __version__
from chatgate.chat.breaker import BREAKER_STATES
from chatgate.telemetry.otel import Export

SERVICE = "chatgate"


def exporter_for(export: Export) -> MetricExporter:
    """The OTLP metric exporter of ``export``'s protocol; endpoint, headers and timeout
    come from the standard variables, read by the exporter."""
    if export.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as Grpc,
        )

        return Grpc()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as Http

    return Http()


class OtelMetrics:
    """The instruments :class:`~chatgate.telemetry.metrics.Metrics` also records into."""

    def __init__(self, export: Export, *, exporter: MetricExporter | None = None) -> None:
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the default name.
        # Each process its own instance: several workers' points are kept apart, not mixed.
        own = Resource({SERVICE_NAME: SERVICE, SERVICE_INSTANCE_ID: uuid.uuid4().hex})
        resource = own.merge(Resource.create())
        if resource.attributes.get(SERVICE_NAME) == "unknown_service":
            resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
        self.reader = PeriodicExportingMetricReader(exporter or exporter_for(export))
        self.provider = MeterProvider(metric_readers=[self.reader], resource=resource)
        meter = self.provider.get_meter("chatgate", __version__)
        seconds = "s"
        self.requests = meter.create_counter("chatgate.http.requests", "{request}", "HTTP requests and handshakes")
        self.request_duration = meter.create_histogram(
            "chatgate.http.request.duration", seconds, "Time to answer an HTTP request",
            explicit_bucket_boundaries_advisory=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60),
        )
        self.websockets = meter.create_up_down_counter(
            "chatgate.websocket.connections", "{connection}", "Open WebSocket connections"
        )
        self.running = meter.create_up_down_counter(
            "chatgate.generations.running", "{generation}", "Generations streaming now"
        )
        self.generations = meter.create_counter("chatgate.generations", "{generation}", "Generations by outcome")
        self.tokens = meter.create_counter("chatgate.tokens", "{token}", "Tokens by direction")
        self.ttft = meter.create_histogram(
            "chatgate.time_to_first_token", seconds, "Time from streaming start to the first token",
            explicit_bucket_boundaries_advisory=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.gap = meter.create_histogram(
            "chatgate.inter_token", seconds, "Mean gap between tokens after the first, one per answer",
            explicit_bucket_boundaries_advisory=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        self.overhead = meter.create_histogram(
            "chatgate.gateway_overhead", seconds, "The gateway's own time before the first token",
            explicit_bucket_boundaries_advisory=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1),
        )
        self.errors = meter.create_counter("chatgate.upstream.errors", "{attempt}", "Failed upstream attempts")
        self.retries = meter.create_counter("chatgate.upstream.retries", "{attempt}", "Upstream attempts tried again")
        self.fallbacks = meter.create_counter("chatgate.upstream.fallbacks", "{model}", "Fallback models tried")
        self.store = meter.create_histogram(
            "chatgate.store.operation.duration", seconds, "Conversation store calls",
            explicit_bucket_boundaries_advisory=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 1),
        )
        self.embeddings = meter.create_counter("chatgate.embeddings", "{request}", "Embeddings requests")
        self._meter = meter

    def first_token(self, provider: str, model: str, ttft_s: float, overhead_s: float | None) -> None:
        self.ttft.record(ttft_s, {"provider": provider, "model": model})
        if overhead_s is not None:
            self.overhead.record(overhead_s)

    def ended(self, provider: str, model: str, outcome: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.running.add(-1)
        self.generations.add(1, {"provider": provider, "outcome": outcome})
        if prompt_tokens:
            self.tokens.add(prompt_tokens, {"provider": provider, "model": model, "direction": "input"})
        if completion_tokens:
            self.tokens.add(completion_tokens, {"provider": provider, "model": model, "direction": "output"})

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.add(1, {"route": route, "method": method, "status": str(status)})
        self.request_duration.record(seconds, {"route": route, "method": method})

    def watch_breaker(self, provider: str, state: Callable[[], str]) -> None:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            current = state()
            return [
                Observation(1 if name == current else 0, {"provider": provider, "state": name})
                for name in BREAKER_STATES
            ]

        self._meter.create_observable_gauge(
            "chatgate.upstream.breaker_state", [observe], "1", "The upstream's circuit breaker: 1 for its state"
        )

    async def aclose(self) -> None:
        """Export what is left and stop (in a thread: the export is a blocking request)."""
        await asyncio.to_thread(self.provider.shutdown)
