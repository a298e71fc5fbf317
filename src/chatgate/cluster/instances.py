"""Which instances are alive: each one refreshes a key that expires a few seconds after
it stops (a crash, ``kill -9``, a machine that lost power), so the others can tell a
generation that is merely slow from one whose instance is gone."""

from __future__ import annotations

import asyncio
import logging
import uuid

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chatgate.cluster import PREFIX

log = logging.getLogger("chatgate.cluster")

#: An instance not heard from for this long is taken for dead.
ALIVE_TTL_MS = 6000
#: How often an instance says it is alive.
BEAT_S = 2.0


def alive_key(instance_id: str) -> str:
    return f"{PREFIX}alive:{instance_id}"


class Instance:
    """This process, as the other instances see it."""

    def __init__(self, redis: aioredis.Redis, instance_id: str | None = None) -> None:
        self.redis = redis
        self.id = instance_id or uuid.uuid4().hex[:16]
        self._beating: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._beat_once()
        self._beating = asyncio.create_task(self._beat(), name="instance-heartbeat")

    async def stop(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
            await asyncio.gather(self._beating, return_exceptions=True)
            self._beating = None
        try:
            await self.redis.delete(alive_key(self.id))
        except RedisError:
            pass  # it expires by itself

    async def alive(self, instance_id: str) -> bool:
        """Whether ``instance_id`` has said it is alive lately (this one always is)."""
        if instance_id == self.id:
            return True
        return bool(await self.redis.exists(alive_key(instance_id)))

    async def _beat_once(self) -> None:
        await self.redis.set(alive_key(self.id), b"1", px=ALIVE_TTL_MS)

    async def _beat(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(BEAT_S)
            try:
                await self._beat_once()
                if failing:
                    log.info("Redis answers again: this instance is seen as alive")
                failing = False
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("cannot tell Redis this instance is alive: %s", exc)
                failing = True
