"""The browser boundary (chatgate.api.browsers): what a web page on another site can make
the gateway do. DNS rebinding (a page whose name resolves to the gateway) is refused by
the Host check on HTTP and WebSocket handshakes; a WebSocket's Origin is checked against
the allowlist, not against Host; bodies a page may send cross-site without a CORS
preflight (text/plain, forms, no Content-Type) are refused before any upstream request.
Real gateways on loopback; the handshakes that need a foreign Host go over a plain socket."""

from __future__ import annotations

import base64
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from chatgate.api.browsers import BrowserBoundary, host_of, log_exposure, machine_names
from chatgate.config import ConfigError, load_settings
from chatgate.testing.frames import recv, send
from chatgate.testing.servers import FakeLLM, RunningGateway, free_port, stop_process, wait_until

REBINDING_HOST = "evil.example"


def host_port(gw: RunningGateway) -> str:
    return gw.url.removeprefix("http://")


def handshake(gw: RunningGateway, path: str, host: str, origin: str | None = None) -> tuple[int, bytes]:
    """A WebSocket handshake with any ``Host`` (client libraries take it from the URL):
    the answer's status and body."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    address = urlsplit(gw.url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed mid-answer: {received!r}"
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed mid-body: {body!r}"
            body += chunk
    return status, body


# --- DNS rebinding: the Host check -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/conversations", lambda body: body["code"] == "bad_request" and REBINDING_HOST in body["detail"]),
        ("/v1/models", lambda body: body["error"]["code"] == "bad_request"),
        ("/api/tags", lambda body: list(body) == ["error"] and REBINDING_HOST in body["error"]),
        ("/no/such/route", lambda body: body["code"] == "bad_request"),
    ],
    ids=["native", "openai", "ollama", "before-routing"],
)
def test_rebinding_host_gets_400_on_http(gw: RunningGateway, path: str, error: Any) -> None:
    for host in (REBINDING_HOST, f"{REBINDING_HOST}:{urlsplit(gw.url).port}"):
        refused = httpx.get(gw.url + path, headers={"Host": host, "Origin": f"http://{host}"})
        assert refused.status_code == 400, refused.text
        assert error(refused.json()), refused.text
    for served in ("127.0.0.1", f"localhost:{urlsplit(gw.url).port}", "[::1]:80", "app.localhost"):
        assert httpx.get(gw.url + "/conversations", headers={"Host": served}).status_code == 200


@pytest.mark.parametrize("path", ["/ws", "/ws/chat", "/chat/ws", "/ws/chat/s1"])
def test_rebinding_host_gets_no_websocket(gw: RunningGateway, path: str) -> None:
    """The rebinding page is same-origin with itself: Origin and Host both name it."""
    port = urlsplit(gw.url).port
    status, body = handshake(gw, path, f"{REBINDING_HOST}:{port}", origin=f"http://{REBINDING_HOST}:{port}")
    assert status == 400
    assert orjson.loads(body)["code"] == "bad_request"
    assert handshake(gw, path, host_port(gw), origin=gw.url)[0] == 101


def test_an_ip_address_is_always_a_served_host(gw: RunningGateway) -> None:
    """Rebinding needs a name: a page can send ``Host: 10.1.2.3`` only to the address it
    came from. Behind a proxy or a published container port, the address is not ours."""
    for host in ("10.1.2.3:8000", "192.168.0.7", "[fd00::5]:8000"):
        assert httpx.get(gw.url + "/health/live", headers={"Host": host}).status_code == 200


def test_allowed_hosts_setting_admits_a_named_host(start_gateway: Any) -> None:
    with start_gateway(allowed_hosts="chat.example.com, .lan") as gw:
        for host in ("chat.example.com", "CHAT.example.com:443", "box.lan:8000", "lan"):
            assert httpx.get(gw.url + "/conversations", headers={"Host": host}).status_code == 200, host
        assert httpx.get(gw.url + "/conversations", headers={"Host": "example.com"}).status_code == 400
        assert handshake(gw, "/ws", "chat.example.com", origin="https://chat.example.com")[0] == 101
        assert handshake(gw, "/ws", "chat.example.com", origin="https://evil.example")[0] == 403


def test_allowed_hosts_star_turns_the_check_off(start_gateway: Any) -> None:
    with start_gateway(allowed_hosts="*") as gw:
        assert httpx.get(gw.url + "/conversations", headers={"Host": REBINDING_HOST}).status_code == 200


def test_a_host_with_scheme_or_port_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATGATE_ALLOWED_HOSTS", "https://chat.example.com")
    with pytest.raises(ConfigError, match=r"^CHATGATE_ALLOWED_HOSTS: .*not a host name"):
        load_settings()


PRIVATE_NAMES = ["chatgate", "box.local", "api.ns.svc.cluster.local", "db.internal", "nas.home.arpa"]


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.168.1.5", "gateway.lan"])
def test_a_non_loopback_bind_also_serves_names_outside_public_dns(bind: str) -> None:
    """This machine's name, a compose service's, a Kubernetes service's: no page on the
    internet can rebind a name that public DNS does not have."""
    exposed = BrowserBoundary.of(bind, [], [])
    assert machine_names() and all(exposed.allows_host(name) for name in machine_names())
    assert all(exposed.allows_host(name) for name in ["localhost", "::1", *PRIVATE_NAMES])
    assert not exposed.allows_host(REBINDING_HOST) and not exposed.allows_host("box.lan.example.com")
    # As a Host only: a page from another machine is another site.
    assert not exposed.allows_origin("http://otherbox.local:3000", "10.0.0.2:8000")
    assert exposed.allows_origin(f"http://{next(iter(machine_names()))}:3000", "10.0.0.2:8000")


def test_a_loopback_bind_serves_loopback_names_and_addresses_only() -> None:
    loopback = BrowserBoundary.of("127.0.0.1", [], [])
    assert not any(loopback.allows_host(name) for name in [*PRIVATE_NAMES, *machine_names() - {"localhost"}])
    assert loopback.allows_host("localhost") and loopback.allows_host("app.localhost")
    assert loopback.allows_host("10.1.2.3")
    named = BrowserBoundary.of("gateway.lan", [], [])
    assert named.allows_host("gateway.lan") and not named.allows_host("other.lan")


@pytest.mark.parametrize(
    ("header", "host"),
    [("Example.COM:8000", "example.com"), ("[::1]:8000", "::1"), ("::1", "::1"), ("localhost.", "localhost"),
     ("127.0.0.1", "127.0.0.1")],
)
def test_host_of_a_header(header: str, host: str) -> None:
    assert host_of(header) == host


# --- WebSocket origins: the allowlist, not Host ------------------------------------------


async def test_websocket_origin_is_checked_against_the_allowlist(gw: RunningGateway) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(gw.ws_url + "/ws", origin=Origin("http://evil.example")):
            pass
    assert refused.value.response.status_code == 403
    port = urlsplit(gw.url).port
    # The page's own origin, and a page on this machine on another port (a dev server).
    for origin in (f"http://127.0.0.1:{port}", "http://localhost:5173", "https://127.0.0.1"):
        async with connect(gw.ws_url + "/ws", origin=Origin(origin)) as ws:
            await send(ws, {"type": "ping"})
            assert await recv(ws) == {"type": "pong"}
    # Programs send no Origin.
    async with connect(gw.ws_url + "/ws") as ws:
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}


def test_cors_answers_the_allowlisted_pages_only(gw: RunningGateway) -> None:
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(
            gw.url + "/v1/chat/completions",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type"},
        )

    allowed = preflight("http://localhost:5173")
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:5173"
    refused = preflight("http://evil.example")
    assert "access-control-allow-origin" not in refused.headers


def test_configured_cors_origins_still_apply(start_gateway: Any) -> None:
    with start_gateway(cors_origins="https://app.example.net") as gw:
        answer = httpx.get(gw.url + "/agents", headers={"Origin": "https://app.example.net"})
        assert answer.headers["access-control-allow-origin"] == "https://app.example.net"
        assert handshake(gw, "/ws", host_port(gw), origin="https://app.example.net")[0] == 101


# --- bodies a page may send without a preflight ----------------------------------------


CHAT_BODIES = {
    "/v1/chat/completions": {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
    "/api/chat": {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": False},
    "/api/generate": {"model": "fake-model", "prompt": "hi", "stream": False},
    "/chat": {"message": "hi"},
}


def error_message(path: str, body: dict[str, Any]) -> str:
    """The message, from the error shape of the API ``path`` belongs to."""
    if path.startswith("/v1/"):
        assert body["error"]["type"] == "invalid_request_error"
        return str(body["error"]["message"])
    if path.startswith("/api/"):
        assert list(body) == ["error"]
        return str(body["error"])
    assert body["code"] == "bad_request"
    return str(body["detail"])


@pytest.mark.parametrize("path", list(CHAT_BODIES))
@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
     "multipart/form-data; boundary=x", None],
    ids=["text", "text-charset", "form", "multipart", "none"],
)
def test_a_body_not_sent_as_json_gets_415_and_no_upstream_request(
    gw: RunningGateway, fake: FakeLLM, path: str, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    refused = httpx.post(gw.url + path, content=orjson.dumps(CHAT_BODIES[path]), headers=headers)
    assert refused.status_code == 415, refused.text
    assert "application/json" in error_message(path, refused.json())
    assert fake.requests() == []


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=utf-8",
                                          "application/vnd.chat+json"])
def test_json_bodies_are_served(gw: RunningGateway, fake: FakeLLM, content_type: str) -> None:
    for path, body in CHAT_BODIES.items():
        answer = httpx.post(gw.url + path, content=orjson.dumps(body), headers={"Content-Type": content_type})
        assert answer.status_code == 200, (path, answer.text)
    assert len(fake.requests()) == len(CHAT_BODIES)


def test_a_post_without_a_body_is_left_to_its_route(gw: RunningGateway, fake: FakeLLM) -> None:
    assert httpx.post(gw.url + "/api/chat").status_code == 400
    assert fake.requests() == []


# --- start-up ----------------------------------------------------------------------------


def chatgate_environment(tmp_path: Path, fake: FakeLLM, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith(("CHATGATE_", "OLLAMA_"))}
    return {**base, "PYTHONUNBUFFERED": "1", "CHATGATE_STORE": "memory", "CHATGATE_DATA_DIR": str(tmp_path),
            "OLLAMA_HOST": fake.url, **env}


@contextmanager
def serve_lines(tmp_path: Path, fake: FakeLLM, *args: str) -> Iterator[list[str]]:
    """``chatgate serve ARGS`` until it says it is ready: the lines it has written."""
    process = subprocess.Popen(
        [sys.executable, "-m", "chatgate", "serve", "--port", str(free_port()), *args],
        env=chatgate_environment(tmp_path, fake), cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        lines.extend(process.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("chatgate ready on" in line for line in lines) or process.poll() is not None,
                   timeout=60, what="the ready line")
        yield lines
    finally:
        stop_process(process)
        reader.join(timeout=5)


def records(lines: list[str]) -> list[dict[str, Any]]:
    parsed = []
    for line in list(lines):
        try:
            parsed.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return [r for r in parsed if isinstance(r, dict)]


def test_serving_beyond_this_machine_without_keys_warns(tmp_path: Path, fake: FakeLLM) -> None:
    with serve_lines(tmp_path, fake, "--host", "0.0.0.0") as lines:
        logged = records(lines)
        assert any(str(r.get("msg", "")).startswith("chatgate ready on") for r in logged), lines
        [warning] = [r for r in logged if r.get("level") == "warning" and "CHATGATE_API_KEYS" in r["msg"]]
        assert "0.0.0.0" in warning["msg"]
        [hosts] = [r for r in logged if str(r.get("msg", "")).startswith("serving Host names")]
        assert "CHATGATE_ALLOWED_HOSTS" in hosts["msg"] and "localhost" in hosts["allowed_hosts"]


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [("127.0.0.1", "", False), ("::1", "", False), ("localhost", "", False), ("0.0.0.0", "k1", False),
     ("::", "", True), ("192.168.1.5", "", True)],
)
def test_the_warning_names_exposure_without_keys_only(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    host: str, keys: str, warned: bool
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.delenv("CHATGATE_API_KEYS", raising=False)
    caplog.set_level(logging.INFO, logger="chatgate")
    log_exposure(load_settings(host=host, api_keys=keys or None))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) is warned
    assert "k1" not in caplog.text
