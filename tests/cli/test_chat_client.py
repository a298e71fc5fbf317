"""``chatgate chat`` as users run it: a subprocess against a real gateway and the fake
upstream; piped for exact plain output and exit codes, in a pseudo-terminal for the
rendered Markdown and Ctrl-C."""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import os
import pty
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway, free_port, wait_until

TOKENS = 5
ANSWER = fake_reply(TOKENS)
WAIT_S = 30.0


def chat(
    *args: str, cwd: Path, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``chatgate chat ARGS`` with stdin and stdout piped, none of this process's
    ``CHATGATE_*`` variables and no ``.env`` (run in an empty folder)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHATGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "chatgate", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**base, **(env or {})},
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], code: int, *expected: str) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chatgate chat: ")
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# --- piped: plain text, exactly ------------------------------------------------------------


def test_a_message_argument_prints_the_answer_and_a_newline(gw: RunningGateway, fake: FakeLLM, tmp_path: Path) -> None:
    fake.configure(tokens=TOKENS)
    result = chat("--url", gw.url, "Why", "is", "the", "sky", "blue?", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, ANSWER + "\n", "")
    assert fake.requests()[-1]["body"]["messages"][-1] == {"role": "user", "content": "Why is the sky blue?"}


def test_piped_lines_are_turns_of_one_conversation(start_gateway: Any, fake: FakeLLM, tmp_path: Path) -> None:
    fake.configure(tokens=TOKENS)
    with start_gateway(store=f"sqlite:///{tmp_path}/chat.db") as gw:
        result = chat("--url", gw.url, cwd=tmp_path, stdin="one\ntwo\n\nthree\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, (ANSWER + "\n") * 3, "")
    turns = [r["body"]["messages"] for r in fake.requests()]
    assert [m[-1]["content"] for m in turns] == ["one", "two", "three"]
    assert [m for m in turns[-1] if m["role"] != "system"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "three"},
    ]


def test_stdin_as_one_sends_the_whole_input_as_one_message(gw: RunningGateway, fake: FakeLLM, tmp_path: Path) -> None:
    fake.configure(tokens=TOKENS)
    result = chat("--url", gw.url, "--stdin-as-one", cwd=tmp_path, stdin="first line\nsecond line\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, ANSWER + "\n", "")
    assert len(fake.requests()) == 1
    assert fake.requests()[0]["body"]["messages"][-1]["content"] == "first line\nsecond line"


# --- where the gateway is ------------------------------------------------------------------


def test_chatgate_url_is_used(gw: RunningGateway, fake: FakeLLM, tmp_path: Path) -> None:
    fake.configure(tokens=TOKENS)
    result = chat("hi", cwd=tmp_path, env={"CHATGATE_URL": gw.url + "/"})
    assert (result.returncode, result.stdout) == (0, ANSWER + "\n"), result.stderr


@pytest.mark.parametrize(
    "variables",
    [{"CHATGATE_PORT": "{port}"}, {"GATEWAY_PORT": "{port}", "CHATGATE_HOST": "0.0.0.0"}],
    ids=["CHATGATE_PORT", "GATEWAY_PORT-and-wildcard-host"],
)
def test_without_a_url_the_serve_settings_find_the_gateway(
    gw: RunningGateway, fake: FakeLLM, tmp_path: Path, variables: dict[str, str]
) -> None:
    fake.configure(tokens=TOKENS)
    port = gw.url.rsplit(":", 1)[1]
    env = {name: value.format(port=port) for name, value in variables.items()}
    result = chat("hi", cwd=tmp_path, env=env)
    assert (result.returncode, result.stdout) == (0, ANSWER + "\n"), result.stderr


def test_the_port_in_dot_env_is_read_like_serve_reads_it(gw: RunningGateway, fake: FakeLLM, tmp_path: Path) -> None:
    fake.configure(tokens=TOKENS)
    (tmp_path / ".env").write_text(f"CHATGATE_PORT={gw.url.rsplit(':', 1)[1]}\n")
    result = chat("hi", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, ANSWER + "\n"), result.stderr


# --- failures: one line, a code each ----------------------------------------------------------


def test_an_unreachable_gateway_is_exit_3_naming_the_url_and_its_source(closed_port_url: str, tmp_path: Path) -> None:
    result = chat("--url", closed_port_url, "hi", cwd=tmp_path)
    assert_one_error_line(result, 3, closed_port_url, "from --url", "connection refused")
    assert "Traceback" not in result.stderr

    port = closed_port_url.rsplit(":", 1)[1]
    result = chat("hi", cwd=tmp_path, env={"CHATGATE_PORT": port})
    assert_one_error_line(result, 3, f"http://127.0.0.1:{port}", "from CHATGATE_PORT")


def test_a_wrong_setting_is_exit_2(tmp_path: Path) -> None:
    result = chat("hi", cwd=tmp_path, env={"CHATGATE_PORT": "not-a-port"})
    assert_one_error_line(result, 2, "CHATGATE_PORT")
    result = chat("--url", "ftp://example", "hi", cwd=tmp_path)
    assert_one_error_line(result, 2, "ftp://example")


def test_a_gateway_with_keys_is_exit_4_without_a_valid_one(start_gateway: Any, fake: FakeLLM, tmp_path: Path) -> None:
    fake.configure(tokens=TOKENS)
    with start_gateway(api_keys="k1") as gw:
        without = chat("--url", gw.url, "hi", cwd=tmp_path)
        wrong = chat("--url", gw.url, "--key", "nope", "hi", cwd=tmp_path)
        right = chat("--url", gw.url, "one", cwd=tmp_path, env={"CHATGATE_API_KEY": "k1"})
        piped = chat("--url", gw.url, "--key", "k1", cwd=tmp_path, stdin="a\nb\n")
    for result in (without, wrong):
        assert_one_error_line(result, 4, "unauthorized", "set --key or CHATGATE_API_KEY")
    assert (right.returncode, right.stdout, right.stderr) == (0, ANSWER + "\n", "")
    assert (piped.returncode, piped.stdout) == (0, (ANSWER + "\n") * 2), piped.stderr
    assert [r["body"]["messages"][-1]["content"] for r in fake.requests()] == ["one", "a", "b"]


def test_a_rate_limit_is_exit_5_saying_when_to_retry(start_gateway: Any, fake: FakeLLM, tmp_path: Path) -> None:
    fake.configure(tokens=TOKENS)
    with start_gateway(rate_limit="1/minute") as gw:
        first = chat("--url", gw.url, "hi", cwd=tmp_path)
        second = chat("--url", gw.url, "hi", cwd=tmp_path)
    assert (first.returncode, first.stdout) == (0, ANSWER + "\n"), first.stderr
    line = assert_one_error_line(second, 5, "rate limited")
    assert re.search(r"retry (in|after) \d", line), line


def test_an_upstream_failure_is_exit_6(gw: RunningGateway, fake: FakeLLM, tmp_path: Path) -> None:
    fake.fault("http_500", times=10)
    result = chat("--url", gw.url, "hi", cwd=tmp_path)
    assert_one_error_line(result, 6)


class DroppingProxy:
    """A TCP relay to the gateway whose connections a test can cut, as a network does."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted = 0
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._open += [client, upstream]
            self.accepted += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_relay, args=(source, sink), daemon=True).start()

    def drop(self) -> None:
        for each in self._open:
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
        self._open.clear()

    def close(self) -> None:
        self.drop()
        self.listener.close()


def _relay(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_RDWR)


def test_a_dropped_connection_is_resumed_without_text_twice(gw: RunningGateway, fake: FakeLLM, tmp_path: Path) -> None:
    tokens = 60
    fake.configure(tokens=tokens, tps=30)  # two seconds of answer
    proxy = DroppingProxy(int(gw.url.rsplit(":", 1)[1]))
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHATGATE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "chatgate", "chat", "--url", proxy.url, "hi"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=base,
    )
    assert process.stdout is not None
    try:
        seen = process.stdout.read(len("Hello from the fake"))
        proxy.drop()
        rest, errors = process.communicate(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
        proxy.close()
    assert process.returncode == 0, errors
    assert (seen + rest).decode() == fake_reply(tokens) + "\n"
    assert proxy.accepted >= 2  # it reconnected
    assert len(fake.requests()) == 1  # and resumed the answer rather than asking again


# --- in a terminal -------------------------------------------------------------------------

_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\x1b[=>]")


class Terminal:
    """``chatgate chat`` on a pseudo-terminal that is its controlling terminal, so a
    written Ctrl-C is a SIGINT from the terminal, as when a user presses it."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        base = {k: v for k, v in os.environ.items() if not k.startswith("CHATGATE_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "chatgate", "chat", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env={**base, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"},
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(slave)
        self.raw = b""

    @property
    def screen(self) -> str:
        """What was written so far, without escape sequences or carriage returns."""
        return _ESCAPES.sub("", self.raw.decode(errors="replace")).replace("\r", "")

    def wait_for(self, found: Callable[[str], bool], *, what: str, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not found(self.screen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what} not on the terminal within {timeout} s:\n{self.screen[-2000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    raise TimeoutError(f"{what}: the client ended:\n{self.screen[-2000:]}") from None

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.kill()
        code = self.process.wait(timeout=10)
        os.close(self.master)
        return code


def _take_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def open_terminal(*args: str) -> Terminal:
        opened.append(Terminal(*args, cwd=tmp_path))
        return opened[-1]

    yield open_terminal
    for each in opened:
        each.close()


MARKDOWN_PIECES = ["# Weather ", "report\n\n", "The sky is **very ", "blue** today.\n\n", "- one\n- two\n"]


class _MarkdownUpstream(http.server.BaseHTTPRequestHandler):
    """An Ollama ``/api/chat`` that streams :data:`MARKDOWN_PIECES` as NDJSON."""

    protocol_version = "HTTP/1.0"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        for piece in MARKDOWN_PIECES:
            line = {"model": "md", "message": {"role": "assistant", "content": piece}, "done": False}
            self.wfile.write(orjson.dumps(line) + b"\n")
            self.wfile.flush()
        end = {"model": "md", "message": {"role": "assistant", "content": ""}, "done": True,
               "done_reason": "stop", "prompt_eval_count": 1, "eval_count": len(MARKDOWN_PIECES)}
        self.wfile.write(orjson.dumps(end) + b"\n")

    def do_GET(self) -> None:
        body = orjson.dumps({"models": [{"name": "md", "model": "md"}]} if self.path == "/api/tags" else {"version": "0"})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def markdown_gateway(start_gateway: Any) -> Iterator[RunningGateway]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _MarkdownUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with start_gateway(ollama_host=f"http://127.0.0.1:{server.server_port}", model="md") as gw:
            yield gw
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_a_terminal_shows_the_answer_as_rendered_markdown(
    markdown_gateway: RunningGateway, terminal: Callable[..., Terminal]
) -> None:
    term = terminal("--url", markdown_gateway.url)
    term.wait_for(lambda s: "you>" in s, what="the prompt")
    term.type("weather?\r")
    term.wait_for(lambda s: "today." in s and s.count("you>") == 2, what="the answer, then the prompt")
    answer = term.screen.split("weather?", 1)[1]
    assert "Weather report" in answer and "very blue" in answer
    assert "# Weather" not in answer and "**" not in answer and "- one" not in answer
    assert "\x1b[1m" in term.raw.decode()  # bold, as an escape code rather than asterisks
    term.type("\x04")
    assert term.process.wait(timeout=10) == 0


def test_piped_output_of_markdown_stays_the_raw_text(markdown_gateway: RunningGateway, tmp_path: Path) -> None:
    result = chat("--url", markdown_gateway.url, "weather?", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "".join(MARKDOWN_PIECES) + "\n"), result.stderr
    assert "\x1b" not in result.stdout


def test_ctrl_c_stops_the_answer_and_keeps_the_prompt(
    gw: RunningGateway, fake: FakeLLM, terminal: Callable[..., Terminal]
) -> None:
    fake.configure(tokens=2000, tps=20)  # 100 s unless stopped
    term = terminal("--url", gw.url)
    term.wait_for(lambda s: "you>" in s, what="the prompt")
    term.type("tell me everything\r")
    term.wait_for(lambda s: "fake model streaming" in s, what="the answer's first words")
    term.type("\x03")
    term.wait_for(lambda s: "(stopped)" in s and s.count("you>") == 2, what="the answer stopped, the prompt back")
    record = wait_until(lambda: fake.requests()[-1]["disconnected_at"] and fake.requests()[-1], timeout=10,
                        what="the upstream request closed")
    assert record["body"]["messages"][-1]["content"] == "tell me everything"

    fake.configure(tokens=TOKENS, tps=0)
    term.type("and now?\r")
    term.wait_for(lambda s: s.count("you>") == 3, what="the next answer, then the prompt")
    assert ANSWER in term.screen.split("and now?", 1)[1]
    assert len(fake.requests()) == 2
    assert term.process.poll() is None
    term.type("\x03")
    assert term.process.wait(timeout=10) == 130


def test_the_prompt_commands(gw: RunningGateway, fake: FakeLLM, terminal: Callable[..., Terminal]) -> None:
    fake.configure(tokens=TOKENS)
    term = terminal("--url", gw.url)
    prompts = 1

    def run(line: str) -> str:
        nonlocal prompts
        before = len(term.screen)
        term.type(line + "\r")
        prompts += 1
        term.wait_for(lambda s: s.count("you>") == prompts, what=f"the prompt after {line!r}")
        return term.screen[before:]

    term.wait_for(lambda s: "you>" in s, what="the prompt")
    assert ANSWER in run("first question")
    shown = run("/history")
    assert "first question" in shown and ANSWER in shown
    assert "history cleared" in run("/clear")
    assert "first question" not in run("/history")
    run("second question")
    assert [m["content"] for m in fake.requests()[-1]["body"]["messages"] if m["role"] != "system"] == [
        "second question"
    ]
    run("/new")
    run("third question")
    assert [m["role"] for m in fake.requests()[-1]["body"]["messages"] if m["role"] != "system"] == ["user"]
    assert "no agent nope" in run("/agent nope") and "general" in run("/agent")
    run("/model other-model")
    run("fourth question")
    assert fake.requests()[-1]["body"]["model"] == "other-model"
    assert "/history" in run("/help")
    term.type("/quit\r")
    assert term.process.wait(timeout=10) == 0
