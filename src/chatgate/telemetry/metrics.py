"""Prometheus metrics: a generation observer (:mod:`chatgate.chat.lifecycle`) rather than
calls from the chat core, served at ``/metrics``; the same measurements also go out over
OTLP (:mod:`.otel_metrics`) when the ``OTEL_*`` variables ask for it.

One process keeps a registry of each gateway's own, so gateways sharing a process (the
test suite's) never add to each other's counts. Under ``chatgate serve --workers N`` the
supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` (:mod:`chatgate.serve`): every worker writes
its values to files there and ``/metrics`` on any worker sums them all, except the
circuit breaker's state, which is the answering worker's own.

Labels are bounded: ``model`` (a client may name any) takes at most :data:`MAX_MODELS`
values per process, and later ones count as ``other``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from chatgate.chat.breaker import BREAKER_STATES
from chatgate.chat.events import DoneEvent, ErrorEvent
from chatgate.chat.generation import Generation
from chatgate.chat.lifecycle import GenerationObserver
from chatgate.providers.base import (
    ModelNotFound,
    ProviderError,
    ProviderHTTPError,
    ProviderStreamError,
    ProviderTimeout,
    ProviderUnavailable,
    Unsupported,
)

if TYPE_CHECKING:
    from chatgate.telemetry.otel_metrics import OtelMetrics

#: Set by the supervisor of several workers: where they keep their values.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Distinct ``model`` label values per process; beyond, ``other``.
MAX_MODELS = 64
OTHER = "other"
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
GAP_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
OVERHEAD_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
STORE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
HTTP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def error_kind(exc: BaseException | None) -> str:
    """The ``kind`` label of an upstream failure, from its class in the error tree."""
    if isinstance(exc, ProviderUnavailable):
        return "unavailable"
    if isinstance(exc, ProviderTimeout):
        return "timeout"
    if isinstance(exc, ModelNotFound):
        return "not_found"
    if isinstance(exc, ProviderHTTPError):
        return "http_5xx" if exc.status >= 500 else "http_4xx"
    if isinstance(exc, ProviderStreamError):
        return "stream_error"
    if isinstance(exc, Unsupported):
        return "unsupported"
    return "other"


class Metrics(GenerationObserver):
    """One gateway's metrics: the generation hooks, plus what the HTTP middleware
    (:mod:`.http_metrics`), the store wrapper (:class:`TimedStore`) and the WebSocket
    endpoint report. ``registry`` is what ``/metrics`` serves."""

    def __init__(
        self, provider: str, *, multiprocess_dir: str | None = None, otel: OtelMetrics | None = None
    ) -> None:
        #: The ``provider`` label: a gateway streams from one provider.
        self.provider = provider
        if multiprocess_dir is None:
            multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self.multiprocess_dir = multiprocess_dir
        #: Also recorded over OTLP when set; never touched when not.
        self.otel = otel
        own = CollectorRegistry(auto_describe=True)
        if multiprocess_dir is None:
            self.registry = own
        else:
            from prometheus_client import multiprocess

            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
        r = own
        self._requests = Counter(
            "chatgate_http_requests_total", "HTTP requests and WebSocket handshakes by route template",
            ["route", "method", "status"], registry=r,
        )
        self._request_seconds = Histogram(
            "chatgate_http_request_duration_seconds", "Time to answer an HTTP request (WebSockets: the handshake)",
            ["route", "method"], buckets=HTTP_BUCKETS_S, registry=r,
        )
        self._websockets = Gauge(
            "chatgate_websocket_connections", "Open WebSocket connections", registry=r,
            multiprocess_mode="livesum",
        )
        self._running = Gauge(
            "chatgate_generations_running", "Generations streaming now", registry=r, multiprocess_mode="livesum"
        )
        self._generations = Counter(
            "chatgate_generations_total", "Generations by provider and outcome", ["provider", "outcome"],
            registry=r,
        )
        self._tokens = Counter(
            "chatgate_tokens_total", "Tokens by direction: the upstream's usage, else the deltas streamed",
            ["provider", "model", "direction"], registry=r,
        )
        self._ttft = Histogram(
            "chatgate_time_to_first_token_seconds", "Time from streaming start to the first token",
            ["provider", "model"], buckets=TTFT_BUCKETS_S, registry=r,
        )
        self._gap = Histogram(
            "chatgate_inter_token_seconds", "Mean gap between tokens after the first, one per answer",
            ["provider", "model"], buckets=GAP_BUCKETS_S, registry=r,
        )
        self._overhead = Histogram(
            "chatgate_gateway_overhead_seconds",
            "The gateway's own time before the first token, beyond the upstream's",
            buckets=OVERHEAD_BUCKETS_S, registry=r,
        )
        self._errors = Counter(
            "chatgate_upstream_errors_total", "Failed upstream attempts by kind", ["provider", "kind"], registry=r
        )
        self._retries = Counter(
            "chatgate_upstream_retries_total", "Upstream attempts tried again", ["provider"], registry=r
        )
        self._fallbacks = Counter(
            "chatgate_upstream_fallbacks_total", "Fallback models tried", ["provider", "model"], registry=r
        )
        self._store_seconds = Histogram(
            "chatgate_store_operation_seconds", "Conversation store calls", ["store", "operation"],
            buckets=STORE_BUCKETS_S, registry=r,
        )
        self._embeddings = Counter(
            "chatgate_embeddings_total", "Embeddings requests by provider and outcome", ["provider", "outcome"],
            registry=r,
        )
        self._models: set[str] = set()
        # Series looked up once: ``labels()`` takes a lock and builds a key on every call.
        self._series: dict[tuple[str, ...], Any] = {}

    def _child(self, family: Any, *labels: str) -> Any:
        key = (family._name, *labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = family.labels(*labels) if labels else family
        return series

    def model_label(self, model: str) -> str:
        """``model``, or ``other`` once :data:`MAX_MODELS` others have been seen."""
        if model in self._models:
            return model
        if len(self._models) >= MAX_MODELS:
            return OTHER
        self._models.add(model)
        return model

    # Generations ----------------------------------------------------------------------

    def started(self, generation: Generation) -> None:
        self._running.inc()
        if self.otel is not None:
            self.otel.running.add(1)

    def first_token(self, generation: Generation, ttft_s: float) -> None:
        model = self.model_label(generation.model)
        self._child(self._ttft, self.provider, model).observe(ttft_s)
        overhead = None
        if generation.upstream_at is not None and generation.first_chunk_at is not None:
            upstream = generation.first_chunk_at - generation.upstream_at
            overhead = max(0.0, time.monotonic() - generation.accepted_at - upstream)
            self._overhead.observe(overhead)
        if self.otel is not None:
            self.otel.first_token(self.provider, model, ttft_s, overhead)

    def finished(self, generation: Generation, done: DoneEvent) -> None:
        model = self.model_label(generation.model)
        timings = done["timings"]
        gap = None
        if generation.tokens > 1 and timings["ttft_ms"] is not None:
            # From the first token to the end, spread over the gaps: no per-token work.
            gap = (timings["total_ms"] - timings["ttft_ms"]) / 1000 / (generation.tokens - 1)
            self._child(self._gap, self.provider, model).observe(gap)
        self._ended(done["finish_reason"], model, done["usage"]["prompt_tokens"], done["usage"]["completion_tokens"])
        if self.otel is not None and gap is not None:
            self.otel.gap.record(gap, {"provider": self.provider, "model": model})

    def cancelled(self, generation: Generation, done: DoneEvent) -> None:
        model = self.model_label(generation.model)
        self._ended("cancelled", model, done["usage"]["prompt_tokens"], done["usage"]["completion_tokens"])

    def failed(self, generation: Generation, error: ErrorEvent, exc: BaseException | None) -> None:
        model = self.model_label(generation.model)
        if isinstance(exc, ProviderError):  # the last attempt, told neither as retried nor fell_back
            self._upstream_error(exc)
        # No usage in an error: the tokens streamed before it are what was answered.
        self._ended("error", model, 0, generation.tokens)

    def _ended(self, outcome: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self._running.dec()
        self._child(self._generations, self.provider, outcome).inc()
        if prompt_tokens:
            self._child(self._tokens, self.provider, model, "input").inc(prompt_tokens)
        if completion_tokens:
            self._child(self._tokens, self.provider, model, "output").inc(completion_tokens)
        if self.otel is not None:
            self.otel.ended(self.provider, model, outcome, prompt_tokens, completion_tokens)

    def retried(self, generation: Generation, model: str, attempt: int, exc: ProviderError) -> None:
        self._upstream_error(exc)
        self._child(self._retries, self.provider).inc()
        if self.otel is not None:
            self.otel.retries.add(1, {"provider": self.provider})

    def fell_back(self, generation: Generation, failed: str, model: str, exc: ProviderError) -> None:
        self._upstream_error(exc)
        label = self.model_label(model)
        self._child(self._fallbacks, self.provider, label).inc()
        if self.otel is not None:
            self.otel.fallbacks.add(1, {"provider": self.provider, "model": label})

    def _upstream_error(self, exc: ProviderError) -> None:
        kind = error_kind(exc)
        self._child(self._errors, self.provider, kind).inc()
        if self.otel is not None:
            self.otel.errors.add(1, {"provider": self.provider, "kind": kind})

    def embedded(self, outcome: str) -> None:
        self._child(self._embeddings, self.provider, outcome).inc()
        if self.otel is not None:
            self.otel.embeddings.add(1, {"provider": self.provider, "outcome": outcome})

    # The rest of the gateway ------------------------------------------------------------

    def websocket_opened(self) -> None:
        self._websockets.inc()
        if self.otel is not None:
            self.otel.websockets.add(1)

    def websocket_closed(self) -> None:
        self._websockets.dec()
        if self.otel is not None:
            self.otel.websockets.add(-1)

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        """An HTTP request was answered (or a WebSocket handshake), in ``seconds``."""
        self._child(self._requests, route, method, str(status)).inc()
        self._child(self._request_seconds, route, method).observe(seconds)
        if self.otel is not None:
            self.otel.request_done(route, method, status, seconds)

    def store_operation(self, store: str, operation: str, seconds: float) -> None:
        self._child(self._store_seconds, store, operation).observe(seconds)
        if self.otel is not None:
            self.otel.store.record(seconds, {"store": store, "operation": operation})

    def watch_breaker(self, state: Callable[[], str]) -> None:
        """Report the upstream's circuit breaker, read when scraped, as
        ``chatgate_upstream_breaker_state{provider, state}``: 1 for its state, 0 for the others.
        Under several workers, the state of the worker that answers the scrape."""
        self.registry.register(_BreakerCollector(self.provider, state))
        if self.otel is not None:
            self.otel.watch_breaker(self.provider, state)

    async def aclose(self) -> None:
        """Send what OTLP has not sent yet, and stop."""
        if self.otel is not None:
            await self.otel.aclose()


class _BreakerCollector:
    def __init__(self, provider: str, state: Callable[[], str]) -> None:
        self.provider = provider
        self.state = state

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "chatgate_upstream_breaker_state", "The upstream's circuit breaker: 1 for its state",
            labels=["provider", "state"],
        )
        current = self.state()
        for name in BREAKER_STATES:
            gauge.add_metric([self.provider, name], 1.0 if name == current else 0.0)
        yield gauge
