"""Client limits that hold for the sum over every instance on one Redis: the turn rate
and concurrent replies per client (:class:`RedisLimits`, the chat service's
``ClientLimits``), and the WebSocket connection cap (:class:`RedisCounts`). ::

    rate:LIMITER/{client}/{n}/{t}/second   list: the client's recent turns (``limits``' layout)
    open:streams:{client}                  hash: instance id -> replies it streams for the client
    open:connections                       hash: instance id -> WebSockets it holds

**Rate.** The ``limits`` package's moving window on its async Redis storage, over the
instance's own redis-py connection pool: at most N turns in any T seconds, one script
(one round trip) per turn, a second one only to tell a refused client when to retry.
The per-process limit is a token bucket, which lets a client that used its burst go on
at N/T; the window makes it wait until its oldest turn in the window is T seconds old.
Each instance stamps turns with its own clock, so instances' clocks should agree (NTP).

**Things open at once** (replies, sockets) are counted per instance, one hash field each.
Opening is one script: it adds up the fields of the instances that are alive (their
heartbeat key, :mod:`chatgate.cluster.instances`), deletes the fields of those that are
not, and takes one more if the sum is under the cap. So the share of an instance that
died (``kill -9``, a lost machine) stops counting at the first open after its heartbeat
key expired, some 6 s after it stopped. Closing is one ``HINCRBY -1`` in the background.
Every ``RESYNC_S`` each instance writes its own counts as they stand (and the keys'
expiry), so a count that went astray (a close that could not reach Redis, an open
cancelled mid-way, a field deleted while this instance's own heartbeat lapsed) is right
again within that time; a key no instance writes expires after ``KEY_TTL_MS``. The script
reads heartbeat keys it is not given, which a standalone Redis allows (Redis Cluster would not).

**Redis unreachable** (or slower than ``CHECK_TIMEOUT_S``): the limits fail open to the
per-process ones, each instance enforcing its own share as it does without Redis, and a
warning is logged once, then an info line when Redis answers again. Refusing every turn
instead would add nothing: the Redis store already refuses the turns that need it, with
a clear retryable error, and the turns that do not (stateless APIs) should go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import redis.asyncio as aioredis
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.exceptions import RedisError

from chatgate.chat.limits import RateLimiter, rate_limited, too_many_streams
from chatgate.cluster import PREFIX
from chatgate.cluster.instances import Instance, alive_key

log = logging.getLogger("chatgate.cluster")

#: A limit check waits this long for Redis, then goes by this process's own count.
CHECK_TIMEOUT_S = 1.0
#: How often an instance rewrites its own counts.
RESYNC_S = 15.0
#: A count key expires this long after the last instance that counts in it wrote it.
KEY_TTL_MS = 60_000
#: What "cannot reach Redis" raises (``TimeoutError`` is an ``OSError``).
UNREACHABLE = (RedisError, OSError)

#: The store's URL schemes as ``limits`` spells them for its async Redis storage.
_LIMITS_SCHEMES = {"redis": "async+redis", "rediss": "async+rediss", "unix": "async+redis+unix"}

# KEYS[1]: the count hash. ARGV: this instance's id, the cap, the heartbeat key prefix, the
# key's expiry in ms. Returns 1 when one was taken, 0 when the cap is reached.
_OPEN = """
local me, cap, alive = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local fields = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #fields, 2 do
  local id = fields[i]
  if id == me or redis.call('EXISTS', alive .. id) == 1 then
    total = total + tonumber(fields[i + 1])
  else
    redis.call('HDEL', KEYS[1], id)
  end
end
if total >= cap then return 0 end
redis.call('HINCRBY', KEYS[1], me, 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS[1]: the count hash. ARGV: this instance's id.
_CLOSE = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
"""


def limits_url(store_url: str) -> str:
    """The store's Redis URL in the spelling of ``limits``' async storage."""
    scheme, sep, rest = store_url.partition("://")
    if not sep or scheme not in _LIMITS_SCHEMES:
        raise ValueError(f"not a Redis URL: {store_url!r}")
    return f"{_LIMITS_SCHEMES[scheme]}://{rest}"


class Outage:
    """Says once that Redis cannot be reached, and once that it answers again."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.down = False

    def failed(self, exc: BaseException) -> None:
        if not self.down:
            log.warning("cannot reach Redis for %s, each instance counts its own: %r", self.what, exc)
            self.down = True

    def recovered(self) -> None:
        if self.down:
            log.info("Redis answers again: %s count across instances", self.what)
            self.down = False


class RedisCounts:
    """How many of one kind of thing are open per name, capped at ``limit`` (0 = no cap)
    for the sum over the instances that are alive."""

    def __init__(
        self, redis: aioredis.Redis, instance: Instance, kind: str, limit: int, outage: Outage | None = None
    ) -> None:
        self.redis = redis
        self.instance = instance
        self.limit = limit
        self._prefix = f"{PREFIX}open:{kind}"
        self._outage = outage or Outage(kind)
        self._open = redis.register_script(_OPEN)
        self._close = redis.register_script(_CLOSE)
        #: This instance's own count per name: the truth its Redis fields follow.
        self._local: Counter[str] = Counter()
        #: Names whose Redis field may be off until the next resync.
        self._touched: set[str] = set()
        #: Names with a script on its way: a resync leaves them for the next round.
        self._in_flight: Counter[str] = Counter()
        self._closing: set[asyncio.Task[None]] = set()
        self._resyncing: asyncio.Task[None] | None = None

    def key(self, name: str) -> str:
        return f"{self._prefix}:{name}" if name else self._prefix

    def here(self, name: str = "") -> int:
        """How many this instance holds open for ``name``."""
        return self._local[name]

    async def start(self) -> None:
        if self.limit:
            self._resyncing = asyncio.create_task(self._resync_forever(), name=f"{self._prefix}-resync")

    async def aclose(self) -> None:
        """Stop resyncing; write this instance's last counts (zeros, once all is closed)."""
        if self._resyncing is not None:
            self._resyncing.cancel()
            await asyncio.gather(self._resyncing, return_exceptions=True)
            self._resyncing = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self.resync()

    async def try_open(self, name: str = "") -> bool:
        """Take one for ``name`` if the instances together hold fewer than the cap."""
        if not self.limit:
            return True
        if self._local[name] >= self.limit:
            return False  # this instance alone holds the cap: no need to ask
        self._local[name] += 1
        self._touched.add(name)
        self._in_flight[name] += 1
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                taken = await self._open(
                    keys=[self.key(name)], args=[self.instance.id, self.limit, alive_key(""), KEY_TTL_MS]
                )
        except UNREACHABLE as exc:
            self._outage.failed(exc)
            return True  # within this instance's own cap, checked above
        except BaseException:
            self._release(name)
            raise
        finally:
            self._done(name)
        self._outage.recovered()
        if not taken:
            self._release(name)
        return bool(taken)

    def close(self, name: str = "") -> None:
        """Give one back; Redis hears of it in the background."""
        if not self.limit:
            return
        self._release(name)
        self._touched.add(name)
        self._in_flight[name] += 1
        task = asyncio.get_running_loop().create_task(self._give_back(name))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _give_back(self, name: str) -> None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await self._close(keys=[self.key(name)], args=[self.instance.id])
        except UNREACHABLE as exc:
            self._outage.failed(exc)
        else:
            self._outage.recovered()
        finally:
            self._done(name)

    def _release(self, name: str) -> None:
        self._local[name] -= 1
        if self._local[name] <= 0:
            del self._local[name]

    def _done(self, name: str) -> None:
        self._in_flight[name] -= 1
        if self._in_flight[name] <= 0:
            del self._in_flight[name]

    async def resync(self) -> None:
        """Write this instance's counts as they stand, and renew the keys' expiry."""
        names = [n for n in self._touched.union(self._local) if n not in self._in_flight]
        if not names:
            return
        self._touched.difference_update(names)  # before the wait: changes meanwhile stay marked
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            count, key = self._local[name], self.key(name)
            if count:
                pipe.hset(key, self.instance.id, count)
                pipe.pexpire(key, KEY_TTL_MS)
            else:
                pipe.hdel(key, self.instance.id)
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await pipe.execute()
        except UNREACHABLE as exc:
            self._outage.failed(exc)
            self._touched.update(names)
            return
        self._outage.recovered()

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(RESYNC_S)
            try:
                await self.resync()
            except Exception:
                log.exception("resyncing %s failed", self._prefix)


class RedisLimits:
    """The chat service's ``ClientLimits`` counted in Redis, and the connection cap."""

    def __init__(
        self,
        redis: aioredis.Redis,
        instance: Instance,
        store_url: str,
        *,
        rate: tuple[int, float] | None = None,
        max_streams: int = 0,
        max_connections: int = 0,
    ) -> None:
        self._outage = Outage("client limits")
        #: The shared window, its limit, and the per-process bucket for when Redis is away.
        self._rate: tuple[MovingWindowRateLimiter, RateLimitItem, RateLimiter] | None = None
        if rate is not None:
            count, per_s = rate
            # One pool for all this instance keeps in Redis, closed with its client:
            # ``limits`` has no close of its own. Its storage documents ``connection_pool``,
            # though the annotation of its options names only scalars.
            storage = RedisStorage(
                limits_url(store_url),
                implementation="redispy",
                key_prefix=f"{PREFIX}rate",
                connection_pool=redis.connection_pool,  # type: ignore[arg-type]
            )
            item = RateLimitItemPerSecond(count, max(1, round(per_s)))
            self._rate = (MovingWindowRateLimiter(storage), item, RateLimiter(count, per_s))
        self.streams = RedisCounts(redis, instance, "streams", max_streams, self._outage)
        self.connections = RedisCounts(redis, instance, "connections", max_connections, self._outage)

    async def start(self) -> None:
        await self.streams.start()
        await self.connections.start()

    async def aclose(self) -> None:
        await self.streams.aclose()
        await self.connections.aclose()

    async def admit(self, client: str) -> None:
        if self._rate is None:
            return
        window, item, fallback = self._rate
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                if await window.hit(item, client):
                    self._outage.recovered()
                    return
                stats = await window.get_window_stats(item, client)
        except UNREACHABLE as exc:
            self._outage.failed(exc)
            fallback.acquire(client)
            return
        self._outage.recovered()
        raise rate_limited(max(0.0, stats.reset_time - time.time()))

    async def open_stream(self, client: str) -> None:
        if not await self.streams.try_open(client):
            raise too_many_streams(self.streams.limit)

    def close_stream(self, client: str) -> None:
        self.streams.close(client)
