"""The upstream's circuit breaker: after ``CHATGATE_BREAKER_FAILURES`` failed turns in a
row new turns are refused at once (retryable ``provider_unavailable`` with a
``retry_after``) and nothing reaches the upstream; after ``CHATGATE_BREAKER_COOLDOWN_S``
one probe turn goes through, and its answer closes the breaker. ``/health`` and
``/metrics`` show the state."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import httpx
import pytest

from chatgate.chat.agents import AgentRegistry
from chatgate.chat.breaker import CircuitBreaker, Trial
from chatgate.chat.events import ChatError
from chatgate.chat.service import ChatService, RetryPolicy, Turn
from chatgate.providers.base import (
    Chunk,
    ModelNotFound,
    ProviderError,
    ProviderHTTPError,
    ProviderRequest,
    ProviderStreamError,
    ProviderTimeout,
    ProviderUnavailable,
)
from chatgate.store.base import StoreLimits
from chatgate.store.memory import MemoryStore
from chatgate.testing.providers import StubProvider
from chatgate.testing.servers import FakeLLM, RunningGateway

DOWN = ProviderUnavailable("nobody listens")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail(breaker: CircuitBreaker, exc: ProviderError = DOWN) -> None:
    breaker.admit().failed(exc)


def refusal(breaker: CircuitBreaker) -> ChatError:
    with pytest.raises(ChatError) as raised:
        breaker.admit()
    return raised.value


# The state machine, on a clock of the test's ---------------------------------------------


def test_it_opens_after_n_failed_turns_in_a_row_and_refuses_with_a_retry_after() -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, 30.0, clock=clock)
    fail(breaker)
    fail(breaker)
    breaker.admit().answered()  # an answer in between: the count starts again
    fail(breaker)
    fail(breaker)
    assert breaker.state == "closed"
    fail(breaker)
    assert breaker.state == "open"
    clock.now += 10.5
    refused = refusal(breaker)
    assert (refused.code, refused.retryable, refused.retry_after) == ("provider_unavailable", True, 20)
    assert "circuit breaker open" in refused.message


@pytest.mark.parametrize(
    ("exc", "counts"),
    [
        (ProviderUnavailable("refused"), True),
        (ProviderTimeout("no byte"), True),
        (ProviderHTTPError("bad gateway", status=502), True),
        (ProviderStreamError("dropped"), True),
        (ModelNotFound("no such model"), False),
        (ProviderHTTPError("slow down", status=429), False),
        (ProviderHTTPError("bad request", status=400), False),
        (ProviderStreamError("withheld: SAFETY", retryable=False), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, ProviderError) else str(value),
)
def test_only_failures_of_the_upstream_count(exc: ProviderError, counts: bool) -> None:
    breaker = CircuitBreaker(1, 30.0, clock=Clock())
    fail(breaker, exc)
    assert breaker.state == ("open" if counts else "closed")


def test_after_the_cooldown_one_probe_goes_through_and_its_answer_closes_it() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 30.0, clock=clock)
    fail(breaker)
    clock.now += 30
    assert breaker.state == "half_open"
    probe = breaker.admit()
    assert probe.probe
    assert refusal(breaker).retry_after == 1, "one probe at a time; the others wait for it"
    probe.answered()
    assert breaker.state == "closed"
    assert not breaker.admit().probe


def test_a_failed_probe_opens_it_for_another_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 30.0, clock=clock)
    fail(breaker)
    clock.now += 30
    breaker.admit().failed(DOWN)
    assert breaker.state == "open"
    clock.now += 29
    assert refusal(breaker).retry_after == 1
    clock.now += 1
    assert breaker.admit().probe


def test_a_probe_cancelled_before_a_verdict_lets_the_next_turn_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 30.0, clock=clock)
    fail(breaker)
    clock.now += 30
    breaker.admit().abandoned()
    assert breaker.state == "half_open"
    assert breaker.admit().probe


def test_turns_admitted_before_it_opened_do_not_close_it() -> None:
    breaker = CircuitBreaker(1, 30.0, clock=Clock())
    slow = breaker.admit()
    fail(breaker)
    slow.answered()
    assert breaker.state == "open"


def test_a_breaker_of_zero_failures_never_opens() -> None:
    breaker = CircuitBreaker(0, 30.0, clock=Clock())
    for _ in range(100):
        fail(breaker)
    assert breaker.state == "closed"


# In the chat service: a turn counts once, whatever it retried -------------------------------


class DownProvider(StubProvider):
    """An upstream that cannot be reached, counting the requests it was sent."""

    name: ClassVar[str] = "down"

    def __init__(self) -> None:
        self.requests = 0
        self.up = False

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Chunk]:
        self.requests += 1
        if not self.up:
            raise DOWN
        yield Chunk("back")
        yield Chunk(finish_reason="stop")


async def test_a_turn_counts_once_and_the_probe_is_one_request() -> None:
    clock = Clock()
    provider = DownProvider()
    service = ChatService(
        provider,
        MemoryStore(StoreLimits(), time.time),
        AgentRegistry(),
        fallback_models=["backup-model"],
        retry=RetryPolicy(attempts=3, backoff_s=0),
        breaker=CircuitBreaker(2, 30.0, clock=clock),
    )
    try:
        first = await service.start(Turn("hello"))
        await first.wait_finished()
        assert provider.requests == 6, "three attempts on each of two models"
        assert service.breaker.state == "closed", "six failed requests are one failed turn"
        second = await service.start(Turn("hello"))
        await second.wait_finished()
        assert service.breaker.state == "open"

        with pytest.raises(ChatError) as refused:
            await service.start(Turn("hello"))
        assert refused.value.code == "provider_unavailable" and refused.value.retry_after == 30
        assert provider.requests == 12, "refused without a request"

        clock.now += 30
        probe = await service.start(Turn("hello"))
        await probe.wait_finished()
        assert provider.requests == 13, "the probe is one request: no retry, no fallback"
        assert service.breaker.state == "open"

        clock.now += 30
        provider.up = True
        answered = await service.start(Turn("hello"))
        await answered.wait_finished()
        assert answered.log[-1]["type"] == "done" and service.breaker.state == "closed"
    finally:
        await service.aclose()


async def test_a_turn_refused_for_another_reason_does_not_hold_the_probe() -> None:
    clock = Clock()
    service = ChatService(
        DownProvider(), MemoryStore(StoreLimits(), time.time), AgentRegistry(),
        retry=RetryPolicy(attempts=1), breaker=CircuitBreaker(1, 30.0, clock=clock),
    )
    try:
        await (await service.start(Turn("hello"))).wait_finished()
        clock.now += 30
        with pytest.raises(ChatError) as unknown:
            await service.start(Turn("hello", agent="nobody"))
        assert unknown.value.code == "not_found"
        assert service.breaker.state == "half_open"
        assert isinstance(service.breaker.admit(), Trial), "the probe is still free"
    finally:
        await service.aclose()


# Over the wire: fail fast, /health, /metrics ------------------------------------------------


def ask(gw: RunningGateway) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "fake-model", "messages": [{"role": "user", "content": "Hello"}]},
        timeout=10,
    )


def breaker_in_health(gw: RunningGateway) -> str:
    state: str = httpx.get(gw.url + "/health").json()["checks"]["provider"]["breaker"]
    return state


def breaker_in_metrics(gw: RunningGateway) -> dict[str, float]:
    lines = httpx.get(gw.url + "/metrics").text.splitlines()
    prefix = 'chatgate_upstream_breaker_state{provider="ollama",state="'
    return {
        line[len(prefix):].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(prefix)
    }


def test_the_breaker_opens_fails_fast_shows_and_closes_on_a_probe(start_gateway: Any, fake: FakeLLM) -> None:
    with start_gateway(breaker_failures=2, breaker_cooldown_s=30) as gw:
        assert breaker_in_health(gw) == "closed"
        assert breaker_in_metrics(gw) == {"closed": 1.0, "open": 0.0, "half_open": 0.0}
        fake.fault("http_500", times=6)  # two turns of three attempts each
        for _ in range(2):
            assert ask(gw).status_code == 502
        assert len(fake.requests()) == 6

        refused = ask(gw)
        assert refused.status_code == 502
        error = refused.json()["error"]
        assert error["code"] == "provider_unavailable" and "circuit breaker open" in error["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 30
        assert len(fake.requests()) == 6, "nothing reached the upstream while open"
        assert breaker_in_health(gw) == "open"
        assert breaker_in_metrics(gw) == {"closed": 0.0, "open": 1.0, "half_open": 0.0}

        breaker = gw.gateway.service.breaker
        breaker.clock = lambda: time.monotonic() + 30  # the cool-down has passed
        assert breaker_in_health(gw) == "half_open"
        assert breaker_in_metrics(gw)["half_open"] == 1.0

        probe = ask(gw)
        assert probe.status_code == 200, probe.text
        assert len(fake.requests()) == 7
        assert breaker_in_health(gw) == "closed"
        assert breaker_in_metrics(gw) == {"closed": 1.0, "open": 0.0, "half_open": 0.0}


def test_an_unreachable_upstream_opens_it_too(start_gateway: Any, closed_port_url: str) -> None:
    with start_gateway(ollama_host=closed_port_url, breaker_failures=1) as gw:
        first = ask(gw)
        assert first.status_code == 502 and "circuit breaker" not in first.json()["error"]["message"]
        refused = ask(gw)
        assert refused.status_code == 502 and "circuit breaker open" in refused.json()["error"]["message"]
        assert breaker_in_health(gw) == "open"
