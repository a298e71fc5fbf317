"""Every line a gateway writes to stderr (not a terminal) is one JSON object: chatgate's
records, uvicorn's, warnings, and tracebacks, which go inside the object they belong to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from chatgate.testing.raw import connect, frame_header, read_until_closed, websocket_handshake
from chatgate.testing.servers import FakeLLM, free_port, wait_until


def records(stderr: str) -> list[dict[str, Any]]:
    """Each line of ``stderr`` as the JSON object it must be."""
    parsed = []
    for line in stderr.splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\n--- stderr ---\n{stderr}") from None
        assert isinstance(record, dict), line
        parsed.append(record)
    return parsed


def test_every_line_of_chatgate_serve_is_json(fake: FakeLLM, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CHATGATE_", "OLLAMA_"))}
    env = {**base, "PYTHONUNBUFFERED": "1", "CHATGATE_PROVIDER": "ollama", "OLLAMA_HOST": fake.url,
           "CHATGATE_MODEL": "fake-model", "CHATGATE_STORE": "memory", "CHATGATE_DATA_DIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "chatgate", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: _live(url, process), timeout=30, what="chatgate serve ready")
        # uvicorn's warning for a request that is not HTTP
        with connect(url) as sock:
            sock.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
            assert read_until_closed(sock, within_s=5).startswith(b"HTTP/1.1 400")
        # uvicorn's error, with its traceback, for a text frame that is not UTF-8
        with connect(url) as sock:
            assert websocket_handshake(sock, urlsplit(url).netloc, "/ws").startswith(b"HTTP/1.1 101")
            sock.sendall(frame_header(2) + b"\xff\xfe")
            read_until_closed(sock, within_s=5)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    logged = records(stderr)
    assert any(r["logger"] == "uvicorn.error" and r["msg"] == "Invalid HTTP request received." for r in logged)
    assert any(r["logger"] == "uvicorn.error" and "Traceback" in r.get("exc", "") for r in logged)
    assert any(r["msg"].startswith("chatgate ready on ") for r in logged)


def _live(url: str, process: subprocess.Popen[str]) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"chatgate serve exited with {process.returncode}")
    try:
        return httpx.get(f"{url}/health/live", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_warnings_and_uncaught_exceptions_are_json_lines() -> None:
    """What no logger writes, once logging is set up: a warning, an exception in a
    thread, and the one that ends the process."""
    program = textwrap.dedent(
        """
        import threading, warnings
        from chatgate.telemetry.logs import setup_logging

        setup_logging("info")
        warnings.warn("a warning", RuntimeWarning)
        thread = threading.Thread(target=lambda: 1 / 0, name="worker")
        thread.start()
        thread.join()
        raise RuntimeError("the end")
        """
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    logged = records(result.stderr)
    assert [r["level"] for r in logged] == ["warning", "error", "critical"], logged
    assert "a warning" in logged[0]["msg"]
    assert "ZeroDivisionError" in logged[1]["exc"] and logged[1]["thread_name"] == "worker"
    assert "RuntimeError: the end" in logged[2]["exc"]
