"""The README's run command, from a fresh clone: the gateway starts and the page answers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.sync.client import connect

from chatgate.testing.servers import free_port, wait_until

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("```", 2)[1]
    return [line.strip() for line in block.splitlines()[1:] if line.strip() and not line.startswith("#")]


def test_readme_opens_with_the_two_commands() -> None:
    assert readme_commands() == ["./run.sh", "./test.sh"]


def test_run_command_from_fresh_clone_serves_the_page(tmp_path: Path) -> None:
    # No upstream is configured: with nothing at Ollama's default address, the run command
    # serves the embedded model.
    with socket.socket() as probe:
        probe.settimeout(1)
        assert probe.connect_ex(("127.0.0.1", 11434)) != 0, "something listens on Ollama's default port"
    clone = tmp_path / "chatgate"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CHATGATE_", "VIRTUAL_ENV", "OLLAMA", "PYTHON"))
    }
    env.update(
        CHATGATE_PORT=str(port),
        CHATGATE_CONNECT_TIMEOUT_S="1",
        CHATGATE_DATA_DIR=str(tmp_path / "data"),
        CHATGATE_MAX_TOKENS="48",
    )
    log = (tmp_path / "run.log").open("w")
    process = subprocess.Popen(
        [readme_commands()[0]], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"run command exited: {(tmp_path / 'run.log').read_text()[-3000:]}")
        try:
            return httpx.get(url + "/health/live", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=900, interval=0.5, what="gateway from fresh clone")
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "<title>chatgate</title>" in page.text
        health = httpx.get(url + "/health").json()
        assert health["checks"]["provider"]["name"] == "local"
        with connect(f"ws://127.0.0.1:{port}/ws", origin=url) as ws:  # type: ignore[arg-type]
            ws.send(orjson.dumps({"type": "chat", "message": "Say hello."}).decode())
            frames = []
            while not frames or frames[-1]["type"] not in ("done", "error"):
                frames.append(orjson.loads(ws.recv(timeout=120)))
        assert frames[-1]["type"] == "done", frames[-1]
        assert any(f["type"] == "delta" and f["text"] for f in frames)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
