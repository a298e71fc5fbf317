"""OpenAIProvider against the fake upstream's ``/v1`` routes on loopback: chunks, options
on the wire, the error tree, early close, models and check; and ``api_base()``."""

from __future__ import annotations

import time
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
from chatgate.providers.openai import OpenAIProvider, api_base
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM
from chatgate.vocabulary import GenerationOptions

MESSAGES: list[Any] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "say hello to me"},
]


@pytest.fixture
def provider(fake: FakeLLM, session: aiohttp.ClientSession) -> OpenAIProvider:
    return OpenAIProvider(fake.url, "sk-test", session, default_model="fake-model")


def request(model: str = "fake-model", **options: Any) -> ProviderRequest:
    return ProviderRequest(MESSAGES, model, GenerationOptions(**options))


async def test_stream_yields_tokens_then_finish_and_usage(provider: OpenAIProvider, fake: FakeLLM) -> None:
    fake.configure(tokens=10)
    chunks = await collect(provider, request())
    assert_ten_tokens_then_stop(chunks)
    record = fake.requests()[-1]
    assert record["path"] == "/v1/chat/completions"
    body = record["body"]
    assert body["model"] == "fake-model" and body["messages"] == MESSAGES and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert not {"temperature", "max_tokens", "stop", "seed", "top_p"} & set(body)


async def test_max_tokens_is_sent_and_length_reported(provider: OpenAIProvider, fake: FakeLLM) -> None:
    chunks = await collect(provider, request(max_tokens=3))
    assert "".join(c.text for c in chunks) == fake_reply(3)
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_options_are_mapped_to_openai_names(provider: OpenAIProvider, fake: FakeLLM) -> None:
    await collect(
        provider,
        request(temperature=0.25, num_ctx=2048, max_tokens=30, stop=("\n\n", "END"), seed=42, top_p=0.9),
    )
    body = fake.requests()[-1]["body"]
    assert {k: body[k] for k in ("temperature", "max_tokens", "stop", "seed", "top_p")} == {
        "temperature": 0.25,
        "max_tokens": 30,
        "stop": ["\n\n", "END"],
        "seed": 42,
        "top_p": 0.9,
    }
    assert "num_ctx" not in body and "options" not in body
    assert body["stream_options"] == {"include_usage": True}


async def test_request_options_win_over_provider_defaults(fake: FakeLLM, session: aiohttp.ClientSession) -> None:
    defaults = GenerationOptions(temperature=0.9, max_tokens=20)
    provider = OpenAIProvider(fake.url, None, session, default_model="fake-model", default_options=defaults)
    await collect(provider, request(temperature=0.1))
    body = fake.requests()[-1]["body"]
    assert body["temperature"] == 0.1 and body["max_tokens"] == 20


async def test_missing_model_is_model_not_found(provider: OpenAIProvider) -> None:
    with pytest.raises(ModelNotFound) as caught:
        await collect(provider, request("missing-model"))
    assert caught.value.status == 404 and caught.value.retryable is False
    assert "missing-model" in caught.value.message and caught.value.model == "missing-model"


async def test_closed_port_is_unavailable(session: aiohttp.ClientSession, closed_port_url: str) -> None:
    provider = OpenAIProvider(closed_port_url, None, session)
    with pytest.raises(ProviderUnavailable) as caught:
        await collect(provider, request())
    assert caught.value.retryable is True
    with pytest.raises(ProviderUnavailable):
        await provider.check()


async def test_http_500_is_a_retryable_http_error(provider: OpenAIProvider, fake: FakeLLM) -> None:
    fake.fault("http_500")
    with pytest.raises(ProviderHTTPError) as caught:
        await collect(provider, request())
    assert type(caught.value) is ProviderHTTPError
    assert caught.value.status == 500 and caught.value.retryable is True
    assert "injected failure" in caught.value.message


@pytest.mark.parametrize("kind", ["error_line", "drop"])
async def test_failure_mid_stream_is_a_stream_error(provider: OpenAIProvider, fake: FakeLLM, kind: str) -> None:
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
        provider = OpenAIProvider(fake.url, None, session)
        chunks: list[Chunk] = []
        started = time.monotonic()
        with pytest.raises(ProviderTimeout) as caught:
            await collect(provider, request(), chunks)
        assert time.monotonic() - started < 3
        assert await disconnected_at(fake)
    finally:
        await session.close()
    assert len(chunks) == after
    assert caught.value.retryable is True


async def test_closing_the_stream_early_closes_the_upstream_request(
    provider: OpenAIProvider, fake: FakeLLM
) -> None:
    fake.configure(tokens=200, tps=20)
    stream = provider.stream(request())
    first = [await anext(stream), await anext(stream)]
    assert "".join(c.text for c in first) == fake_reply(2)
    closed_at = time.monotonic()
    await stream.aclose()  # type: ignore[attr-defined]
    assert await disconnected_at(fake) - closed_at < 0.2
    assert not fake.requests()[-1]["completed"]


async def test_models_lists_the_upstream_models(provider: OpenAIProvider) -> None:
    assert await provider.models() == ["fake-model", "fake-backup"]


async def test_check_reports_the_api_base(provider: OpenAIProvider, fake: FakeLLM) -> None:
    status = await provider.check()
    assert f"{fake.url}/v1" in status and "2 models" in status


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1"),
        ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
        ("https://api.openai.com/v1/", "https://api.openai.com/v1"),
        ("https://example.com/openai/v1", "https://example.com/openai/v1"),
        ("http://lmstudio.lan:1234/api/v0", "http://lmstudio.lan:1234/api/v0"),
    ],
)
def test_api_base(url: str, expected: str) -> None:
    assert api_base(url) == expected
