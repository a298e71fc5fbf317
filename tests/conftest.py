from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

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
