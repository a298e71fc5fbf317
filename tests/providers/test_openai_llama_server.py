"""The OpenAI-compatible provider against a real llama.cpp server on loopback,
serving the same embedded SmolLM2 model the local provider uses."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from chatgate.providers._http import new_session
from chatgate.providers.base import ProviderRequest
from chatgate.providers.local import default_model_path
from chatgate.providers.openai import OpenAIProvider
from chatgate.vocabulary import GenerationOptions, OutputFormat

pytestmark = pytest.mark.slow

STARTUP_BOUND_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def models_answer(base_url: str) -> list[str] | None:
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=2) as response:
            return [model["id"] for model in json.load(response)["data"]]
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", default_model_path(),
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_BOUND_S
        while models_answer(base_url) is None:
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited {process.returncode}:\n{tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not answering after {STARTUP_BOUND_S:.0f}s")
            time.sleep(0.2)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest_asyncio.fixture
async def provider(llama_server: str) -> AsyncIterator[OpenAIProvider]:
    session = new_session(connect_timeout_s=5.0, read_timeout_s=60.0)
    try:
        yield OpenAIProvider(
            llama_server, None, session, default_model=Path(default_model_path()).stem
        )
    finally:
        await session.close()


async def test_lists_the_served_model(provider: OpenAIProvider) -> None:
    models = await provider.models()
    assert models == [default_model_path()]
    await provider.check()


async def test_streams_an_answer(provider: OpenAIProvider) -> None:
    request = ProviderRequest(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        model="",
        options=GenerationOptions(max_tokens=48, temperature=0),
    )
    chunks = [chunk async for chunk in provider.stream(request)]
    *texts, final = chunks
    assert len(texts) >= 5
    assert all(chunk.text for chunk in texts)
    assert final.finish_reason in ("stop", "length")
    print(f"\nllama_cpp.server answered: {''.join(c.text for c in texts)!r} ({final.usage})")


async def test_json_mode_reaches_llama_cpp_and_the_answer_parses(provider: OpenAIProvider) -> None:
    """``json_object`` only: llama-cpp-python's server refuses OpenAI's ``json_schema``
    (it takes a schema in its own extension of ``json_object``)."""
    request = ProviderRequest(
        messages=[{"role": "user", "content": "Give the capital of France as a JSON object."}],
        model="",
        options=GenerationOptions(max_tokens=48, temperature=0),
        output=OutputFormat("json"),
    )
    chunks = [chunk async for chunk in provider.stream(request)]
    assert isinstance(json.loads("".join(chunk.text for chunk in chunks)), dict)
