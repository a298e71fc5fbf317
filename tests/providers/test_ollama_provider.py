"""OllamaProvider against the fake upstream on loopback: chunks, options on the wire,
the error tree, early close, models and check; and OLLAMA_HOST normalisation."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from upstream import assert_ten_tokens_then_stop, collect, disconnected_at

from chatgate.providers._http import new_session
from chatgate.providers.base import (
    Chunk,
    ModelNotFound,
    ProviderHTTPError,
    ProviderRequest,
    ProviderStreamError,
    ProviderTimeout,
    ProviderUnavailable,
)
from chatgate.providers.ollama import OllamaProvider, OllamaSettings
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM
from chatgate.vocabulary import GenerationOptions

MESSAGES: list[Any] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "say hello to me"},
]


@pytest.fixture
def provider(fake: FakeLLM, session: aiohttp.ClientSession) -> OllamaProvider:
    return OllamaProvider(fake.url, session, default_model="fake-model")


def request(model: str = "fake-model", **options: Any) -> ProviderRequest:
    return ProviderRequest(MESSAGES, model, GenerationOptions(**options))


async def test_stream_yields_tokens_then_finish_and_usage(provider: OllamaProvider, fake: FakeLLM) -> None:
    fake.configure(tokens=10)
    chunks = await collect(provider, request())
    assert_ten_tokens_then_stop(chunks)
    body = fake.requests()[-1]["body"]
    assert body["model"] == "fake-model" and body["messages"] == MESSAGES and body["stream"] is True
    assert "options" not in body


async def test_max_tokens_becomes_num_predict_and_length(provider: OllamaProvider, fake: FakeLLM) -> None:
    chunks = await collect(provider, request(max_tokens=3))
    assert "".join(c.text for c in chunks) == fake_reply(3)
    assert chunks[-1].finish_reason == "length"
    assert fake.requests()[-1]["body"]["options"] == {"num_predict": 3}


async def test_options_are_mapped_to_ollama_names(provider: OllamaProvider, fake: FakeLLM) -> None:
    await collect(
        provider,
        request(temperature=0.25, num_ctx=2048, max_tokens=30, stop=("\n\n", "END"), seed=42, top_p=0.9),
    )
    assert fake.requests()[-1]["body"]["options"] == {
        "temperature": 0.25,
        "num_ctx": 2048,
        "num_predict": 30,
        "stop": ["\n\n", "END"],
        "seed": 42,
        "top_p": 0.9,
    }


async def test_request_options_win_over_provider_defaults(fake: FakeLLM, session: aiohttp.ClientSession) -> None:
    defaults = GenerationOptions(temperature=0.9, num_ctx=4096)
    provider = OllamaProvider(fake.url, session, default_model="fake-model", default_options=defaults)
    await collect(provider, request(temperature=0.1))
    assert fake.requests()[-1]["body"]["options"] == {"temperature": 0.1, "num_ctx": 4096}


async def test_missing_model_is_model_not_found(provider: OllamaProvider) -> None:
    with pytest.raises(ModelNotFound) as caught:
        await collect(provider, request("missing-model"))
    assert caught.value.status == 404 and caught.value.retryable is False
    assert "missing-model" in caught.value.message and caught.value.model == "missing-model"
    assert caught.value.provider == "ollama"


async def test_closed_port_is_unavailable(session: aiohttp.ClientSession, closed_port_url: str) -> None:
    provider = OllamaProvider(closed_port_url, session)
    with pytest.raises(ProviderUnavailable) as caught:
        await collect(provider, request())
    assert caught.value.retryable is True
    assert closed_port_url in caught.value.message
    with pytest.raises(ProviderUnavailable):
        await provider.check()
    with pytest.raises(ProviderUnavailable):
        await provider.models()


async def test_http_500_is_a_retryable_http_error(provider: OllamaProvider, fake: FakeLLM) -> None:
    fake.fault("http_500")
    with pytest.raises(ProviderHTTPError) as caught:
        await collect(provider, request())
    assert type(caught.value) is ProviderHTTPError
    assert caught.value.status == 500 and caught.value.retryable is True
    assert "injected failure" in caught.value.message


@pytest.mark.parametrize("kind", ["error_line", "drop"])
async def test_failure_mid_stream_is_a_stream_error(provider: OllamaProvider, fake: FakeLLM, kind: str) -> None:
    fake.fault(kind, after=4)
    chunks: list[Chunk] = []
    with pytest.raises(ProviderStreamError) as caught:
        await collect(provider, request(), chunks)
    assert "".join(c.text for c in chunks) == fake_reply(4)
    assert all(c.finish_reason is None for c in chunks)
    assert caught.value.retryable is True
    if kind == "error_line":
        assert "injected stream error" in caught.value.message


@pytest.mark.parametrize("after", [0, 2])
async def test_silent_upstream_times_out(fake: FakeLLM, after: int) -> None:
    fake.fault("hang", after=after)
    session = new_session(connect_timeout_s=2, read_timeout_s=0.3)
    try:
        provider = OllamaProvider(fake.url, session)
        chunks: list[Chunk] = []
        started = time.monotonic()
        with pytest.raises(ProviderTimeout) as caught:
            await collect(provider, request(), chunks)
        assert time.monotonic() - started < 3
    finally:
        await session.close()
    assert len(chunks) == after
    assert caught.value.retryable is True
    assert await disconnected_at(fake)


async def test_the_read_timeout_bounds_gaps_not_the_whole_answer(fake: FakeLLM) -> None:
    """Eight tokens 0.1 s apart take longer than the 0.3 s read timeout, yet never pause that long."""
    fake.configure(tokens=8, tps=10)
    session = new_session(connect_timeout_s=2, read_timeout_s=0.3)
    try:
        chunks: list[Chunk] = []
        started = time.monotonic()
        await collect(OllamaProvider(fake.url, session), request(), chunks)
    finally:
        await session.close()
    assert time.monotonic() - started > 0.6
    assert "".join(c.text for c in chunks) == fake_reply(8)
    assert chunks[-1].finish_reason == "stop"


async def test_closing_the_stream_early_closes_the_upstream_request(
    provider: OllamaProvider, fake: FakeLLM
) -> None:
    fake.configure(tokens=200, tps=20)
    stream = provider.stream(request())
    assert isinstance(stream, AsyncIterator)
    first = [await anext(stream), await anext(stream)]
    assert "".join(c.text for c in first) == fake_reply(2)
    closed_at = time.monotonic()
    await stream.aclose()  # type: ignore[attr-defined]
    assert await disconnected_at(fake) - closed_at < 0.2
    assert not fake.requests()[-1]["completed"]


async def test_models_lists_the_upstream_models(provider: OllamaProvider) -> None:
    assert await provider.models() == ["fake-model", "fake-backup"]


async def test_check_reports_version_and_address(provider: OllamaProvider, fake: FakeLLM) -> None:
    status = await provider.check()
    assert "0.6.0" in status and fake.url in status


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost", "http://localhost:11434"),
        ("0.0.0.0:11434", "http://127.0.0.1:11434"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("10.1.2.3:5000", "http://10.1.2.3:5000"),
        ("http://127.0.0.1:11434/", "http://127.0.0.1:11434"),
        (" http://ollama.lan:8080 ", "http://ollama.lan:8080"),
        ("ollama.lan/prefix", "http://ollama.lan:11434/prefix"),
        ("http://0.0.0.0:11434", "http://127.0.0.1:11434"),
        (":56789", "http://127.0.0.1:56789"),
        ("[::1]", "http://[::1]:11434"),
        ("[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_ollama_host_is_normalised(value: str, expected: str) -> None:
    assert OllamaSettings(ollama_host=value).ollama_host == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("https://ollama.example.com", "https://ollama.example.com"), ("http://ollama.lan", "http://ollama.lan")],
)
def test_ollama_host_with_a_scheme_keeps_that_scheme_default_port(value: str, expected: str) -> None:
    """As Ollama's own client reads OLLAMA_HOST: a scheme without a port means its port
    (443 behind a TLS proxy), not 11434."""
    assert OllamaSettings(ollama_host=value).ollama_host == expected
