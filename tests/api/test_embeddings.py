"""Embeddings through the gateway: ``/v1/embeddings`` with the ``openai`` package, ``/api/embed``
and ``/api/embeddings`` with the ``ollama`` package, against each HTTP upstream's fake."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest
from openai import AsyncOpenAI

from chatgate.chat.agents import AgentRegistry
from chatgate.chat.events import ChatError
from chatgate.chat.limits import LocalLimits, RateLimiter
from chatgate.chat.service import ChatService
from chatgate.providers.base import EmbeddingsUnsupported
from chatgate.providers.local import LocalProvider
from chatgate.store.base import StoreLimits
from chatgate.store.memory import MemoryStore
from chatgate.testing.fake_embeddings import fake_vector
from chatgate.testing.providers import StubProvider
from chatgate.testing.servers import FakeLLM, RunningGateway

TEXTS = ["the first text", "a second one"]


def last_request(fake: FakeLLM) -> dict[str, Any]:
    request: dict[str, Any] = fake.requests()[-1]
    return request


@pytest.fixture
async def openai_client(gw: RunningGateway) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=10) as client:
        yield client


@pytest.fixture
def ollama_client(gw: RunningGateway) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=gw.url, timeout=10)


async def test_openai_default_encoding_is_base64_and_decodes_to_the_vectors(
    openai_client: AsyncOpenAI, fake: FakeLLM
) -> None:
    result = await openai_client.embeddings.create(model="fake-model", input=TEXTS)
    assert [item.embedding for item in result.data] == [fake_vector(text) for text in TEXTS]
    assert [item.index for item in result.data] == [0, 1]
    assert result.usage.prompt_tokens == 6
    assert last_request(fake)["path"] == "/api/embed"
    assert last_request(fake)["body"] == {"model": "fake-model", "input": TEXTS}


async def test_openai_float_encoding(openai_client: AsyncOpenAI) -> None:
    result = await openai_client.embeddings.create(model="fake-model", input="one text", encoding_format="float")
    assert result.data[0].embedding == fake_vector("one text")


def test_openai_base64_is_float32_little_endian(gw: RunningGateway) -> None:
    body = httpx.post(
        gw.url + "/v1/embeddings", json={"model": "fake-model", "input": "x", "encoding_format": "base64"}
    ).json()
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == fake_vector("x")


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"input": [[1, 2, 3]]}, "input"), ({"input": []}, "input"), ({"dimensions": 0}, "dimensions")],
)
def test_openai_refusals_are_400_in_openai_shape(gw: RunningGateway, extra: dict[str, Any], param: str) -> None:
    response = httpx.post(gw.url + "/v1/embeddings", json={"model": "fake-model", "input": "x", **extra})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


async def test_openai_unknown_model_is_404(openai_client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await openai_client.embeddings.create(model="missing-embedder", input="x")
    assert caught.value.code == "model_not_found"


async def test_ollama_embed(ollama_client: ollama.AsyncClient, fake: FakeLLM) -> None:
    result = await ollama_client.embed(model="fake-model", input=TEXTS)
    assert [list(vector) for vector in result.embeddings] == [fake_vector(text) for text in TEXTS]
    assert result.prompt_eval_count == 6
    assert last_request(fake)["body"] == {"model": "fake-model", "input": TEXTS}


async def test_ollama_legacy_embeddings(ollama_client: ollama.AsyncClient) -> None:
    result = await ollama_client.embeddings(model="fake-model", prompt="one text")
    assert list(result.embedding) == fake_vector("one text")


async def test_ollama_unknown_model_is_404(ollama_client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        await ollama_client.embed(model="missing-embedder", input="x")
    assert caught.value.status_code == 404
    assert "missing-embedder" in caught.value.error


def test_upstream_down_is_502_in_each_shape(start_gateway: Any, closed_port_url: str) -> None:
    with start_gateway(ollama_host=closed_port_url) as gw:
        openai_answer = httpx.post(gw.url + "/v1/embeddings", json={"model": "fake-model", "input": "x"})
        ollama_answer = httpx.post(gw.url + "/api/embed", json={"model": "fake-model", "input": "x"})
    assert openai_answer.status_code == 502
    assert openai_answer.json()["error"]["code"] == "provider_unavailable"
    assert ollama_answer.status_code == 502
    assert "error" in ollama_answer.json()


def test_metrics_count_embeddings_by_outcome(gw: RunningGateway) -> None:
    httpx.post(gw.url + "/api/embed", json={"model": "fake-model", "input": "x"})
    httpx.post(gw.url + "/api/embed", json={"model": "missing-m", "input": "x"})
    text = httpx.get(gw.url + "/metrics").text
    assert 'chatgate_embeddings_total{outcome="ok",provider="ollama"} 1.0' in text
    assert 'chatgate_embeddings_total{outcome="not_found",provider="ollama"} 1.0' in text


@pytest.fixture
def openai_gw(start_gateway: Any, fake: FakeLLM) -> Iterator[RunningGateway]:
    with start_gateway(provider="openai", openai_base_url=fake.url, openai_api_key="k") as gw:
        yield gw


def test_through_the_openai_adapter(openai_gw: RunningGateway, fake: FakeLLM) -> None:
    body = httpx.post(openai_gw.url + "/api/embed", json={"model": "fake-model", "input": TEXTS}).json()
    assert body["embeddings"] == [fake_vector(text) for text in TEXTS]
    assert body["prompt_eval_count"] == 6
    sent = last_request(fake)
    assert sent["path"] == "/v1/embeddings"
    assert sent["body"]["input"] == TEXTS


@pytest.fixture
def gemini_gw(start_gateway: Any, fake: FakeLLM) -> Iterator[RunningGateway]:
    with start_gateway(provider="gemini", gemini_base_url=fake.url, gemini_api_key="k", model="gemini-test") as gw:
        yield gw


def test_through_the_gemini_adapter(gemini_gw: RunningGateway, fake: FakeLLM) -> None:
    body = httpx.post(
        gemini_gw.url + "/v1/embeddings",
        json={"model": "text-embedding-fake", "input": TEXTS, "encoding_format": "float"},
    ).json()
    assert [item["embedding"] for item in body["data"]] == [fake_vector(text) for text in TEXTS]
    sent = last_request(fake)
    assert sent["path"] == "/v1beta/models/text-embedding-fake:batchEmbedContents"
    assert sent["body"]["requests"][1] == {
        "model": "models/text-embedding-fake",
        "content": {"parts": [{"text": TEXTS[1]}]},
    }


def test_gemini_unknown_model_is_404(gemini_gw: RunningGateway) -> None:
    response = httpx.post(gemini_gw.url + "/api/embed", json={"model": "missing-embedder", "input": "x"})
    assert response.status_code == 404
    assert "missing-embedder" in response.json()["error"]


async def test_the_embedded_model_refuses_embeddings() -> None:
    with pytest.raises(EmbeddingsUnsupported, match="the embedded model does not do embeddings"):
        await LocalProvider.embed(object.__new__(LocalProvider), "m", ["x"])  # needs no loaded model


async def test_service_refuses_unsupported_as_400_and_counts_the_rate() -> None:
    limits = LocalLimits(RateLimiter(1, 60.0))
    service = ChatService(StubProvider(), MemoryStore(StoreLimits(), time.time), AgentRegistry(), limits=limits)
    with pytest.raises(ChatError) as refused:
        await service.embed("m", ["x"], owner="alice")
    assert refused.value.code == "bad_request"
    with pytest.raises(ChatError) as limited:
        await service.embed("m", ["x"], owner="alice")
    assert limited.value.code == "rate_limited"


@pytest.mark.parametrize("path", ["/v1/embeddings", "/api/embed", "/api/embeddings"])
def test_embeddings_need_the_api_key(start_gateway: Any, path: str) -> None:
    body = {"model": "fake-model", "input": "x", "prompt": "x"}
    with start_gateway(api_keys="k1") as gw:
        refused = httpx.post(gw.url + path, json=body)
        allowed = httpx.post(gw.url + path, json=body, headers={"Authorization": "Bearer k1"})
    assert refused.status_code == 401
    assert allowed.status_code == 200


@pytest.mark.parametrize(
    ("adapter", "sent_as"),
    [("ollama", "dimensions"), ("openai", "dimensions"), ("gemini", "outputDimensionality")],
)
async def test_dimensions_reach_the_upstream(start_gateway: Any, fake: FakeLLM, adapter: str, sent_as: str) -> None:
    settings: dict[str, Any] = {
        "ollama": {"provider": "ollama", "ollama_host": fake.url},
        "openai": {"provider": "openai", "openai_base_url": fake.url + "/v1"},
        "gemini": {"provider": "gemini", "gemini_base_url": fake.url, "gemini_api_key": "k"},
    }[adapter]
    with start_gateway(**settings) as gw:
        async with AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=10) as client:
            result = await client.embeddings.create(model="fake-embedder", input=TEXTS, dimensions=4)
        body = httpx.post(gw.url + "/api/embed", json={"model": "fake-embedder", "input": "x", "dimensions": 3}).json()
    assert [item.embedding for item in result.data] == [fake_vector(text)[:4] for text in TEXTS]
    assert body["embeddings"] == [fake_vector("x")[:3]]
    sent = last_request(fake)["body"]
    assert (sent["requests"][0] if adapter == "gemini" else sent)[sent_as] == 3
