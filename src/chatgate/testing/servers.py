"""Real servers on loopback for tests: the fake upstream as a subprocess, the gateway
in a background thread on a free port. Users may reuse these in their own tests."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from chatgate.app import create_app, server_options
from chatgate.config import Settings, load_settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Any, *, timeout: float, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


def stop_process(process: subprocess.Popen[Any]) -> None:
    """Terminate ``process``, killing it if it has not ended within 5 s."""
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class FakeLLM:
    """Handle on a running ``chatgate fake-llm`` process and its control API."""

    url: str
    process: subprocess.Popen[str]

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(method, self.url + path, json=body, timeout=5)
        response.raise_for_status()
        return response.json() if response.content else None

    def reset(self) -> None:
        self._control("POST", "/_fake/reset")

    def configure(self, **settings: Any) -> None:
        self._control("POST", "/_fake/config", settings)

    def fault(self, kind: str, *, after: int = 0, model: str | None = None, times: int = 1) -> None:
        fault: dict[str, Any] = {"kind": kind, "after": after}
        if model is not None:
            fault["model"] = model
        self._control("POST", "/_fake/faults", {"faults": [fault] * times})

    def requests(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self._control("GET", "/_fake/requests")["requests"]
        return records

    def stop(self) -> None:
        stop_process(self.process)


def start_fake_llm(*args: str) -> FakeLLM:
    """Start ``chatgate fake-llm --port 0 ARGS``; returns once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "chatgate", "fake-llm", "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on " not in line:
        process.kill()
        raise RuntimeError(f"fake-llm did not start: {line!r}")
    return FakeLLM(line.rsplit("listening on ", 1)[1].strip(), process)


@dataclass
class RedisServer:
    """A throwaway ``redis-server`` on a loopback port: no persistence, stopped by :meth:`stop`."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.process)


def start_redis(port: int | None = None) -> RedisServer:
    """Start ``redis-server`` on ``port`` (a free one by default); returns once it answers PING."""
    port = port or free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    try:
        wait_until(answers, timeout=15, what="redis-server")
    except BaseException:
        process.kill()
        raise
    return RedisServer(port, process)


@dataclass
class RunningGateway:
    url: str
    settings: Settings
    app: Any

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[4:]

    @property
    def gateway(self) -> Any:
        """The running :class:`chatgate.app.Gateway` (provider, store, service)."""
        return self.app.state.gateway


@contextmanager
def run_gateway(settings: Settings | None = None, **overrides: Any) -> Iterator[RunningGateway]:
    """Serve chatgate (uvicorn, httptools, websockets) on a free loopback port in a
    background thread, for the duration of the ``with`` block."""
    settings = settings or load_settings(**overrides)
    app = create_app(settings)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        loop="asyncio",
        **server_options(settings),
        lifespan="on",
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    thread = threading.Thread(target=serve, name="chatgate-test-server", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or errors or not thread.is_alive(), timeout=30, what="gateway start")
        if not server.started:
            raise RuntimeError(f"gateway did not start: {errors!r}")
        yield RunningGateway(f"http://127.0.0.1:{port}", settings, app)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@dataclass
class ServedProcess:
    """A ``chatgate serve`` process (see :func:`serve_process`)."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@contextmanager
def serve_process(env: dict[str, str], *args: str, ready_s: float = 30.0) -> Iterator[ServedProcess]:
    """``chatgate serve`` as a real process on a free port, with ``env`` added to this
    process's environment (``CHATGATE_*`` variables of the caller's own removed); ready
    once ``/health/live`` answers, stopped (killed if need be) on the way out."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CHATGATE_", "OLLAMA_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "chatgate", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        env={**base, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    served = ServedProcess(process, port)

    def live() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"chatgate serve exited with {process.returncode}")
        try:
            return httpx.get(f"{served.url}/health/live", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(live, timeout=ready_s, interval=0.05, what="chatgate serve ready")
        yield served
    finally:
        if process.poll() is None:
            stop_process(process)
