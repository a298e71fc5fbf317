"""``chatgate serve`` starting up: which provider ``auto`` chooses and why, one line and
exit code 2 for every start-up failure, and "chatgate ready on URL" only once the socket
accepts connections. Real processes; every wait is a bounded poll."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from pydantic import AliasChoices
from websockets.asyncio.client import connect

from chatgate.config import Settings, load_settings
from chatgate.providers import choose_provider, needs_probe
from chatgate.providers.base import registered_providers
from chatgate.serve import url_of
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.frames import recv, send, until
from chatgate.testing.servers import FakeLLM, RedisServer, free_port, wait_until

START_BOUND_S = 60.0
READY_PREFIX = "chatgate ready on "
EMBEDDED_REASON = (
    "no upstream configured and none answered at http://127.0.0.1:11434: using the embedded model"
)


def chatgate_variables() -> set[str]:
    """The gateway's variables and every registered provider's."""
    names = {"CHATGATE_DATA_DIR"}
    models = [Settings, *(registration.settings for registration in registered_providers().values())]
    for model in models:
        for info in model.model_fields.values():
            if isinstance(info.validation_alias, AliasChoices):
                names.update(str(choice).upper() for choice in info.validation_alias.choices)
    return names


def environment(tmp_path: Path, **env: str) -> dict[str, str]:
    """This process's environment without any chatgate variable (OLLAMA_HOST included),
    then a memory store, the data folder in ``tmp_path`` and ``env``."""
    names = chatgate_variables()
    base = {k: v for k, v in os.environ.items() if k.upper() not in names}
    return {**base, "PYTHONUNBUFFERED": "1", "CHATGATE_STORE": "memory",
            "CHATGATE_DATA_DIR": str(tmp_path), **env}


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "chatgate", "serve", *args]


def record(line: str) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


@dataclass
class Served:
    """A running ``chatgate serve`` and the lines it has written so far (stdout and stderr)."""

    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def records(self) -> list[dict[str, Any]]:
        return [r for r in map(record, list(self.lines)) if r is not None]

    def ready_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if str(r.get("msg", "")).startswith(READY_PREFIX)]

    def wait_ready(self) -> dict[str, Any]:
        wait_until(
            lambda: self.ready_records() or self.process.poll() is not None,
            timeout=START_BOUND_S,
            what="the ready line",
        )
        ready = self.ready_records()
        assert ready, f"exited with {self.process.returncode}: {''.join(self.lines)}"
        return ready[0]

    def chosen(self) -> dict[str, Any]:
        chosen = [r for r in self.records() if r.get("msg") == "provider chosen"]
        assert len(chosen) == 1, self.lines
        return chosen[0]


@contextmanager
def served(tmp_path: Path, *args: str, port: int | None = None, **env: str) -> Iterator[Served]:
    """``python -m chatgate serve --port P ARGS`` with ``environment(tmp_path, **env)``;
    stopped (killed if need be) on the way out."""
    port = free_port() if port is None else port
    process = subprocess.Popen(
        serve_command("--port", str(port), *args),
        env=environment(tmp_path, **env),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = Served(process, port)

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            running.lines.append(line)

    reader = threading.Thread(target=read, name="chatgate-serve-output", daemon=True)
    reader.start()
    try:
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        reader.join(timeout=5)


def refused(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A ``chatgate serve`` expected to stop at once; should it start after all, the
    timeout ends it (subprocess.run kills it) and the test fails."""
    return subprocess.run(
        serve_command(*args),
        env=environment(tmp_path, **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chatgate: ")
    assert READY_PREFIX not in result.stdout + result.stderr
    return lines[0]


# --- which provider ``auto`` chooses -------------------------------------------------------


def test_configured_ollama_that_is_down_is_used_not_replaced(tmp_path: Path, closed_port_url: str) -> None:
    with served(tmp_path, OLLAMA_HOST=closed_port_url) as gw:
        ready = gw.wait_ready()
        assert ready["provider"] == "ollama"
        assert gw.chosen()["reason"] == "OLLAMA_HOST is set"
        health = httpx.get(f"{gw.url}/health", timeout=10)
        assert health.json()["status"] == "degraded"
        assert health.json()["checks"]["provider"]["name"] == "ollama"
        answer = httpx.post(f"{gw.url}/chat", json={"message": "hi"}, timeout=30)
        assert answer.status_code == 502, answer.text
        assert "reply" not in answer.json()


def test_ollama_url_alias_also_means_ollama(tmp_path: Path, closed_port_url: str) -> None:
    with served(tmp_path, OLLAMA_URL=closed_port_url) as gw:
        assert gw.wait_ready()["provider"] == "ollama"
        chosen = gw.chosen()
        assert (chosen["provider"], chosen["reason"]) == ("ollama", "OLLAMA_URL is set")


def test_ollama_that_answers_serves_the_chat(tmp_path: Path, fake: FakeLLM) -> None:
    with served(tmp_path, OLLAMA_HOST=fake.url) as gw:
        ready = gw.wait_ready()
        assert ready["msg"] == f"chatgate ready on {gw.url} (provider ollama, model llama3.2, store memory)"
        assert (ready["url"], ready["provider"], ready["model"], ready["store"]) == (
            gw.url, "ollama", "llama3.2", "memory",
        )
        answer = httpx.post(f"{gw.url}/chat", json={"message": "hi"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["reply"]
        assert fake.requests(), "the answer came from the upstream"


def test_explicit_provider_is_the_reason(tmp_path: Path, fake: FakeLLM) -> None:
    with served(tmp_path, CHATGATE_PROVIDER="ollama", OLLAMA_HOST=fake.url,
                CHATGATE_STORE=f"sqlite:///{tmp_path / 'gw.db'}") as gw:
        ready = gw.wait_ready()
        assert (ready["provider"], ready["store"]) == ("ollama", "sqlite")
        assert gw.chosen()["reason"] == "CHATGATE_PROVIDER=ollama"


@pytest.fixture
def clean_settings_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in chatgate_variables():
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.chdir(tmp_path)  # no .env but the test's own


@pytest.mark.usefixtures("clean_settings_environment")
def test_no_address_configured_asks_the_default_once_then_decides() -> None:
    settings = load_settings()
    assert needs_probe(settings)
    assert choose_provider(settings, True) == ("ollama", "Ollama answered at http://127.0.0.1:11434")
    assert choose_provider(settings, False) == ("local", EMBEDDED_REASON)


@pytest.mark.usefixtures("clean_settings_environment")
@pytest.mark.parametrize("variable", ["OLLAMA_HOST", "OLLAMA_URL"])
def test_a_configured_address_means_ollama_whether_or_not_it_answers(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "http://127.0.0.1:11434")  # even the default, when set
    settings = load_settings()
    assert not needs_probe(settings)
    for answers in (True, False):
        assert choose_provider(settings, answers) == ("ollama", f"{variable} is set")


@pytest.mark.usefixtures("clean_settings_environment")
def test_an_address_in_dotenv_or_an_override_counts_as_configured(tmp_path: Path) -> None:
    assert choose_provider(load_settings(ollama_host="gpu-box"), False) == ("ollama", "OLLAMA_HOST is set")
    (tmp_path / ".env").write_text("OLLAMA_HOST=gpu-box:11434\n", encoding="utf-8")
    assert choose_provider(load_settings(), False)[0] == "ollama"


@pytest.mark.usefixtures("clean_settings_environment")
@pytest.mark.parametrize(("variable", "name"), [("CHATGATE_PROVIDER", "local"), ("PROVIDER", "ollama")])
def test_a_named_provider_is_used_as_named(monkeypatch: pytest.MonkeyPatch, variable: str, name: str) -> None:
    monkeypatch.setenv(variable, name)
    monkeypatch.setenv("OLLAMA_HOST", "http://10.0.0.5:11434")
    settings = load_settings()
    assert not needs_probe(settings)
    assert choose_provider(settings, False) == (name, f"{variable}={name}")
    assert choose_provider(settings, True) == (name, f"{variable}={name}")


# --- start-up failures: one line, exit code 2 -------------------------------------------


def test_unknown_store_scheme_is_one_line(tmp_path: Path) -> None:
    line = assert_one_line(refused(tmp_path, "--port", str(free_port()), CHATGATE_STORE="postgres://x"))
    assert line.startswith("chatgate: configuration error: CHATGATE_STORE: unknown store scheme 'postgres'")
    assert "memory" in line and "sqlite" in line


@pytest.mark.parametrize(
    ("variable", "value"), [("OTEL_TRACES_EXPORTER", "zipkin"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]
)
def test_an_otel_value_chatgate_cannot_act_on_is_one_line(tmp_path: Path, variable: str, value: str) -> None:
    env = {variable: value, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    line = assert_one_line(refused(tmp_path, "--port", str(free_port()), **env))
    assert line.startswith(f"chatgate: configuration error: {variable}={value}: ")


def test_store_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    env = {"CHATGATE_STORE": f"sqlite:///{blocker / 'sub' / 'gw.db'}"}
    line = assert_one_line(refused(tmp_path, "--port", str(free_port()), **env))
    assert line.startswith("chatgate: configuration error: CHATGATE_STORE: cannot open the store ")


def test_default_store_in_an_unusable_data_dir_names_the_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    env = environment(tmp_path, CHATGATE_DATA_DIR=str(blocker / "data"))
    del env["CHATGATE_STORE"]
    result = subprocess.run(serve_command("--port", str(free_port())), env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert assert_one_line(result).startswith("chatgate: configuration error: CHATGATE_DATA_DIR: ")


def test_unusable_ollama_host_is_one_line_naming_it(tmp_path: Path) -> None:
    line = assert_one_line(refused(tmp_path, "--port", str(free_port()), OLLAMA_HOST="not a url::"))
    assert line.startswith("chatgate: configuration error: OLLAMA_HOST: ")


def test_port_in_use_is_one_line_and_never_ready(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = assert_one_line(refused(tmp_path, "--port", str(port)))
    assert line.startswith(f"chatgate: cannot listen on 127.0.0.1:{port}: ")


def write_failing_app(folder: Path) -> None:
    (folder / "failing_app.py").write_text(
        "import contextlib\n"
        "from fastapi import FastAPI\n\n"
        "@contextlib.asynccontextmanager\n"
        "async def lifespan(app):\n"
        "    raise RuntimeError('the store went away')\n"
        "    yield\n\n"
        "def make():\n"
        "    return FastAPI(lifespan=lifespan)\n",
        encoding="utf-8",
    )
    (folder / "run_failing_app.py").write_text(
        "import sys\n"
        "import uvicorn\n"
        "from chatgate.serve import bind, run\n\n"
        "if __name__ == '__main__':\n"
        "    config = uvicorn.Config('failing_app:make', factory=True, workers=int(sys.argv[1]),\n"
        "                            host='127.0.0.1', port=0, log_config=None)\n"
        "    sys.exit(run(config, bind('127.0.0.1', 0)))\n",
        encoding="utf-8",
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_failed_application_start_up_is_one_line(tmp_path: Path, workers: int) -> None:
    """What ``chatgate serve`` runs once its checks passed: when the application's own
    start-up raises, one line and exit code 2 (uvicorn alone would print the traceback
    and exit with 3; with several workers, each worker would say it)."""
    write_failing_app(tmp_path)
    env = environment(tmp_path, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "run_failing_app.py", str(workers)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert_one_line(result)
    assert result.stderr == "chatgate: start-up failed: RuntimeError: the store went away\n"


# --- ready ----------------------------------------------------------------------------


def test_ready_line_comes_once_the_port_accepts_connections(tmp_path: Path, fake: FakeLLM) -> None:
    with served(tmp_path, OLLAMA_HOST=fake.url) as gw:
        ready = gw.wait_ready()
        # No retry: the line is said only after the socket listens.
        socket.create_connection(("127.0.0.1", gw.port), timeout=5).close()
        assert ready["level"] == "info" and ready["logger"] == "chatgate"
        messages = [r.get("msg") for r in gw.records()]
        assert messages.index("provider chosen") < messages.index(ready["msg"])
        assert len(gw.ready_records()) == 1


def test_ready_line_names_this_machine_for_a_wildcard_bind(tmp_path: Path, fake: FakeLLM) -> None:
    with served(tmp_path, "--host", "0.0.0.0", OLLAMA_HOST=fake.url) as gw:
        ready = gw.wait_ready()
        assert ready["url"] == f"http://127.0.0.1:{gw.port}"
        assert ready["msg"].startswith(f"chatgate ready on http://127.0.0.1:{gw.port} (")


def test_several_workers_say_ready_once_and_serve(tmp_path: Path, fake: FakeLLM) -> None:
    store = f"sqlite:///{tmp_path}/workers.db"
    with served(tmp_path, "--workers", "2", OLLAMA_HOST=fake.url, CHATGATE_STORE=store) as gw:
        ready = gw.wait_ready()
        [warning] = [r for r in gw.records() if r.get("level") == "warning" and "workers" in r.get("msg", "")]
        assert "resumed or cancelled only" in warning["msg"]
        assert ready["url"] == gw.url
        answer = httpx.post(f"{gw.url}/chat", json={"message": "hi"}, timeout=30)
        assert answer.status_code == 200, answer.text
        wait_until(lambda: len([r for r in gw.records() if r.get("msg") == "provider chosen"]) == 2,
                   timeout=START_BOUND_S, what="both workers started")
        assert len(gw.ready_records()) == 1


async def test_several_workers_on_redis_resume_on_any_worker(
    tmp_path: Path, fake: FakeLLM, redis_server: RedisServer
) -> None:
    """With Redis, an answer started on one worker is resumed from a socket that the
    kernel handed to the other worker."""
    store = f"{redis_server.url}/12"
    redis.Redis.from_url(store).flushdb()
    fake.configure(tokens=150, tps=100)
    with served(tmp_path, "--workers", "2", OLLAMA_HOST=fake.url, CHATGATE_STORE=store) as gw:
        gw.wait_ready()
        wait_until(lambda: len([r for r in gw.records() if r.get("msg") == "provider chosen"]) == 2,
                   timeout=START_BOUND_S, what="both workers started")
        assert not [r for r in gw.records() if "resumed or cancelled only" in r.get("msg", "")]
        ws_url = gw.url.replace("http", "ws", 1) + "/ws"
        async with connect(ws_url) as ws:
            first = ws.response.headers["x-chatgate-instance"]
            await send(ws, {"type": "chat", "message": "a long one"})
            start = await recv(ws)
            received = [await recv(ws) for _ in range(3)]
        for _ in range(100):  # the kernel picks the worker; ask until the other one answers
            ws = await connect(ws_url)
            if ws.response.headers["x-chatgate-instance"] != first:
                break
            await ws.close()
        else:
            pytest.fail("every connection reached the same worker")
        async with ws:
            await send(ws, {"type": "resume", "id": start["id"], "after": received[-1]["seq"]})
            done, rest = await until(ws, "done")
    deltas = received + rest
    assert done["finish_reason"] == "stop"
    assert [f["seq"] for f in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(f["text"] for f in deltas) == fake_reply(150)


@pytest.mark.parametrize(
    ("host", "url"),
    [("0.0.0.0", "http://127.0.0.1:80"), ("", "http://127.0.0.1:80"), ("::", "http://[::1]:80"),
     ("::1", "http://[::1]:80"), ("localhost", "http://localhost:80"), ("10.1.2.3", "http://10.1.2.3:80")],
)
def test_url_of_a_bind_address(host: str, url: str) -> None:
    assert url_of(host, 80) == url


def test_several_workers_refuse_the_memory_store(tmp_path: Path) -> None:
    result = subprocess.run(
        serve_command("--port", str(free_port()), "--workers", "2"),
        env=environment(tmp_path), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "chatgate: configuration error: CHATGATE_WORKERS: 2 workers cannot share the memory store; "
        "use CHATGATE_STORE=sqlite:///path.db or redis://host:port/db"
    ]
