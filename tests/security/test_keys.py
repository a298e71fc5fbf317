"""API keys (chatgate.api.auth, chatgate.api.tickets): where a key is taken and where it is
not, which routes need one, the browsers' single-use WebSocket tickets, keys files of
hashes, and keys kept out of every log line. Real gateways on loopback, a real Redis for
tickets across instances, Debian's Chromium for the page."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from playwright.async_api import Browser, expect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chatgate.api.auth import owner_of
from chatgate.config import ConfigError, load_settings
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import RedisServer, RunningGateway

K1 = {"Authorization": "Bearer k1"}
K2 = {"Authorization": "Bearer k2"}
REDIS_DB = 13
RECV_S = 10.0


@pytest.fixture
def authed(start_gateway: Any) -> Iterator[RunningGateway]:
    with start_gateway(api_keys="k1,k2") as running:
        yield running


# Helpers ------------------------------------------------------------------------------


def ticket(gw: RunningGateway, headers: dict[str, str] = K1) -> str:
    response = httpx.post(f"{gw.url}/auth/ticket", headers=headers, timeout=RECV_S)
    assert response.status_code == 200, response.text
    assert response.json()["expires_in"] == 30
    assert response.headers["cache-control"] == "no-store"
    value: str = response.json()["ticket"]
    return value


async def recv(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), RECV_S))
    return frame


async def chat_over(url: str, message: str = "hello") -> str:
    """One turn over the native socket at ``url``; returns its conversation id."""
    async with connect(url, open_timeout=RECV_S) as ws:
        await ws.send(orjson.dumps({"type": "chat", "message": message}).decode())
        frames = [await recv(ws)]
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(await recv(ws))
    assert frames[0]["type"] == "start" and frames[-1]["type"] == "done", frames
    conversation_id: str = frames[0]["conversation_id"]
    return conversation_id


async def refused_over(url: str) -> dict[str, Any]:
    """The socket at ``url`` is told ``unauthorized`` and closed with 1008: the error frame."""
    async with connect(url, open_timeout=RECV_S) as ws:
        error = await recv(ws)
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
    assert error["type"] == "error" and error["code"] == "unauthorized", error
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    return error


def owns(gw: RunningGateway, headers: dict[str, str], conversation_id: str) -> bool:
    response = httpx.get(f"{gw.url}/conversations/{conversation_id}", headers=headers, timeout=RECV_S)
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200


@contextmanager
def recorded(*loggers: str) -> Iterator[list[logging.LogRecord]]:
    """Every record of ``loggers`` from INFO up, whatever logging is configured."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.INFO)
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        for logger, level in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)


def hash_key(key: str) -> str:
    """``chatgate hash-key``, given ``key`` on stdin."""
    done = subprocess.run(
        [sys.executable, "-m", "chatgate", "hash-key"], input=key + "\n", capture_output=True, text=True,
        timeout=30, check=True,
    )
    return done.stdout.strip()


# Where a key is taken -----------------------------------------------------------------


async def test_api_key_in_an_http_url_is_refused_while_header_and_websocket_work(authed: RunningGateway) -> None:
    in_url = httpx.post(f"{authed.url}/chat?api_key=k1", json={"message": "hi"}, timeout=RECV_S)
    assert in_url.status_code == 401
    assert in_url.json()["code"] == "unauthorized" and "header" in in_url.json()["detail"]
    for path in ("/conversations?api_key=k1", "/v1/models?api_key=k1", "/api/tags?api_key=k1"):
        assert httpx.get(authed.url + path, timeout=RECV_S).status_code == 401, path

    in_header = httpx.post(f"{authed.url}/chat", json={"message": "hi"}, headers=K1, timeout=RECV_S)
    assert in_header.status_code == 200 and in_header.json()["reply"] == fake_reply(40)

    # The compatibility path: a WebSocket handshake still takes ?api_key=, as k1.
    conversation_id = await chat_over(authed.ws_url + "/ws?api_key=k1")
    assert owns(authed, K1, conversation_id) and not owns(authed, K2, conversation_id)
    await refused_over(authed.ws_url + "/ws?api_key=nope")


async def test_a_key_in_a_websocket_url_is_logged_once_as_compatibility_and_never_shown(start_gateway: Any) -> None:
    key = "k1-in-a-url-" + "x" * 20
    with start_gateway(api_keys=f"{key},k2") as gw, recorded("chatgate", "uvicorn.error") as records:
        await chat_over(f"{gw.ws_url}/ws?api_key={key}&dialect=native")
        await chat_over(f"{gw.ws_url}/ws?dialect=native&api_key={key}")
        await refused_over(f"{gw.ws_url}/ws?api_key={key}-wrong")
    told = [r for r in records if "compatibility path" in r.getMessage()]
    assert len(told) == 1 and told[0].levelno == logging.WARNING
    # uvicorn logs every handshake with its URL: the key is gone from it, the rest stays.
    handshakes = [r.getMessage() for r in records if "WebSocket /ws" in r.getMessage()]
    assert len(handshakes) == 3 and all("dialect=native" in line for line in handshakes[:2]), handshakes
    for record in records:
        assert key not in record.getMessage() and key not in str(record.__dict__), record.getMessage()


# Which routes need a key --------------------------------------------------------------

GUARDED = [
    ("GET", "/health"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"),
    ("GET", "/agents"), ("GET", "/v1/models"), ("GET", "/api/tags"), ("GET", "/api/ps"),
    ("POST", "/api/show"), ("GET", "/conversations"),
]


def test_every_guarded_path_needs_a_key(authed: RunningGateway) -> None:
    answered = [
        f"{method} {path}"
        for method, path in GUARDED
        if httpx.request(method, authed.url + path, json={"model": "fake-model"} if method == "POST" else None,
                         timeout=RECV_S).status_code != 401
    ]
    assert answered == [], "answered without a key"
    for method, path in GUARDED:
        response = httpx.request(
            method, authed.url + path, json={"model": "fake-model"} if method == "POST" else None, headers=K1,
            timeout=RECV_S,
        )
        assert response.status_code == 200, (method, path, response.text)


def test_probes_and_the_page_stay_open_and_say_nothing(start_gateway: Any, closed_port_url: str) -> None:
    with start_gateway(api_keys="k1") as gw:
        page = httpx.get(gw.url + "/", timeout=RECV_S)
        assert page.status_code == 200 and "<html" in page.text
        assert httpx.get(gw.url + "/health/live", timeout=RECV_S).json() == {"status": "ok"}
        ready = httpx.get(gw.url + "/health/ready", timeout=RECV_S)
        assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "checks": {"provider": {"status": "ok"}, "store": {"status": "ok"}}}
        assert gw.gateway.provider.name not in ready.text and "127.0.0.1" not in ready.text
        assert "127.0.0.1" in httpx.get(gw.url + "/health/ready", headers=K1, timeout=RECV_S).text

    with start_gateway(api_keys="k1", ollama_host=closed_port_url) as down:
        ready = httpx.get(down.url + "/health/ready", timeout=RECV_S)
        assert ready.status_code == 503
        assert ready.json() == {
            "status": "degraded", "checks": {"provider": {"status": "down"}, "store": {"status": "ok"}}
        }
        detailed = httpx.get(down.url + "/health", headers=K1, timeout=RECV_S).json()
        assert detailed["checks"]["provider"]["detail"], "the key holder still sees why"


def test_chatgate_public_paths_opens_a_path(start_gateway: Any) -> None:
    with start_gateway(api_keys="k1", public_paths="/metrics, /agents") as gw:
        assert httpx.get(gw.url + "/metrics", timeout=RECV_S).status_code == 200
        assert httpx.get(gw.url + "/agents", timeout=RECV_S).json()["agents"] == ["general"]
        assert httpx.get(gw.url + "/health", timeout=RECV_S).status_code == 401
        assert httpx.get(gw.url + "/health/ready", timeout=RECV_S).status_code == 200


# Tickets ------------------------------------------------------------------------------


async def test_a_ticket_opens_one_websocket_once_as_its_key(authed: RunningGateway) -> None:
    issued = ticket(authed, K2)
    assert owner_of("k2") not in issued, "a logged ticket must not give away the key's digest"
    conversation_id = await chat_over(f"{authed.ws_url}/ws?ticket={issued}")
    assert owns(authed, K2, conversation_id) and not owns(authed, K1, conversation_id)

    again = await refused_over(f"{authed.ws_url}/ws?ticket={issued}")
    assert "already used" in again["message"]


async def test_a_ticket_expires(authed: RunningGateway) -> None:
    tickets = authed.app.state.access.tickets
    stale, fresh = ticket(authed), ticket(authed)
    tickets.clock = lambda: time.time() + tickets.ttl_s + 1
    try:
        error = await refused_over(f"{authed.ws_url}/ws?ticket={stale}")
    finally:
        tickets.clock = time.time
    assert "expired" in error["message"]
    await chat_over(f"{authed.ws_url}/ws?ticket={fresh}")


async def test_a_ticket_with_a_bad_signature_is_refused(authed: RunningGateway, start_gateway: Any) -> None:
    owner, expires, ticket_id, mac = ticket(authed, K1).split(".")
    as_k2 = f"{owner_of('k2')}.{expires}.{ticket_id}.{mac}"
    later = f"{owner}.{int(expires) + 3600}.{ticket_id}.{mac}"
    flipped = f"{owner}.{expires}.{ticket_id}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}"
    with start_gateway(api_keys="k1,k3") as other:  # another key set: another secret
        foreign = ticket(other, K1)
    for forged in (as_k2, later, flipped, foreign, "garbage", f"{owner}.soon.{ticket_id}.{mac}"):
        error = await refused_over(f"{authed.ws_url}/ws?ticket={forged}")
        assert error["message"] == "the ticket is not valid", forged
    # The genuine one was never spent by those attempts.
    await chat_over(f"{authed.ws_url}/ws?ticket={owner}.{expires}.{ticket_id}.{mac}")


def test_a_ticket_needs_a_key_in_a_header(authed: RunningGateway, start_gateway: Any) -> None:
    for headers, url in ((None, "/auth/ticket"), (None, "/auth/ticket?api_key=k1"), ({"X-API-Key": "k3"}, "/auth/ticket")):
        assert httpx.post(authed.url + url, headers=headers, timeout=RECV_S).status_code == 401, url
    assert ticket(authed, {"X-API-Key": "k1"})
    issued = ticket(authed)
    # A ticket is for WebSockets: on HTTP it is no credential.
    assert httpx.get(f"{authed.url}/conversations?ticket={issued}", timeout=RECV_S).status_code == 401
    with start_gateway() as open_gateway:
        assert httpx.post(open_gateway.url + "/auth/ticket", timeout=RECV_S).status_code == 404


async def test_tickets_cross_instances_on_one_redis_once(
    start_gateway: Any, redis_server: RedisServer
) -> None:
    store = f"{redis_server.url}/{REDIS_DB}"
    redis.Redis.from_url(store).flushdb()
    with start_gateway(api_keys="k1,k2", store=store) as first, start_gateway(api_keys="k1,k2", store=store) as second:
        issued = ticket(first, K2)
        conversation_id = await chat_over(f"{second.ws_url}/ws?ticket={issued}")
        assert owns(first, K2, conversation_id)
        await refused_over(f"{first.ws_url}/ws?ticket={issued}")
        await refused_over(f"{second.ws_url}/ws?ticket={issued}")


# Keys files of hashes -----------------------------------------------------------------


async def test_a_hashed_key_in_a_keys_file_authenticates(start_gateway: Any, tmp_path: Path) -> None:
    key = "a-long-random-key-0123456789"
    line = hash_key(key)
    assert line.startswith("sha256:") and key not in line
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{line}\nk2\n", encoding="utf-8")
    headers = {"Authorization": f"Bearer {key}"}
    with start_gateway(api_keys=f"@{keys_file}") as gw:
        response = httpx.post(f"{gw.url}/chat", json={"message": "hi"}, headers=headers, timeout=RECV_S)
        assert response.status_code == 200, response.text
        conversation_id = response.json()["conversation_id"]
        # The same owner as when the key is configured in plain: conversations carry over.
        [info] = await gw.gateway.store.list(owner_of(key))
        assert info.id.endswith(conversation_id)
        assert httpx.get(f"{gw.url}/conversations", headers=K2, timeout=RECV_S).json() == {"conversations": []}
        wrong = {"Authorization": f"Bearer {line}"}  # the hash is not the key
        assert httpx.get(f"{gw.url}/conversations", headers=wrong, timeout=RECV_S).status_code == 401
        assert owns(gw, headers, await chat_over(f"{gw.ws_url}/ws?ticket={ticket(gw, headers)}"))


def test_a_malformed_hash_is_a_config_error(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("sha256:abc123\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^CHATGATE_API_KEYS: a sha256: entry must be 64 hex digits"):
        load_settings(api_keys=f"@{keys_file}")


# The page -----------------------------------------------------------------------------




async def test_the_page_asks_for_the_key_and_connects_with_a_ticket(
    start_gateway: Any, browser: Browser
) -> None:
    key = "page-key-0123456789"
    with start_gateway(api_keys=f"{key},k2") as gw:
        page = await browser.new_page()
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        await page.goto(gw.url + "/")
        await expect(page.locator("#status")).to_have_text("API key needed")
        await page.fill("#key", key)
        await page.press("#key", "Enter")
        await expect(page.locator("#status")).to_have_text("connected")
        await page.fill("#input", "Hello with a key")
        await page.press("#input", "Enter")
        await expect(page.locator(".msg.assistant").last).to_have_text(fake_reply(40), timeout=10_000)
        [opened] = sockets
        assert "ticket=" in opened and "api_key" not in opened and key not in opened
        assert len(await gw.gateway.store.list(owner_of(key))) == 1

        await page.reload()  # a new ticket for the new socket; the history comes back
        await expect(page.locator(".msg.assistant")).to_have_text([fake_reply(40)])
        await expect(page.locator("#status")).to_have_text("connected")
        assert len(sockets) == 2 and sockets[1] != sockets[0]


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [("CHATGATE_SECRET", "too-short", "at least 16 characters"), ("CHATGATE_PUBLIC_PATHS", "/metrics,docs", "each starting with /")],
)
def test_a_wrong_secret_or_public_path_is_one_line_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith(f"{variable}: ") and says in str(caught.value)
    assert (value in str(caught.value)) == (variable != "CHATGATE_SECRET"), "a secret is never shown"
