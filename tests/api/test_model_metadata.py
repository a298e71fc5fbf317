"""The model routes pass on what the upstream says of its models (through the official
clients), with chatgate's agents as models of their own; nothing is invented."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from types import SimpleNamespace
from typing import Any

import httpx
import ollama
import openai
import pytest

from chatgate.testing.servers import FakeLLM, RunningGateway

GatewayFactory = Callable[..., AbstractContextManager[RunningGateway]]
FAKE_SIZE = 1_048_576  # what the fake upstream says of each model
FAKE_CREATED = 1_704_067_200


@pytest.fixture
async def client(gw: RunningGateway) -> AsyncIterator[ollama.AsyncClient]:
    yield ollama.AsyncClient(host=gw.url, timeout=10)


def openai_client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=10)


async def test_ollama_list_passes_on_the_upstreams_entries(client: ollama.AsyncClient, fake: FakeLLM) -> None:
    upstream = httpx.get(fake.url + "/api/tags").json()["models"]
    listed = (await client.list()).models
    assert [m.model for m in listed] == ["fake-model", "fake-backup", "agent:general"]
    first = listed[0]
    assert (first.size, first.digest) == (FAKE_SIZE, upstream[0]["digest"])
    assert first.details is not None and (first.details.family, first.details.quantization_level) == ("fake", "Q8_0")
    agent = listed[-1]
    assert agent.size == FAKE_SIZE and agent.details is not None
    assert (agent.details.parent_model, agent.details.family) == ("fake-model", "fake")


async def test_ollama_show_and_ps_are_the_upstreams(client: ollama.AsyncClient) -> None:
    shown = await client.show("fake-model")
    assert shown.modelinfo == {
        "general.architecture": "fake", "general.parameter_count": 1_000_000, "fake.context_length": 8192}
    assert shown.details is not None and shown.details.parameter_size == "1M"
    assert shown.modelfile == "FROM fake-model\n"
    assert (await client.show("agent:general")).modelfile == "FROM fake-model\n"
    for missing in ("missing-model", "agent:nobody"):
        with pytest.raises(ollama.ResponseError) as raised:
            await client.show(missing)
        assert raised.value.status_code == 404 and "not found" in raised.value.error
    loaded = (await client.ps()).models
    assert [(m.model, m.size, m.size_vram, m.context_length) for m in loaded] == [
        ("fake-model", FAKE_SIZE, 524_288, 8192)]


def test_openai_models_are_the_upstreams_with_agents(gw: RunningGateway) -> None:
    client = openai_client(gw)
    models = client.models.list().data
    assert [(m.id, m.created, m.owned_by) for m in models] == [
        ("fake-model", 1_735_689_600, "library"),  # Ollama's /v1/models: modified_at, "library"
        ("fake-backup", 1_735_689_600, "library"),
        ("agent:general", 1_735_689_600, "chatgate"),
    ]
    assert client.models.retrieve("fake-model").id == "fake-model"
    assert client.models.retrieve("agent:general").owned_by == "chatgate"
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("no-such-model")
    assert raised.value.code == "model_not_found"


@pytest.fixture
def openai_upstream(start_gateway: GatewayFactory, fake: FakeLLM) -> Iterator[RunningGateway]:
    with start_gateway(provider="openai", openai_base_url=fake.url, openai_api_key="k") as gw:
        yield gw


def test_through_an_openai_compatible_upstream(openai_upstream: RunningGateway) -> None:
    client = openai_client(openai_upstream)
    assert [(m.id, m.created, m.owned_by) for m in client.models.list().data] == [
        ("fake-model", FAKE_CREATED, "fake-org"),
        ("fake-backup", FAKE_CREATED, "fake-org"),
        ("agent:general", FAKE_CREATED, "chatgate"),
    ]
    assert client.models.retrieve("fake-backup").created == FAKE_CREATED
    listed = ollama.Client(host=openai_upstream.url, timeout=10).list().models
    assert [(m.model, m.size, m.digest, m.modified_at) for m in listed[:2]] == [
        ("fake-model", None, None, None), ("fake-backup", None, None, None)]
    assert ollama.Client(host=openai_upstream.url, timeout=10).ps().models == []


def test_through_gemini(start_gateway: GatewayFactory, fake: FakeLLM) -> None:
    with start_gateway(provider="gemini", gemini_base_url=fake.url, gemini_api_key="k", model="gemini-test") as gw:
        models = openai_client(gw).models.list().data
        assert [(m.id, m.owned_by) for m in models][:2] == [("fake-model", "google"), ("fake-backup", "google")]
        assert models[0].created is None  # Gemini gives no date
        shown = ollama.Client(host=gw.url, timeout=10).show("fake-model")
        assert shown.modelinfo is not None and shown.modelinfo["inputTokenLimit"] == 8192
        assert shown.modelfile is None


class CountingCatalog:
    """An upstream that counts how often it is asked for its models."""

    name = "counting"
    default_model = "m"

    def __init__(self) -> None:
        self.asked = 0

    async def models(self) -> list[str]:
        self.asked += 1
        return ["m"]


async def test_the_upstreams_list_is_reused_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatgate.api import catalog

    upstream = CountingCatalog()
    gateway = SimpleNamespace(provider=upstream)
    request: Any = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(gateway=gateway)))
    clock = [100.0]
    monkeypatch.setattr(catalog, "clock", lambda: clock[0])
    assert [m.name for m in await catalog.upstream_models(request)] == ["m"]
    clock[0] += catalog.CATALOG_TTL_S - 1
    await catalog.upstream_models(request)
    assert upstream.asked == 1
    clock[0] += 2
    await catalog.upstream_models(request)
    assert upstream.asked == 2
