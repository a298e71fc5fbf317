"""Per-client limits: a request rate (token bucket) and concurrent replies.

The client is the API key's owner id, or the peer address when anonymous. The chat
service asks a :class:`ClientLimits`; :class:`LocalLimits` keeps both counts in this
process's memory, which is all there is with the memory or SQLite store (with several
workers, each enforces its own share). With a Redis store the gateway hands the service
the Redis implementation instead (:mod:`chatgate.cluster.limits`), so that the counts
hold for the sum over every instance on that Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from chatgate.chat.events import ChatError


class ClientLimits(Protocol):
    """What the chat service asks before and after a turn, per client key."""

    async def admit(self, client: str) -> None:
        """Count one turn against the rate, or raise ``rate_limited`` (429)."""

    async def open_stream(self, client: str) -> None:
        """Take one of the client's concurrent replies, or raise ``rate_limited``."""

    def close_stream(self, client: str) -> None:
        """Give the reply back. Not async: a generation ends in paths (cancellation among
        them) that cannot wait, so an implementation that must tell a server does so in
        the background."""


def rate_limited(retry_after: float) -> ChatError:
    return ChatError(
        "rate_limited",
        f"rate limit reached; retry in {retry_after:.1f} s",
        retryable=True,
        retry_after=retry_after,
    )


def too_many_streams(limit: int) -> ChatError:
    return ChatError("rate_limited", f"at most {limit} replies may stream at once per client", retryable=True)


#: Above this many tracked clients, buckets that have refilled completely are dropped.
MAX_TRACKED_CLIENTS = 50_000


class RateLimiter:
    def __init__(self, count: int, per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(count)
        self.rate = count / per_s
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire(self, client: str) -> None:
        """Take one request from ``client``'s bucket or raise ``rate_limited`` (429)."""
        now = self._clock()
        tokens, last = self._buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            raise rate_limited((1.0 - tokens) / self.rate)
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._prune(now)

    def _prune(self, now: float) -> None:
        full = [
            key
            for key, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate >= self.capacity
        ]
        for key in full:
            del self._buckets[key]


class StreamCounter:
    """Concurrent replies per client, capped at ``limit`` (0 = no cap)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active: dict[str, int] = {}

    def acquire(self, client: str) -> None:
        if not self.limit:
            return
        count = self._active.get(client, 0)
        if count >= self.limit:
            raise too_many_streams(self.limit)
        self._active[client] = count + 1

    def release(self, client: str) -> None:
        if not self.limit:
            return
        count = self._active.get(client, 0) - 1
        if count > 0:
            self._active[client] = count
        else:
            self._active.pop(client, None)


class LocalLimits:
    """Both limits in this process's memory: a token bucket (``rate``, None for no rate
    limit) and a cap of ``max_streams`` concurrent replies per client (0 = no cap)."""

    def __init__(self, rate: RateLimiter | None = None, max_streams: int = 0) -> None:
        self.rate = rate
        self.streams = StreamCounter(max_streams)

    async def admit(self, client: str) -> None:
        if self.rate is not None:
            self.rate.acquire(client)

    async def open_stream(self, client: str) -> None:
        self.streams.acquire(client)

    def close_stream(self, client: str) -> None:
        self.streams.release(client)
