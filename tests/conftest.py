from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, async_playwright

from chatgate.testing.servers import (
    FakeLLM,
    RedisServer,
    RunningGateway,
    free_port,
    run_gateway,
    start_fake_llm,
    start_redis,
)

# Tests never read the developer's .env or data folder.
os.environ.pop("OLLAMA_HOST", None)


@pytest.fixture(scope="session")
def fake_llm_process() -> Iterator[FakeLLM]:
    fake = start_fake_llm()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, for the whole session."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake(fake_llm_process: FakeLLM) -> FakeLLM:
    """The fake upstream, reset to 40 instant tokens for each test."""
    fake_llm_process.reset()
    return fake_llm_process


@pytest.fixture
def closed_port_url() -> str:
    """An address where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


GatewayFactory = Callable[..., AbstractContextManager[RunningGateway]]


@pytest.fixture
def gateway_settings(fake: FakeLLM, tmp_path: Path) -> dict[str, Any]:
    return {
        "provider": "ollama",
        "ollama_host": fake.url,
        "model": "fake-model",
        "store": "memory",
        "data_dir": tmp_path,
        "resume_grace_s": 30.0,
    }


@pytest.fixture
def start_gateway(gateway_settings: dict[str, Any]) -> GatewayFactory:
    """``with start_gateway(**overrides) as gw:`` a real gateway on a free port."""

    def start(**overrides: Any) -> AbstractContextManager[RunningGateway]:
        return run_gateway(**{**gateway_settings, **overrides})

    return start


@pytest.fixture
def gw(start_gateway: GatewayFactory) -> Iterator[RunningGateway]:
    with start_gateway() as running:
        yield running


#: Headless Chromium for the page's tests: Debian's package, driven by Playwright, with
#: nothing that reaches beyond loopback (no QUIC, updates, sync or background fetches).
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A real Chromium (``./test.sh`` installs Debian's when it is missing)."""
    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is required (./test.sh installs it)"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()
