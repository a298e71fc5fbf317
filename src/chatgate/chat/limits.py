"""Per-client limits: a request rate (token bucket) and concurrent replies.

The client is the API key's owner id, or the peer address when anonymous. Both live in
this process's memory: with several workers each enforces its own share.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from chatgate.chat.events import ChatError

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
            retry_after = (1.0 - tokens) / self.rate
            raise ChatError(
                "rate_limited",
                f"rate limit reached; retry in {retry_after:.1f} s",
                retryable=True,
                retry_after=retry_after,
            )
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
            raise ChatError(
                "rate_limited",
                f"at most {self.limit} replies may stream at once per client",
                retryable=True,
            )
        self._active[client] = count + 1

    def release(self, client: str) -> None:
        if not self.limit:
            return
        count = self._active.get(client, 0) - 1
        if count > 0:
            self._active[client] = count
        else:
            self._active.pop(client, None)
