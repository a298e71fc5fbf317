"""deploy/nginx.conf and deploy/nginx-instances.conf, rendered and run by Debian's nginx in
front of running gateways: the page, WebSocket answers and streamed HTTP answers come
through and stream; with several instances, turns are spread over them, a stopped instance
is skipped, and a request that reached an instance is never sent to another."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from deploy_helpers import nginx_binary
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.typing import Origin

from chatgate.app import SERVER_OPTIONS
from chatgate.config import Settings
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.frames import recv, send, until
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
INSTANCES_TEMPLATE = REPO / "deploy" / "nginx-instances.conf"
TOKENS = 30
TPS = 20  # a 1.5 s answer


def render(listen: str, upstream: str) -> str:
    """What ``envsubst '$NGINX_LISTEN $CHATGATE_UPSTREAM'`` makes of deploy/nginx.conf."""
    text = TEMPLATE.read_text()
    assert set(re.findall(r"\$\{(\w+)\}", text)) == {"NGINX_LISTEN", "CHATGATE_UPSTREAM"}
    return text.replace("${NGINX_LISTEN}", listen).replace("${CHATGATE_UPSTREAM}", upstream)


def render_instances(listen: str, addresses: Sequence[str]) -> str:
    """deploy/nginx-instances.conf as its comment says to use it: each example instance
    replaced by a real one in both upstream blocks, then ``envsubst '$NGINX_LISTEN'``."""
    text = INSTANCES_TEMPLATE.read_text()
    assert set(re.findall(r"\$\{(\w+)\}", text)) == {"NGINX_LISTEN"}
    examples = list(dict.fromkeys(re.findall(r"^\s*server (\S+) .*;$", text, re.MULTILINE)))
    assert len(examples) == len(addresses), f"the template lists {examples}"
    for example, address in zip(examples, addresses, strict=True):
        text = re.sub(rf"(?m)^(\s*server ){re.escape(example)} ", rf"\g<1>{address} ", text)
    return text.replace("${NGINX_LISTEN}", listen)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextmanager
def run_nginx(prefix: Path, render_conf: Callable[[str], str]) -> Iterator[str]:
    """nginx in the foreground on a free loopback port, everything it writes under
    ``prefix``; ``render_conf(listen)`` makes its configuration."""
    binary = nginx_binary()
    port = free_port()
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render_conf(f"127.0.0.1:{port}"))
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


def host_port(gw: RunningGateway) -> str:
    return gw.url.removeprefix("http://")


def websocket_turn(address: str, message: str) -> list[tuple[float, dict[str, Any]]]:
    """One answer over a new native WebSocket through nginx: each frame with its arrival time."""

    async def converse() -> list[tuple[float, dict[str, Any]]]:
        frames: list[tuple[float, dict[str, Any]]] = []
        # A browser on the page nginx served sends this Origin; chatgate compares it with
        # the Host nginx passes on, so this also checks that nginx keeps the port in Host.
        async with connect(f"ws://{address}/ws", origin=Origin(f"http://{address}")) as ws:
            await ws.send(orjson.dumps({"type": "chat", "id": "r1", "message": message}).decode())
            while not frames or frames[-1][1]["type"] not in ("done", "error"):
                frame = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                frames.append((time.monotonic(), frame))
        return frames

    return asyncio.run(converse())


def assert_streamed(frames: list[tuple[float, dict[str, Any]]], fake: FakeLLM, message: str) -> None:
    """A whole answer of TOKENS tokens, whose first delta came well before the upstream ended."""
    kinds = [frame["type"] for _, frame in frames]
    assert kinds[0] == "start" and kinds[-1] == "done", kinds
    deltas = [(at, frame) for at, frame in frames if frame["type"] == "delta"]
    assert "".join(frame["text"] for _, frame in deltas) == fake_reply(TOKENS)
    assert frames[-1][1]["finish_reason"] == "stop"
    [record] = [r for r in chat_records(fake) if r["body"]["messages"][-1]["content"] == message]
    assert deltas[0][0] < record["finished_at"] - 0.5, "the first delta waited for the whole answer"


def chat_records(fake: FakeLLM) -> list[dict[str, Any]]:
    return [r for r in fake.requests() if r["path"] == "/api/chat"]


# --- one instance: deploy/nginx.conf -------------------------------------------------


@pytest.fixture
def behind_nginx(start_gateway: Any, fake: FakeLLM, tmp_path: Path) -> Iterator[tuple[str, RunningGateway]]:
    """(nginx's host:port, the gateway behind it), the fake answering slowly."""
    fake.configure(tokens=TOKENS, tps=TPS)
    with start_gateway() as gw, run_nginx(tmp_path, lambda listen: render(listen, host_port(gw))) as address:
        yield address, gw


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
    assert_streamed(websocket_turn(address, "hello through nginx"), fake, "hello through nginx")


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
    [record] = chat_records(fake)
    assert record["completed"]
    first_at = pieces[0][0]
    assert first_at < record["finished_at"] - 0.5, "nginx held the answer back until it was complete"
    arrival_times = {round(at, 2) for at, _ in pieces}
    assert len(arrival_times) >= 5, f"only {len(pieces)} pieces: the stream was buffered"


# --- what both files promise, read from them ----------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def find(self, name: str, *args: str) -> Directive:
        """The one directive in this block named ``name`` whose arguments start with ``args``."""
        found = [d for d in self.block or [] if d.name == name and d.args[: len(args)] == list(args)]
        assert len(found) == 1, f"{len(found)} times {name} {' '.join(args)} in {self.name} {' '.join(self.args)}"
        return found[0]

    def all(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]


_TOKEN = re.compile(r"'[^']*'|\"[^\"]*\"|[{};]|[^\s{};'\"]+")


def parse_conf(text: str) -> Directive:
    """An nginx configuration, or a template's with each ``${VARIABLE}`` as one word, as
    a tree of directives (enough for these files: no quoted ``#`` or braces)."""
    text = re.sub(r"\$\{(\w+)\}", r"\1", re.sub(r"#[^\n]*", "", text))
    tokens = iter(_TOKEN.findall(text))

    def block() -> list[Directive]:
        directives: list[Directive] = []
        words: list[str] = []
        for token in tokens:
            if token == ";":
                directives.append(Directive(words[0], words[1:]))
                words = []
            elif token == "{":
                directives.append(Directive(words[0], words[1:], block()))
                words = []
            elif token == "}":
                return directives
            else:
                words.append(token)
        assert not words, f"unterminated directive {words}"
        return directives

    return Directive("main", [], block())


def seconds(value: str) -> float:
    """An nginx time ("330s", "1h", "500ms", "60") in seconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match, f"not an nginx time: {value!r}"
    number, unit = match.groups()
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit or "s"]


def inherited(scopes: Sequence[Directive], name: str, default: str) -> str:
    """The value of ``name`` in the innermost of ``scopes`` that sets it, else nginx's default."""
    for scope in scopes:
        if values := scope.all(name):
            return values[-1].args[0]
    return default


@pytest.mark.parametrize("template", [TEMPLATE, INSTANCES_TEMPLATE], ids=["one", "instances"])
def test_timeouts_fit_the_gateway(template: Path) -> None:
    # uvicorn as ``chatgate serve`` configures it (cli.py): its timers are the ones nginx must fit.
    gateway = uvicorn.Config("chatgate.app:app_from_environment", factory=True, **SERVER_OPTIONS)
    http = parse_conf(template.read_text()).find("http")
    server = http.find("server")
    # An idle WebSocket carries only the gateway's pings: nginx must see several of them
    # within its read timeout, or it closes sockets that are merely quiet.
    ping = gateway.ws_ping_interval
    assert ping, "uvicorn's WebSocket pings are off: nginx closes idle sockets after proxy_read_timeout"
    for path in ("/ws", "/chat/ws"):
        location = server.find("location", path)
        read_timeout = seconds(inherited([location, server, http], "proxy_read_timeout", "60s"))
        assert ping <= read_timeout / 3, f"pings every {ping} s, {path} read timeout {read_timeout} s"
    # A streamed HTTP answer may be silent while the model thinks, up to the gateway's own
    # upstream read timeout.
    root = server.find("location", "/")
    read_timeout = seconds(inherited([root, server, http], "proxy_read_timeout", "60s"))
    assert read_timeout > Settings.model_fields["request_timeout_s"].default
    # nginx must give up an idle pooled connection before the gateway closes it.
    for upstream in http.all("upstream"):
        if upstream.all("keepalive"):
            idle = seconds(inherited([upstream], "keepalive_timeout", "60s"))
            assert idle < gateway.timeout_keep_alive, f"upstream {upstream.args[0]} keeps connections {idle} s"


def test_instances_template_retries_only_what_is_safe() -> None:
    http = parse_conf(INSTANCES_TEMPLATE.read_text()).find("http")
    upstreams = {u.args[0]: [s.args for s in u.all("server")] for u in http.all("upstream")}
    assert len(upstreams["chatgate"]) >= 2, "an example of several instances"
    assert upstreams["chatgate_ws"] == upstreams["chatgate"], "both upstream blocks list the same instances"
    for args in upstreams["chatgate"]:
        assert any(a.startswith("max_fails=") for a in args) and any(a.startswith("fail_timeout=") for a in args)
    # nginx's "non_idempotent" would send a POST that reached a dying instance to another.
    server = http.find("server")
    for scope in (http, server, *server.all("location")):
        for directive in scope.all("proxy_next_upstream"):
            assert "non_idempotent" not in directive.args, f"{scope.name} {' '.join(scope.args)}"
    assert server.find("proxy_next_upstream").args == ["error", "timeout"]


# --- several instances: deploy/nginx-instances.conf ----------------------------------


@dataclass
class Cluster:
    """Two gateways on one Redis behind one nginx; ``stop(n)`` stops instance n."""

    address: str
    gateways: list[RunningGateway]
    access_log: Path
    _lifetimes: list[ExitStack] = field(repr=False)

    def stop(self, index: int) -> None:
        self._lifetimes[index].close()


@pytest.fixture
def cluster(fake: FakeLLM, redis_server: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    fake.configure(tokens=3)
    settings = {"provider": "ollama", "ollama_host": fake.url, "model": "fake-model", "store": f"{redis_server.url}/10"}
    with ExitStack() as stack:
        lifetimes = [stack.enter_context(ExitStack()) for _ in range(2)]
        gateways = [
            lifetime.enter_context(run_gateway(data_dir=tmp_path / name, **settings))
            for lifetime, name in zip(lifetimes, "ab", strict=True)
        ]
        prefix = tmp_path / "nginx"
        address = stack.enter_context(
            run_nginx(prefix, lambda listen: render_instances(listen, [host_port(gw) for gw in gateways]))
        )
        yield Cluster(address, gateways, prefix / "access.log", lifetimes)


def answered(gw: RunningGateway) -> int:
    """Generations this instance has ended, from its own /metrics."""
    text = httpx.get(f"{gw.url}/metrics", timeout=5).text
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "chatgate_generations_total"
        )
    )


def counts_reach(gateways: Sequence[RunningGateway], total: int) -> list[int]:
    """Each instance's count of ended generations, once they add up to ``total``."""
    counts: list[int] = []

    def reached() -> bool:
        counts[:] = [answered(gw) for gw in gateways]
        return sum(counts) >= total

    wait_until(reached, timeout=5, what=f"{total} generations")
    assert sum(counts) == total, counts
    return counts


def chat_turn(address: str, message: str, conversation_id: str) -> None:
    answer = httpx.post(
        f"http://{address}/chat", json={"message": message, "conversation_id": conversation_id}, timeout=10
    )
    assert answer.status_code == 200, answer.text


def assert_history(fake: FakeLLM, turns: int) -> None:
    """The last upstream request carried every earlier turn, whichever instance wrote it."""
    reply = fake_reply(3)
    expected = [text for n in range(1, turns) for text in (f"turn {n}", reply)] + [f"turn {turns}"]
    assert [m["content"] for m in chat_records(fake)[-1]["body"]["messages"] if m["role"] != "system"] == expected


def test_http_turns_are_spread_over_the_instances(cluster: Cluster, fake: FakeLLM) -> None:
    for turn in range(1, 7):
        chat_turn(cluster.address, f"turn {turn}", "spread")
    counts = counts_reach(cluster.gateways, 6)
    assert all(count >= 2 for count in counts), f"turns per instance: {counts}"
    assert_history(fake, 6)


async def test_an_answer_resumes_and_is_cancelled_through_nginx_on_the_other_instance(
    cluster: Cluster, fake: FakeLLM
) -> None:
    """nginx sends a second socket to the other instance (the fewest open); a reply
    started on the first is resumed there, each delta exactly once, and a cancel sent
    there stops the upstream request on the first."""
    fake.configure(tokens=120, tps=100)
    url = f"ws://{cluster.address}/ws"
    async with connect(url) as first, connect(url) as second:
        instances = {ws.response.headers["x-chatgate-instance"] for ws in (first, second)}
        assert len(instances) == 2, "both sockets reached one instance"
        await send(first, {"type": "chat", "message": "a long answer"})
        start = await recv(first)
        received = [await recv(first) for _ in range(3)]
        await first.close()  # the page reloads, or the network blips
        await send(second, {"type": "resume", "id": start["id"], "after": received[-1]["seq"]})
        done, rest = await until(second, "done")
        deltas = received + rest
        assert [f["seq"] for f in deltas] == list(range(1, len(deltas) + 1))
        assert "".join(f["text"] for f in deltas) == fake_reply(120)

    fake.configure(tokens=2000, tps=50)
    async with connect(url) as first, connect(url) as second:
        await send(first, {"type": "chat", "message": "go on and on"})
        start = await recv(first)
        await recv(first)
        await send(second, {"type": "cancel", "id": start["id"]})
        done, _ = await until(first, "done")
    assert done["finish_reason"] == "cancelled"
    record = wait_until(
        lambda: next((r for r in chat_records(fake) if r["disconnected_at"]), None), timeout=5, what="upstream closed"
    )
    assert record["tokens_sent"] < 2000


def test_websocket_answer_streams_through_the_instances(cluster: Cluster, fake: FakeLLM) -> None:
    fake.configure(tokens=TOKENS, tps=TPS)
    assert_streamed(websocket_turn(cluster.address, "slowly, please"), fake, "slowly, please")


def test_turns_go_on_when_an_instance_stops(cluster: Cluster, fake: FakeLLM) -> None:
    a, b = cluster.gateways
    chat_turn(cluster.address, "turn 1", "failover")
    chat_turn(cluster.address, "turn 2", "failover")
    counts_reach(cluster.gateways, 2)
    before = answered(a)
    cluster.stop(1)
    frames = websocket_turn(cluster.address, "still there?")
    assert frames[-1][1]["type"] == "done", frames[-1]
    for turn in range(3, 7):
        chat_turn(cluster.address, f"turn {turn}", "failover")
    wait_until(lambda: answered(a) == before + 5, timeout=5, what="five more turns on the live instance")
    assert_history(fake, 6)
    # nginx tried the stopped instance (its connection was refused, so nothing had reached
    # it) and passed the POST on to the live one.
    passed_on = f"upstream={host_port(b)}, {host_port(a)} "
    retried = [line for line in cluster.access_log.read_text().splitlines() if passed_on in line]
    assert any('"POST /chat ' in line and " 200 " in line for line in retried), cluster.access_log.read_text()


@dataclass
class HangingUpInstance:
    """Takes each request whole, then closes the connection without an answer: to nginx,
    an instance that died with the request in hand."""

    listener: socket.socket
    requests: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        host, port = self.listener.getsockname()
        return f"{host}:{port}"

    def serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # stopped
            with connection:
                self.requests.append(_read_request(connection))

    def messages(self, method: str) -> list[str]:
        return [orjson.loads(body)["message"] if body else "" for line, body in self.requests if line.startswith(method)]


def _read_request(connection: socket.socket) -> tuple[str, bytes]:
    data = b""
    while b"\r\n\r\n" not in data and (chunk := connection.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)) and (chunk := connection.recv(65536)):
        body += chunk
    return head.split(b"\r\n", 1)[0].decode(), body


@contextmanager
def hanging_up_instance() -> Iterator[HangingUpInstance]:
    instance = HangingUpInstance(socket.create_server(("127.0.0.1", 0)))
    thread = threading.Thread(target=instance.serve, name="hanging-up-instance", daemon=True)
    thread.start()
    try:
        yield instance
    finally:
        instance.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        instance.listener.close()
        thread.join(timeout=5)


def test_a_request_that_reached_an_instance_is_not_sent_to_another(
    start_gateway: Any, fake: FakeLLM, tmp_path: Path
) -> None:
    fake.configure(tokens=3)
    with start_gateway() as gw, hanging_up_instance() as dying:

        def conf(listen: str) -> str:
            return render_instances(listen, [dying.address, host_port(gw)])

        # A POST is sent once: the instance that took it and died answers 502, however
        # many instances are alive, because the turn may have started there.
        with run_nginx(tmp_path / "posts", conf) as address:
            statuses = {
                f"post {n}": httpx.post(f"http://{address}/chat", json={"message": f"post {n}"}, timeout=10).status_code
                for n in range(4)
            }
        hung_up = dying.messages("POST")
        assert hung_up, f"nginx never chose the instance that hangs up: {statuses}"
        assert statuses == {message: 502 if message in hung_up else 200 for message in statuses}
        reached_upstream = {r["body"]["messages"][-1]["content"] for r in chat_records(fake)}
        assert reached_upstream == set(statuses) - set(hung_up)

        # A GET that died the same way is passed on to the next instance.
        with run_nginx(tmp_path / "gets", conf) as address:
            for _ in range(4):
                assert httpx.get(f"http://{address}/agents", timeout=10).status_code == 200
        assert dying.messages("GET"), "nginx never chose the instance that hangs up"
