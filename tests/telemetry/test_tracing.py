"""OpenTelemetry traces: a real ``chatgate serve`` process, configured by the standard
``OTEL_*`` variables only, exporting to a real OTLP/HTTP receiver on loopback."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import httpx
import orjson
import pytest
from websockets.sync.client import connect

from chatgate.telemetry.otel import Export, OtelConfigError, export_for
from chatgate.testing.fake_wire import fake_reply
from chatgate.testing.otlp import (
    CLIENT,
    SERVER,
    STATUS_ERROR,
    OtlpReceiver,
    ReceivedSpan,
    otlp_receiver,
)
from chatgate.testing.servers import FakeLLM, ServedProcess, serve_process, wait_until

SECRET_PROMPT = "the purple elephant's password"
ANSWER_TEXT = "streaming deterministic tokens"  # in every fake answer of 40 tokens


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as running:
        yield running


def traced_gateway(receiver: OtlpReceiver, fake: FakeLLM, **extra: str) -> AbstractContextManager[ServedProcess]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "chatgate-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # the SDK's export interval (ms): quick tests
        "OLLAMA_HOST": fake.url,
        "CHATGATE_PROVIDER": "ollama",
        "CHATGATE_MODEL": "fake-model",
        "CHATGATE_STORE": "memory",
        **extra,
    }
    return serve_process(env)


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def spans_when(receiver: OtlpReceiver, ready: Callable[[list[ReceivedSpan]], bool]) -> list[ReceivedSpan]:
    def check() -> list[ReceivedSpan] | None:
        spans = receiver.spans()
        return spans if ready(spans) else None

    found: list[ReceivedSpan] = wait_until(check, timeout=15, interval=0.05, what="the exported spans")
    return found


def only(spans: list[ReceivedSpan], match: Callable[[ReceivedSpan], bool]) -> ReceivedSpan:
    found = [span for span in spans if match(span)]
    assert len(found) == 1, found
    return found[0]


def client_span_of(spans: list[ReceivedSpan], conversation_id: str) -> ReceivedSpan:
    return only(spans, lambda s: s.kind == CLIENT and s.attributes.get("gen_ai.conversation.id") == conversation_id)


def trace_of(header: str | None) -> tuple[str, str]:
    assert header is not None, "the upstream request carried no traceparent"
    _, trace_id, parent_id, _ = header.split("-")
    return trace_id, parent_id


def stream_chat(gateway: ServedProcess, message: str, conversation_id: str, header: str) -> str:
    with httpx.stream(
        "POST", f"{gateway.url}/chat", timeout=30, headers={"traceparent": header},
        json={"message": message, "conversation_id": conversation_id, "stream": True},
    ) as response:
        assert response.status_code == 200
        return response.read().decode()


def test_an_answer_a_cancel_and_a_failure_as_spans(receiver: OtlpReceiver, fake: FakeLLM) -> None:
    with traced_gateway(receiver, fake) as gateway:
        # 1. A streamed HTTP answer, in the client's trace.
        header, client_trace, client_parent = traceparent()
        assert stream_chat(gateway, SECRET_PROMPT, "answered", header) == fake_reply(40)
        answered_request = fake.requests()[-1]

        # 2. A WebSocket turn cancelled mid-answer, the handshake in another trace.
        fake.configure(tokens=5000, tps=100)
        ws_header, ws_trace, ws_parent = traceparent()
        with connect(f"{gateway.ws_url}/ws", additional_headers={"traceparent": ws_header}) as ws:
            ws.send(orjson.dumps({"type": "chat", "id": "cut", "message": SECRET_PROMPT,
                                  "conversation_id": "cancelled"}).decode())
            assert orjson.loads(ws.recv(timeout=10))["type"] == "start"
            assert orjson.loads(ws.recv(timeout=10))["type"] == "delta"
            ws.send(orjson.dumps({"type": "cancel", "id": "cut"}).decode())
            while (frame := orjson.loads(ws.recv(timeout=10)))["type"] != "done":
                assert frame["type"] == "delta", frame
            assert frame["finish_reason"] == "cancelled"

        # 3. The upstream fails every attempt (three, two of them retries).
        fake.configure(tokens=40, tps=0)
        fake.fault("http_500", times=3)
        before = len(fake.requests())
        failed = httpx.post(f"{gateway.url}/chat", json={"message": SECRET_PROMPT, "conversation_id": "failed"},
                            timeout=30)
        assert failed.status_code >= 500
        failed_requests = fake.requests()[before:]

        spans = spans_when(receiver, lambda found: sum(s.kind == CLIENT for s in found) == 3
                           and any(s.name == "chat turn" for s in found)
                           and sum(s.name == "POST /chat" for s in found) == 2)
    assert {s.resource.get("service.name") for s in spans} == {"chatgate-under-test"}

    # The HTTP answer: server span in the client's trace, client span its child, and
    # the upstream request in the same trace, its parent the client span.
    server = only(spans, lambda s: s.kind == SERVER and s.trace_id == client_trace)
    assert server.name == "POST /chat" and server.parent_span_id == client_parent
    assert server.attributes["http.route"] == "/chat"
    answer = client_span_of(spans, "answered")
    assert answer.name == "chat fake-model"
    assert (answer.trace_id, answer.parent_span_id) == (client_trace, server.span_id)
    assert trace_of(answered_request["traceparent"]) == (client_trace, answer.span_id)
    attributes = answer.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "ollama"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == "fake-model"
    assert attributes["gen_ai.usage.output_tokens"] == 40
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert attributes["chatgate.outcome"] == "ok"
    assert attributes["chatgate.time_to_first_chunk_ms"] >= 0
    assert attributes["chatgate.time_to_first_token_ms"] >= attributes["chatgate.time_to_first_chunk_ms"]
    assert [name for name, _ in answer.events] == ["gen_ai.first_chunk"]
    assert answer.status_code != STATUS_ERROR

    # The cancelled WebSocket turn: a server span per turn, child of the handshake's parent.
    turn = only(spans, lambda s: s.name == "chat turn")
    assert turn.kind == SERVER and (turn.trace_id, turn.parent_span_id) == (ws_trace, ws_parent)
    cancelled = client_span_of(spans, "cancelled")
    assert (cancelled.trace_id, cancelled.parent_span_id) == (ws_trace, turn.span_id)
    assert cancelled.attributes["chatgate.outcome"] == "cancelled"
    assert cancelled.attributes["gen_ai.response.finish_reasons"] == ["cancelled"]
    assert 0 < cancelled.attributes["gen_ai.usage.output_tokens"] < 5000

    # The failure: error status and type, one event per retry, every attempt in its trace.
    failure = client_span_of(spans, "failed")
    assert failure.status_code == STATUS_ERROR
    assert failure.attributes["chatgate.outcome"] == "error"
    assert failure.attributes["error.type"]
    retries = [event for event in failure.events if event[0] == "chatgate.retry"]
    assert [attrs["chatgate.attempt"] for _, attrs in retries] == [1, 2]
    assert len(failed_requests) == 3
    assert {trace_of(r["traceparent"]) for r in failed_requests} == {(failure.trace_id, failure.span_id)}
    failed_server = only(spans, lambda s: s.kind == SERVER and s.trace_id == failure.trace_id)
    assert failure.parent_span_id == failed_server.span_id

    # No prompt or answer text anywhere in what was exported.
    exported = receiver.raw()
    assert SECRET_PROMPT.encode() not in exported and b"purple" not in exported
    assert ANSWER_TEXT.encode() not in exported


def test_trace_content_puts_the_messages_in_the_client_span(receiver: OtlpReceiver, fake: FakeLLM) -> None:
    with traced_gateway(receiver, fake, CHATGATE_TRACE_CONTENT="1") as gateway:
        with httpx.stream(
            "POST", f"{gateway.url}/v1/chat/completions", timeout=30,
            json={"model": "fake-model", "stream": True, "temperature": 0.5, "top_p": 0.9, "seed": 7,
                  "messages": [{"role": "user", "content": SECRET_PROMPT}]},
        ) as response:
            assert response.status_code == 200
            response.read()
        spans = spans_when(receiver, lambda found: any(s.kind == CLIENT for s in found))
    span = only(spans, lambda s: s.kind == CLIENT)
    server = only(spans, lambda s: s.kind == SERVER and s.span_id == span.parent_span_id)
    assert server.name == "POST /v1/chat/completions" and server.trace_id == span.trace_id
    attributes = span.attributes
    assert attributes["gen_ai.request.temperature"] == 0.5
    assert attributes["gen_ai.request.top_p"] == 0.9
    assert attributes["gen_ai.request.seed"] == 7
    inputs = orjson.loads(attributes["gen_ai.input.messages"])
    assert inputs[-1] == {"role": "user", "parts": [{"type": "text", "content": SECRET_PROMPT}]}
    outputs = orjson.loads(attributes["gen_ai.output.messages"])
    assert outputs == [{"role": "assistant", "parts": [{"type": "text", "content": fake_reply(40)}],
                        "finish_reason": "stop"}]


def test_a_fallback_model_is_an_event_and_the_response_model(receiver: OtlpReceiver, fake: FakeLLM) -> None:
    with traced_gateway(receiver, fake, CHATGATE_FALLBACK_MODELS="fake-backup") as gateway:
        fake.fault("http_500", model="fake-model", times=3)
        answered = httpx.post(f"{gateway.url}/chat", json={"message": "hi", "conversation_id": "fell"}, timeout=30)
        assert answered.status_code == 200
        spans = spans_when(receiver, lambda found: any(s.kind == CLIENT for s in found))
    span = client_span_of(spans, "fell")
    assert span.attributes["gen_ai.request.model"] == "fake-model"
    assert span.attributes["gen_ai.response.model"] == "fake-backup"
    assert span.attributes["chatgate.outcome"] == "ok"
    assert [name for name, _ in span.events] == [
        "chatgate.retry", "chatgate.retry", "chatgate.fallback", "gen_ai.first_chunk",
    ]
    assert span.events[2][1]["chatgate.fallback.from"] == "fake-model"
    assert span.events[2][1]["chatgate.fallback.to"] == "fake-backup"


def test_without_otel_variables_tracing_is_never_loaded() -> None:
    script = (
        "import sys\n"
        "from chatgate.app import create_app\n"
        "from chatgate.config import load_settings\n"
        "from chatgate.providers import _http\n"
        "app = create_app(load_settings())\n"
        "names = [m.cls.__name__ for m in app.user_middleware]\n"
        "assert 'ServerSpans' not in names, names\n"
        "assert _http.OUTGOING_HEADERS == []\n"
        "loaded = [m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.instrumentation', 'chatgate.telemetry.tracing'))]\n"
        "assert not loaded, loaded\n"
        "print('untraced')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CHATGATE_"))}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "untraced"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, Export("traces", "http/protobuf")),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"},
         Export("traces", "http/protobuf")),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, Export("traces", "http/protobuf")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
         Export("traces", "grpc")),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
          "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, Export("traces", "grpc")),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://collector:4318/v1/metrics"}, None),
    ],
)
def test_export_for_traces(environ: dict[str, str], expected: Export | None) -> None:
    assert export_for("traces", environ) == expected


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
    ],
)
def test_export_for_refuses_what_chatgate_cannot_export(environ: dict[str, str]) -> None:
    with pytest.raises(OtelConfigError):
        export_for("traces", environ)
