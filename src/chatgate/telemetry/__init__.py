"""What the gateway shows of itself: logs (:mod:`.logs`), Prometheus metrics
(:mod:`.metrics`), OpenTelemetry traces and metrics (:mod:`.tracing`, :mod:`.otel`),
Datadog LLM Observability (:mod:`.datadog`) and the per-turn log line (:mod:`.turns`);
each watches generations from outside the chat core through :mod:`chatgate.chat.lifecycle`."""
