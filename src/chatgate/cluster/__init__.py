"""What the instances of one service share when the store is Redis.

Several chatgate processes (workers of one ``serve``, or instances on several machines
behind a load balancer) pointed at one Redis are one service: conversations live in the
Redis store, generation logs in Redis Streams that every instance can follow
(:mod:`chatgate.cluster.bus`), client limits count across instances
(:mod:`chatgate.cluster.limits`), and each instance says it is alive with a key that
expires when it stops saying so (:mod:`chatgate.cluster.instances`).

With the memory or SQLite store none of this exists: one process, in-process state.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import redis.asyncio as aioredis

from chatgate.store import redis as redis_store

#: Every key chatgate writes in Redis starts with this.
PREFIX = "chatgate:"
#: Store URL schemes that name a Redis server.
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})


def is_redis(store_url: str) -> bool:
    return urlsplit(store_url).scheme in REDIS_SCHEMES


def connect(url: str) -> aioredis.Redis:
    """A client (its own connection pool) for the shared state behind ``url``."""
    return redis_store.connect(url)
