"""GeminiProvider against the fake upstream's ``/v1beta`` routes on loopback: the request
exactly as Gemini receives it, chunks, usage, finish reasons, the error tree, early close,
models and check; its configuration; and one chat through a gateway configured for Gemini."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import httpx
import pytest
from upstream import assert_ten_tokens_then_stop, collect, disconnected_at

from chatgate.chat.agents import GENERAL_PROMPT
from chatgate.config import ConfigError, load_settings
from chatgate.providers import build_named_provider, configuration_problem
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
from chatgate.providers.gemini import DEFAULT_MODEL, GeminiProvider, GeminiSettings, api_root
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM
from chatgate.vocabulary import GenerationOptions

STREAM_PATH = "/v1beta/models/gemini-test:streamGenerateContent"
MESSAGES: list[Any] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "say hello to me"},
]
HISTORY: list[Any] = [
    {"role": "system", "content": "be brief"},
    {"role": "system", "content": "answer in English"},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"},
]


@pytest.fixture
def provider(fake: FakeLLM, session: aiohttp.ClientSession) -> GeminiProvider:
    return GeminiProvider(fake.url, "test-key", session, default_model="gemini-test")


def request(model: str = "gemini-test", messages: list[Any] = MESSAGES, **options: Any) -> ProviderRequest:
    return ProviderRequest(messages, model, GenerationOptions(**options))


async def test_stream_yields_tokens_then_finish_and_usage(provider: GeminiProvider, fake: FakeLLM) -> None:
    fake.configure(tokens=10)
    chunks = await collect(provider, request())
    assert_ten_tokens_then_stop(chunks)
    record = fake.requests()[-1]
    assert record["path"] == STREAM_PATH
    assert record["body"] == {
        "contents": [{"role": "user", "parts": [{"text": "say hello to me"}]}],
        "systemInstruction": {"parts": [{"text": "be brief"}]},
    }


async def test_history_becomes_user_and_model_turns_and_one_system_instruction(
    provider: GeminiProvider, fake: FakeLLM
) -> None:
    await collect(provider, request(messages=HISTORY))
    assert fake.requests()[-1]["body"] == {
        "contents": [
            {"role": "user", "parts": [{"text": "first question"}]},
            {"role": "model", "parts": [{"text": "first answer"}]},
            {"role": "user", "parts": [{"text": "second question"}]},
        ],
        "systemInstruction": {"parts": [{"text": "be brief\n\nanswer in English"}]},
    }


async def test_without_a_system_message_there_is_no_system_instruction(
    provider: GeminiProvider, fake: FakeLLM
) -> None:
    await collect(provider, request(messages=[{"role": "user", "content": "hi"}]))
    assert fake.requests()[-1]["body"] == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


async def test_options_are_mapped_to_generation_config(provider: GeminiProvider, fake: FakeLLM) -> None:
    await collect(
        provider,
        request(temperature=0.25, num_ctx=2048, max_tokens=30, stop=("\n\n", "END"), seed=42, top_p=0.9),
    )
    assert fake.requests()[-1]["body"]["generationConfig"] == {
        "temperature": 0.25,
        "maxOutputTokens": 30,
        "topP": 0.9,
        "stopSequences": ["\n\n", "END"],
        "seed": 42,
    }


async def test_request_options_win_over_provider_defaults(fake: FakeLLM, session: aiohttp.ClientSession) -> None:
    defaults = GenerationOptions(temperature=0.9, max_tokens=100)
    provider = GeminiProvider(fake.url, "test-key", session, default_model="gemini-test", default_options=defaults)
    await collect(provider, request(temperature=0.1))
    assert fake.requests()[-1]["body"]["generationConfig"] == {"temperature": 0.1, "maxOutputTokens": 100}


async def test_max_tokens_finish_is_length(provider: GeminiProvider, fake: FakeLLM) -> None:
    chunks = await collect(provider, request(max_tokens=3))
    assert "".join(c.text for c in chunks) == fake_reply(3)
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_model_defaults_to_the_provider_default_and_accepts_the_models_prefix(
    provider: GeminiProvider, fake: FakeLLM
) -> None:
    await collect(provider, request(model=""))
    await collect(provider, request(model="models/gemini-test"))
    assert [r["path"] for r in fake.requests()] == [STREAM_PATH, STREAM_PATH]


async def test_safety_finish_is_a_final_stream_error_after_the_text(provider: GeminiProvider, fake: FakeLLM) -> None:
    fake.configure(tokens=4)
    chunks: list[Chunk] = []
    with pytest.raises(ProviderStreamError) as caught:
        await collect(provider, request("blocked-model"), chunks)
    assert "".join(c.text for c in chunks) == fake_reply(4)
    assert "SAFETY" in caught.value.message
    assert caught.value.retryable is False


async def test_missing_key_is_a_final_403(fake: FakeLLM, session: aiohttp.ClientSession) -> None:
    provider = GeminiProvider(fake.url, "", session, default_model="gemini-test")
    with pytest.raises(ProviderHTTPError) as caught:
        await collect(provider, request())
    assert caught.value.status == 403 and caught.value.retryable is False
    assert "PERMISSION_DENIED" in caught.value.message and "API Key" in caught.value.message
    with pytest.raises(ProviderHTTPError):
        await provider.models()


async def test_invalid_key_is_a_final_400(fake: FakeLLM, session: aiohttp.ClientSession) -> None:
    provider = GeminiProvider(fake.url, "invalid-key", session, default_model="gemini-test")
    with pytest.raises(ProviderHTTPError) as caught:
        await collect(provider, request())
    assert type(caught.value) is ProviderHTTPError
    assert caught.value.status == 400 and caught.value.retryable is False
    assert "API key not valid" in caught.value.message


async def test_missing_model_is_model_not_found(provider: GeminiProvider) -> None:
    with pytest.raises(ModelNotFound) as caught:
        await collect(provider, request("missing-model"))
    assert caught.value.status == 404 and caught.value.retryable is False
    assert "missing-model" in caught.value.message and caught.value.model == "missing-model"
    assert caught.value.provider == "gemini"


async def test_closed_port_is_unavailable(session: aiohttp.ClientSession, closed_port_url: str) -> None:
    provider = GeminiProvider(closed_port_url, "test-key", session)
    with pytest.raises(ProviderUnavailable) as caught:
        await collect(provider, request())
    assert caught.value.retryable is True
    with pytest.raises(ProviderUnavailable):
        await provider.check()


async def test_http_500_is_a_retryable_http_error(provider: GeminiProvider, fake: FakeLLM) -> None:
    fake.fault("http_500")
    with pytest.raises(ProviderHTTPError) as caught:
        await collect(provider, request())
    assert type(caught.value) is ProviderHTTPError
    assert caught.value.status == 500 and caught.value.retryable is True
    assert "INTERNAL" in caught.value.message and "injected failure" in caught.value.message


@pytest.mark.parametrize("kind", ["error_line", "drop"])
async def test_failure_mid_stream_is_a_stream_error(provider: GeminiProvider, fake: FakeLLM, kind: str) -> None:
    fake.fault(kind, after=4)
    chunks: list[Chunk] = []
    with pytest.raises(ProviderStreamError) as caught:
        await collect(provider, request(), chunks)
    assert "".join(c.text for c in chunks) == fake_reply(4)
    assert all(c.finish_reason is None for c in chunks)
    assert caught.value.retryable is True
    if kind == "error_line":
        assert caught.value.message == "gemini: INTERNAL: injected stream error"


async def test_silent_upstream_times_out(fake: FakeLLM) -> None:
    fake.fault("hang", after=2)
    session = new_session(connect_timeout_s=2, read_timeout_s=0.3)
    try:
        provider = GeminiProvider(fake.url, "test-key", session)
        chunks: list[Chunk] = []
        with pytest.raises(ProviderTimeout):
            await collect(provider, request(), chunks)
    finally:
        await session.close()
    assert len(chunks) == 2
    assert await disconnected_at(fake)


async def test_closing_the_stream_early_closes_the_upstream_request(provider: GeminiProvider, fake: FakeLLM) -> None:
    fake.configure(tokens=200, tps=20)
    stream = provider.stream(request())
    first = [await anext(stream), await anext(stream)]
    assert "".join(c.text for c in first) == fake_reply(2)
    closed_at = time.monotonic()
    await stream.aclose()  # type: ignore[attr-defined]
    assert await disconnected_at(fake) - closed_at < 0.2
    assert not fake.requests()[-1]["completed"]


async def test_models_are_the_generating_ones_without_prefix(provider: GeminiProvider, fake: FakeLLM) -> None:
    assert await provider.models() == ["fake-model", "fake-backup"]  # not the embedding model
    status = await provider.check()
    assert "gemini" in status and fake.url in status and "2 models" in status


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://generativelanguage.googleapis.com", "https://generativelanguage.googleapis.com/v1beta"),
        ("https://generativelanguage.googleapis.com/", "https://generativelanguage.googleapis.com/v1beta"),
        ("http://proxy.lan/gemini", "http://proxy.lan/gemini/v1beta"),
        ("http://proxy.lan/v1", "http://proxy.lan/v1"),
        ("http://proxy.lan/v1beta/", "http://proxy.lan/v1beta"),
    ],
)
def test_api_root(url: str, expected: str) -> None:
    assert api_root(url) == expected


def test_configuration_needs_an_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(provider="gemini")
    assert configuration_problem(settings) == "GEMINI_API_KEY: required when CHATGATE_PROVIDER=gemini"
    with pytest.raises(ConfigError, match=r"^GEMINI_API_KEY: required"):
        build_named_provider("gemini", settings, None)  # refused before the session is needed
    assert configuration_problem(load_settings(provider="ollama")) is None, "only the chosen one needs it"
    monkeypatch.setenv("GOOGLE_API_KEY", "from-google-name")
    settings = load_settings(provider="gemini")
    assert configuration_problem(settings) is None
    assert settings.upstream(GeminiSettings).api_key() == "from-google-name"


async def test_factory_reads_the_settings(session: aiohttp.ClientSession) -> None:
    settings = load_settings(provider="gemini", gemini_api_key="k", gemini_base_url="http://gemini.lan:9000")
    provider = build_named_provider("gemini", settings, session)
    assert isinstance(provider, GeminiProvider)
    assert provider.default_model == DEFAULT_MODEL == "gemini-2.0-flash"
    assert provider.base_url == "http://gemini.lan:9000/v1beta"
    named = build_named_provider("gemini", load_settings(gemini_api_key="k", model="gemini-x"), session)
    assert named.default_model == "gemini-x"


def test_gateway_chats_through_gemini(start_gateway: Any, fake: FakeLLM) -> None:
    fake.configure(tokens=12)
    with start_gateway(provider="gemini", gemini_base_url=fake.url, gemini_api_key="test-key", model="gemini-test") as gw:
        response = httpx.post(f"{gw.url}/chat", json={"message": "Hello there"}, timeout=10)
        assert response.status_code == 200, response.text
        reply = response.json()
        assert reply["reply"] == fake_reply(12)
        assert reply["provider"] == "gemini" and reply["model"] == "gemini-test"
        follow_up = httpx.post(
            f"{gw.url}/chat",
            json={"message": "And again", "conversation_id": reply["conversation_id"]},
            timeout=10,
        )
        assert follow_up.status_code == 200, follow_up.text
    first, second = [r for r in fake.requests() if r["path"] == STREAM_PATH]
    assert first["body"]["systemInstruction"] == {"parts": [{"text": GENERAL_PROMPT}]}
    assert first["body"]["contents"] == [{"role": "user", "parts": [{"text": "Hello there"}]}]
    assert second["body"]["contents"] == [
        {"role": "user", "parts": [{"text": "Hello there"}]},
        {"role": "model", "parts": [{"text": fake_reply(12)}]},
        {"role": "user", "parts": [{"text": "And again"}]},
    ]
