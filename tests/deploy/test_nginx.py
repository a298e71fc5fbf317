"""deploy/nginx.conf, rendered and run by Debian's nginx in front of a running gateway: the
page, a WebSocket answer and a streamed HTTP answer all come through it, and stream."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.typing import Origin

from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import (
    FakeLLM,
    RedisServer,
    RunningGateway,
    free_port,
    run_gateway,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "deploy" / "nginx.conf"
TOKENS = 30
TPS = 20  # a 1.5 s answer


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )
    if found is None:
        pytest.fail("nginx is not installed: ./test.sh installs it (Debian: apt-get install nginx)")
    return found


def render(listen: str, upstream: str, *more_upstreams: str) -> str:
    """What ``envsubst '$NGINX_LISTEN $CHATGATE_UPSTREAM'`` makes of the template; further
    instances get a ``server`` line each, as the template's comment says."""
    text = TEMPLATE.read_text()
    assert set(re.findall(r"\$\{(\w+)\}", text)) == {"NGINX_LISTEN", "CHATGATE_UPSTREAM"}
    line = "server ${CHATGATE_UPSTREAM};"
    assert line in text
    servers = "\n        ".join(f"server {address};" for address in (upstream, *more_upstreams))
    return text.replace("${NGINX_LISTEN}", listen).replace(line, servers)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextmanager
def run_nginx(prefix: Path, upstream: str, *more_upstreams: str) -> Iterator[str]:
    """nginx in the foreground on a free loopback port, everything it writes under ``prefix``."""
    binary = nginx_binary()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(render(f"127.0.0.1:{port}", upstream, *more_upstreams))
    stderr = prefix / "stderr.log"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )
    try:
        try:
            wait_until(lambda: accepts(port) or process.poll() is not None, timeout=10, what="nginx start")
        except TimeoutError:
            pass
        if process.poll() is not None or not accepts(port):
            logs = stderr.read_text() + _read(prefix / "error.log")
            pytest.fail(f"nginx did not start (exit {process.poll()}):\n{logs}")
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.fixture
def behind_nginx(start_gateway: Any, fake: FakeLLM, tmp_path: Path) -> Iterator[tuple[str, RunningGateway]]:
    """(nginx's host:port, the gateway behind it), the fake answering slowly."""
    fake.configure(tokens=TOKENS, tps=TPS)
    with start_gateway() as gw, run_nginx(tmp_path, gw.url.removeprefix("http://")) as address:
        yield address, gw


def stream_record(fake: FakeLLM) -> dict[str, Any]:
    [record] = [r for r in fake.requests() if r["path"] == "/api/chat"]
    return record


def test_page_and_api_come_through(behind_nginx: tuple[str, RunningGateway]) -> None:
    address, _ = behind_nginx
    page = httpx.get(f"http://{address}/", timeout=5)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower() and "WebSocket" in page.text
    assert httpx.get(f"http://{address}/health", timeout=5).json()["checks"]["provider"]
    agents = httpx.get(f"http://{address}/agents", timeout=5).json()
    assert "general" in agents["agents"]


def test_websocket_answer_streams_through(behind_nginx: tuple[str, RunningGateway], fake: FakeLLM) -> None:
    address, _ = behind_nginx

    async def converse() -> list[tuple[float, dict[str, Any]]]:
        frames: list[tuple[float, dict[str, Any]]] = []
        # A browser on the page nginx served sends this Origin; chatgate compares it with
        # the Host nginx passes on, so this also checks that nginx keeps the port in Host.
        async with connect(f"ws://{address}/ws", origin=Origin(f"http://{address}")) as ws:
            await ws.send(orjson.dumps({"type": "chat", "id": "r1", "message": "hello through nginx"}).decode())
            while not frames or frames[-1][1]["type"] not in ("done", "error"):
                frame = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                frames.append((time.monotonic(), frame))
        return frames

    frames = asyncio.run(converse())
    kinds = [frame["type"] for _, frame in frames]
    assert kinds[0] == "start" and kinds[-1] == "done", kinds
    deltas = [(at, frame) for at, frame in frames if frame["type"] == "delta"]
    assert "".join(frame["text"] for _, frame in deltas) == fake_reply(TOKENS)
    assert frames[-1][1]["finish_reason"] == "stop"
    record = stream_record(fake)
    assert deltas[0][0] < record["finished_at"] - 0.5, "the first delta waited for the whole answer"


def test_http_stream_arrives_in_pieces(behind_nginx: tuple[str, RunningGateway], fake: FakeLLM) -> None:
    address, _ = behind_nginx
    pieces: list[tuple[float, bytes]] = []
    with httpx.stream(
        "POST", f"http://{address}/chat", json={"message": "stream it", "stream": True}, timeout=10
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert response.headers["x-conversation-id"]
        for piece in response.iter_raw():
            pieces.append((time.monotonic(), piece))
    assert b"".join(piece for _, piece in pieces).decode() == fake_reply(TOKENS)
    record = stream_record(fake)
    assert record["completed"]
    first_at = pieces[0][0]
    assert first_at < record["finished_at"] - 0.5, "nginx held the answer back until it was complete"
    arrival_times = {round(at, 2) for at, _ in pieces}
    assert len(arrival_times) >= 5, f"only {len(pieces)} pieces: the stream was buffered"


def test_two_instances_on_one_redis_share_conversations(
    fake: FakeLLM, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Behind nginx's round robin, each turn may reach either instance: with the Redis
    store each one finds the conversation the other wrote."""
    fake.configure(tokens=3)
    settings = {"provider": "ollama", "ollama_host": fake.url, "model": "fake-model", "store": f"{redis_server.url}/4"}
    with (
        run_gateway(data_dir=tmp_path / "a", **settings) as a,
        run_gateway(data_dir=tmp_path / "b", **settings) as b,
        run_nginx(tmp_path, a.url.removeprefix("http://"), b.url.removeprefix("http://")) as address,
    ):
        for turn in range(1, 5):
            answer = httpx.post(
                f"http://{address}/chat", json={"message": f"turn {turn}", "conversation_id": "via-nginx"}, timeout=10
            )
            assert answer.status_code == 200, answer.text
        served = [len(gw.gateway.service.generations()) for gw in (a, b)]
    assert all(count >= 1 for count in served), f"one instance answered every turn: {served}"
    chats = [r for r in fake.requests() if r["path"] == "/api/chat"]
    reply = fake_reply(3)
    assert [m["content"] for m in chats[-1]["body"]["messages"] if m["role"] != "system"] == [
        "turn 1", reply, "turn 2", reply, "turn 3", reply, "turn 4"
    ]
