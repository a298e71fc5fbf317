"""Which OpenTelemetry exporters the standard ``OTEL_*`` variables ask for.

chatgate exports nothing unless told to, whatever the SDK's own defaults: traces go out
when ``OTEL_TRACES_EXPORTER=otlp``, or when it is unset and an OTLP endpoint is
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); metrics
likewise with ``OTEL_METRICS_EXPORTER`` and ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``.
``OTEL_SDK_DISABLED=true`` turns both off. The protocol is
``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_PROTOCOL`` or ``OTEL_EXPORTER_OTLP_PROTOCOL``:
``http/protobuf`` (the default) or ``grpc``. Endpoints, headers, timeouts and the
service's resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``) are read by the
SDK and its exporters themselves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from chatgate.config import ConfigError

Signal = Literal["traces", "metrics"]
PROTOCOLS = ("http/protobuf", "grpc")


class OtelConfigError(ConfigError):
    """An ``OTEL_*`` value chatgate cannot act on, named in the message (start-up says it in
    one line, as for any setting)."""


@dataclass(frozen=True, slots=True)
class Export:
    """One signal's export: its OTLP ``protocol``."""

    signal: Signal
    protocol: str


def export_for(signal: Signal, environ: Mapping[str, str] | None = None) -> Export | None:
    """The export ``signal`` is configured for, or None when it is off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    upper = signal.upper()
    exporter = env.get(f"OTEL_{upper}_EXPORTER", "").strip().lower()
    endpoint = env.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter in ("", "otlp"):
        if not exporter and not endpoint:
            return None
    elif exporter == "none":
        return None
    else:
        raise OtelConfigError(
            f"OTEL_{upper}_EXPORTER={exporter}: chatgate exports {signal} over OTLP only (otlp or none)"
        )
    protocol = (
        env.get(f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    ).strip().lower()
    if protocol not in PROTOCOLS:
        raise OtelConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: expected http/protobuf or grpc")
    return Export(signal, protocol)
