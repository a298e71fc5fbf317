"""Prometheus metrics over the wire: after mixed traffic against a real gateway and the
fake upstream, each family moved by exactly what that traffic implies; with
``--workers 2`` every scrape is the sum over both workers; the same measurements go out
over OTLP (HTTP and gRPC) when the ``OTEL_*`` variables ask; the Grafana dashboard only
asks for families a scrape has."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import pytest
import redis
import yaml
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from chatgate.telemetry.metrics import MAX_MODELS, Metrics
from chatgate.testing.frames import recv, send, until
from chatgate.testing.servers import FakeLLM, RedisServer, RunningGateway, serve_process, wait_until

BOUND_S = 15.0
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "chatgate-dashboard.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def sse_chat(url: str, message: str) -> tuple[int, dict[str, Any] | None]:
    """``POST /chat`` as Server-Sent Events: the status and the ``done`` event, if any."""
    response = httpx.post(
        f"{url}/chat", json={"message": message, "stream": True},
        headers={"Accept": "text/event-stream"}, timeout=BOUND_S,
    )
    done = None
    for block in response.text.split("\n\n"):
        if block.startswith("event: done"):
            done = orjson.loads(block.split("data: ", 1)[1])
    return response.status_code, done


async def cancelled_on_websocket(gw: RunningGateway, fake: FakeLLM) -> dict[str, Any]:
    """A turn cancelled on a WebSocket; while it streams, the gauges show it and its
    socket, and the handshake is counted already."""
    fake.configure(tokens=400, tps=100)
    async with connect(gw.ws_url + "/ws") as ws:
        await send(ws, {"type": "chat", "id": "c1", "message": "a long one"})
        await recv(ws)  # start
        await until(ws, "delta")
        during = scrape(gw.url)
        assert value(during, "chatgate_generations_running") == 1
        assert value(during, "chatgate_websocket_connections") == 1
        assert value(during, "chatgate_http_requests_total", route="/ws", method="GET", status="101") == 1
        await send(ws, {"type": "cancel", "id": "c1"})
        done, _ = await until(ws, "done")
    assert done["finish_reason"] == "cancelled"
    return done


async def test_each_family_moves_by_what_the_traffic_implies(start_gateway: Any, fake: FakeLLM) -> None:
    with start_gateway(fallback_models="fake-backup") as gw:
        before = scrape(gw.url)
        status, ok = sse_chat(gw.url, "an answer")
        assert status == 200 and ok is not None and ok["finish_reason"] == "stop"
        fake.fault("http_500", times=3, model="fake-model")  # retried twice, then the backup
        status, fallback = sse_chat(gw.url, "answered by the backup")
        assert status == 200 and fallback is not None and fallback["finish_reason"] == "stop"
        fake.fault("http_500", times=3, model="fake-model")
        fake.fault("http_500", times=3, model="fake-backup")
        status, none = sse_chat(gw.url, "fails everywhere")
        assert status == 502 and none is None
        cancelled = await cancelled_on_websocket(gw, fake)
        wait_until(lambda: value(scrape(gw.url), "chatgate_websocket_connections") == 0,
                   timeout=BOUND_S, what="the socket counted closed")
        after = scrape(gw.url)

    ollama = {"provider": "ollama"}
    first, backup = {**ollama, "model": "fake-model"}, {**ollama, "model": "fake-backup"}
    assert moved(before, after, "chatgate_generations_total", **ollama, outcome="stop") == 2
    assert moved(before, after, "chatgate_generations_total", **ollama, outcome="cancelled") == 1
    assert moved(before, after, "chatgate_generations_total", **ollama, outcome="error") == 1
    assert value(after, "chatgate_generations_running") == 0
    # Tokens: the upstream's usage of each done, by the model that answered.
    for labels, dones in ((first, [ok, cancelled]), (backup, [fallback])):
        for direction, key in (("input", "prompt_tokens"), ("output", "completion_tokens")):
            expected = sum(done["usage"][key] for done in dones)
            assert moved(before, after, "chatgate_tokens_total", **labels, direction=direction) == expected
    assert moved(before, after, "chatgate_time_to_first_token_seconds_count", **first) == 2
    assert moved(before, after, "chatgate_time_to_first_token_seconds_count", **backup) == 1
    assert moved(before, after, "chatgate_inter_token_seconds_count", **first) == 1  # the cancel: none
    assert moved(before, after, "chatgate_inter_token_seconds_count", **backup) == 1
    assert 0 < moved(before, after, "chatgate_inter_token_seconds_sum", **first) < 1
    assert moved(before, after, "chatgate_gateway_overhead_seconds_count") == 3
    assert 0 < moved(before, after, "chatgate_gateway_overhead_seconds_sum") < 1
    # Attempts: 3 failed on the first model before the fallback, 3 + 3 on the failure.
    assert moved(before, after, "chatgate_upstream_errors_total", **ollama, kind="http_5xx") == 9
    assert moved(before, after, "chatgate_upstream_retries_total", **ollama) == 6
    assert moved(before, after, "chatgate_upstream_fallbacks_total", **backup) == 2
    requests = {"route": "/chat", "method": "POST"}
    assert moved(before, after, "chatgate_http_requests_total", **requests, status="200") == 2
    assert moved(before, after, "chatgate_http_requests_total", **requests, status="502") == 1
    assert moved(before, after, "chatgate_http_request_duration_seconds_count", **requests) == 3
    assert moved(before, after, "chatgate_http_requests_total", route="/ws", method="GET", status="101") == 1
    # The scrapes themselves: all but the last, counted once answered.
    scrapes = moved(before, after, "chatgate_http_requests_total", route="/metrics", method="GET", status="200")
    assert scrapes >= 2
    memory = {"store": "memory"}
    for operation in ("window", "begin_turn", "end_turn"):
        assert moved(before, after, "chatgate_store_operation_seconds_count", **memory, operation=operation) == 4
    assert value(after, "chatgate_upstream_breaker_state", **ollama, state="closed") == 1


def test_routes_are_labelled_by_template_never_by_path(start_gateway: Any) -> None:
    key = {"Authorization": "Bearer k1"}
    with start_gateway(api_keys="k1") as gw:
        for model in ("a", "b", "c"):
            httpx.get(f"{gw.url}/v1/models/{model}", headers=key)
        httpx.get(f"{gw.url}/v1/models/x")  # refused before routing: still its route
        httpx.get(f"{gw.url}/nowhere/{'x' * 8}", headers=key)
        samples = scrape_with_key(gw.url, "k1")
    counted = {
        labels: count for (name, labels), count in samples.items() if name == "chatgate_http_requests_total"
    }
    routes = {dict(labels)["route"] for labels in counted}
    template = "/v1/models/{model:path}"
    assert value(samples, "chatgate_http_requests_total", route=template, method="GET", status="401") == 1
    assert sum(count for labels, count in counted.items() if dict(labels)["route"] == template) == 4
    assert value(samples, "chatgate_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert not [route for route in routes if "nowhere" in route or re.search(r"/v1/models/[abcx]$", route)]


def scrape_with_key(url: str, key: str) -> Samples:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=5).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_model_labels_are_capped() -> None:
    metrics = Metrics("p")
    labels = [metrics.model_label(f"m{i}") for i in range(MAX_MODELS + 10)]
    assert labels[:MAX_MODELS] == [f"m{i}" for i in range(MAX_MODELS)]
    assert set(labels[MAX_MODELS:]) == {"other"}
    assert metrics.model_label("m0") == "m0"


def test_without_otel_variables_nothing_goes_over_otlp(gw: RunningGateway) -> None:
    assert gw.gateway.metrics.otel is None


# Several workers ---------------------------------------------------------------------


async def test_several_workers_sum_into_every_scrape(
    tmp_path: Path, fake: FakeLLM, redis_server: RedisServer
) -> None:
    store = f"{redis_server.url}/13"
    redis.Redis.from_url(store).flushdb()
    env = {"OLLAMA_HOST": fake.url, "CHATGATE_STORE": store, "CHATGATE_MODEL": "fake-model",
           "CHATGATE_DATA_DIR": str(tmp_path)}
    with serve_process(env, "--workers", "2") as served:
        # Each socket's turn runs on the worker that took it: open sockets together
        # until both workers hold some, then answer a turn on each.
        handshakes = 0
        for _ in range(60):
            sockets = list(await asyncio.gather(*(connect(served.ws_url + "/ws") for _ in range(8))))
            handshakes += len(sockets)
            instances = {ws.response.headers["x-chatgate-instance"] for ws in sockets}
            if len(instances) == 2:
                break
            for ws in sockets:
                await ws.close()
        else:
            pytest.fail("every connection reached the same worker")
        for ws in sockets:
            async with ws:
                await send(ws, {"type": "chat", "message": "hi"})
                done, _ = await until(ws, "done")
                assert done["finish_reason"] == "stop"
        turns = len(sockets)
        fake.fault("http_500", times=3)
        assert sse_chat(served.url, "fails")[0] == 502
        ollama = {"provider": "ollama"}
        for _ in range(6):  # new connections: the kernel hands them to either worker
            samples = scrape(served.url)
            assert value(samples, "chatgate_generations_total", **ollama, outcome="stop") == turns
            assert value(samples, "chatgate_generations_total", **ollama, outcome="error") == 1
            assert value(samples, "chatgate_upstream_errors_total", **ollama, kind="http_5xx") == 3
            assert value(samples, "chatgate_upstream_retries_total", **ollama) == 2
            ws_handshakes = value(samples, "chatgate_http_requests_total", route="/ws", method="GET", status="101")
            assert ws_handshakes == handshakes
            ttft = value(samples, "chatgate_time_to_first_token_seconds_count", **ollama, model="fake-model")
            assert ttft == turns
            assert value(samples, "chatgate_generations_running") == 0
            assert value(samples, "chatgate_upstream_breaker_state", **ollama, state="closed") == 1
        wait_until(lambda: value(scrape(served.url), "chatgate_websocket_connections") == 0,
                   timeout=BOUND_S, what="sockets counted closed on both workers")


# OTLP ----------------------------------------------------------------------------------


class _Receiver:
    """Export requests an OTLP receiver on loopback was sent, decoded."""

    def __init__(self) -> None:
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.lock = threading.Lock()

    def take(self, body: bytes) -> None:
        request = metrics_service_pb2.ExportMetricsServiceRequest()
        request.ParseFromString(body)
        with self.lock:
            self.requests.append(request)

    def points(self) -> dict[tuple[str, frozenset[tuple[str, str]]], Any]:
        """The latest point of each instrument and attribute set (cumulative), with the
        resource's ``service.name`` and the unit."""
        latest: dict[tuple[str, frozenset[tuple[str, str]]], Any] = {}
        with self.lock:
            requests = list(self.requests)
        for request in requests:
            for resource_metrics in request.resource_metrics:
                service = {a.key: a.value.string_value for a in resource_metrics.resource.attributes}
                for scope in resource_metrics.scope_metrics:
                    for metric in scope.metrics:
                        kind = metric.WhichOneof("data")
                        for point in getattr(metric, kind).data_points:
                            attributes = frozenset((a.key, a.value.string_value) for a in point.attributes)
                            latest[(metric.name, attributes)] = (point, metric.unit, service["service.name"])
        return latest


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, _Receiver]]:
    receiver = _Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/metrics":
                receiver.take(body)
            answer = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/metrics", receiver
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[str, _Receiver]]:
    receiver = _Receiver()

    class Service(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            receiver.take(request.SerializeToString())
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", receiver
    finally:
        server.stop(None)


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_the_same_measurements_go_out_over_otlp(
    protocol: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, start_gateway: Any,
    fake: FakeLLM,
) -> None:
    endpoint, receiver = request.getfixturevalue("http_receiver" if protocol != "grpc" else "grpc_receiver")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", endpoint)  # metrics only: no traces
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "chatgate-under-test")
    with start_gateway() as gw:
        assert gw.gateway.metrics.otel is not None
        status, done = sse_chat(gw.url, "an answer")
        assert status == 200 and done is not None
        fake.fault("http_500", times=3)
        assert sse_chat(gw.url, "fails")[0] == 502
        prometheus = scrape(gw.url)

        def exported() -> Any:
            # The failed turn's generation is counted before its HTTP response ends, and
            # an export may fall between the two: wait for both.
            points = receiver.points()
            failed = points.get(("chatgate.generations", frozenset({("provider", "ollama"), ("outcome", "error")})))
            refused = points.get(
                ("chatgate.http.requests", frozenset({("route", "/chat"), ("method", "POST"), ("status", "502")}))
            )
            return points if failed is not None and failed[0].as_int == 1 and refused is not None else None

        points = wait_until(exported, timeout=BOUND_S, what="metrics exported")

    def point(name: str, **attributes: str) -> Any:
        return points[(name, frozenset(attributes.items()))][0]

    ollama = {"provider": "ollama"}
    model = {**ollama, "model": "fake-model"}
    assert point("chatgate.generations", **ollama, outcome="stop").as_int == 1
    ttft, unit, service = points[("chatgate.time_to_first_token", frozenset(model.items()))]
    assert (ttft.count, unit, service) == (1, "s", "chatgate-under-test")
    assert ttft.sum == pytest.approx(
        value(prometheus, "chatgate_time_to_first_token_seconds_sum", **model)
    )
    usage = done["usage"]
    assert point("chatgate.tokens", **model, direction="output").as_int == usage["completion_tokens"]
    assert point("chatgate.tokens", **model, direction="input").as_int == usage["prompt_tokens"]
    assert point("chatgate.upstream.errors", **ollama, kind="http_5xx").as_int == 3
    assert point("chatgate.upstream.retries", **ollama).as_int == 2
    assert point("chatgate.http.requests", route="/chat", method="POST", status="200").as_int == 1
    assert point("chatgate.http.requests", route="/chat", method="POST", status="502").as_int == 1
    assert point("chatgate.gateway_overhead").count == 1
    assert point("chatgate.generations.running").as_int == 0
    assert point("chatgate.upstream.breaker_state", **ollama, state="closed").as_int == 1
    assert point("chatgate.store.operation.duration", store="memory", operation="end_turn").count == 2


# Grafana -----------------------------------------------------------------------------


def test_the_dashboard_asks_only_for_families_a_scrape_has(gw: RunningGateway) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert sse_chat(gw.url, "an answer")[0] == 200
    text = httpx.get(f"{gw.url}/metrics", timeout=5).text
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    assert len(exprs) >= 8
    asked = {name for expr in exprs for name in re.findall(r"\bchatgate_[a-z_]+", expr)}
    assert asked and asked <= names, asked - names
    for panel in dashboard["panels"]:
        if panel.get("targets"):
            assert panel["datasource"]["uid"] == "${" + variable["name"] + "}"


def test_the_prometheus_config_scrapes_chatgate() -> None:
    config = yaml.safe_load((DASHBOARD.parents[1] / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["chatgate:8000"]}]
