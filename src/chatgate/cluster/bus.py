"""Generation logs in Redis Streams, so a client can resume or cancel an answer from any
instance, not only from the one that runs it.

The instance that runs a generation mirrors its log into a stream, one ``XADD`` per
batch of events: the events logged while the previous batch was on its way, and while
tokens keep coming, at most one batch per ``BATCH_S``. A fast or busy upstream thus costs
a round trip per batch, not per token; a slow one's tokens still go out at once. The
stream expires a while after the answer ends (the resume grace), and is capped at
``STREAM_MAXLEN`` entries as a safety bound. ::

    g:{namespace}:{id}   stream; entries {e: JSON array of events}; the first entry, which
                         opens with the start event, also has i (the running instance),
                         k (conversation key), o (owner)
    offered:{id}         the namespace of an anonymous client's generation, by the id
                         the client chose, while its socket is gone (expires with the grace)
    control              pub/sub channel: cancel, orphan and adopt requests

Another instance asked for the generation reads the stream from its start with
``XREAD BLOCK`` into a *replica* (:mod:`chatgate.chat.sharing`) and hands that to the
client like a local generation: every delta exactly once, seq as the original's. A
replica's cancel, orphan and adopt go over the control channel to the running
instance. When a stream stays quiet, the reader checks that the running instance is
still alive (:mod:`chatgate.cluster.instances`); if it died (``kill -9``, a lost
machine), the replica ends with a retryable error: the partial answer is in the
conversation, and the client may send the message again.

With Redis unreachable, mirroring stops for the generations running then (their own
instance still delivers them to the clients it has) and new ones are mirrored again once
Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chatgate.chat.events import Event, error_event
from chatgate.chat.generation import Generation
from chatgate.chat.sharing import GenerationControl
from chatgate.cluster import PREFIX
from chatgate.cluster.instances import Instance
from chatgate.store.base import StoreUnavailable

log = logging.getLogger("chatgate.cluster")

CONTROL = f"{PREFIX}control"
#: A stream is trimmed (approximately) beyond this many entries; an answer needs one
#: entry per batch of tokens, so only a runaway one comes near it.
STREAM_MAXLEN = 100_000
#: A running generation's stream outlives a silent hour at most (refreshed every half hour).
RUNNING_EXPIRE_S = 3600
#: While tokens keep coming, a generation's batches go out at most this often.
BATCH_S = 0.05
#: How long a replica's reader waits for new entries before checking on the instance.
BLOCK_MS = 1000
#: Retries of a reader that cannot reach Redis before its replica gives up.
READ_ATTEMPTS = 10
TERMINAL = ("done", "error")


def stream_key(namespace: str, generation_id: str) -> str:
    return f"{PREFIX}g:{namespace}:{generation_id}"


class RedisGenerations:
    """The shared generations of every instance on one Redis (``SharedGenerations``)."""

    def __init__(self, redis: aioredis.Redis, instance: Instance, *, keep_finished_s: float) -> None:
        # redis-py's annotations cover every reply type at once; replies are read as sent.
        self.redis: Any = redis
        self.instance = instance
        self.keep_finished_s = keep_finished_s
        self._keep_ms = max(1000, int(keep_finished_s * 1000))
        self._control: GenerationControl | None = None
        self._listening: asyncio.Task[None] | None = None
        self._mirrors: set[_Mirror] = set()
        self._replicas: dict[str, _Replica] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._failing = False

    # Lifetime ---------------------------------------------------------------------------

    async def start(self, control: GenerationControl) -> None:
        self._control = control
        subscribed = asyncio.get_running_loop().create_future()
        self._listening = asyncio.create_task(self._listen(subscribed), name="generation-control")
        # Wait (briefly) until requests from other instances reach this one.
        with_timeout = asyncio.wait_for(asyncio.shield(subscribed), timeout=5)
        try:
            await with_timeout
        except (TimeoutError, RedisError, OSError):
            log.warning("not subscribed to generation control yet; retrying in the background")

    async def close(self) -> None:
        """Finish writing what the generations logged (their ends included), then stop."""
        pending = [m.task for m in self._mirrors if m.task is not None]
        if pending:
            await asyncio.wait(pending, timeout=5)
        for replica in list(self._replicas.values()):
            if replica.task is not None:
                replica.task.cancel()
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)
        if self._sending:
            await asyncio.wait(self._sending, timeout=2)

    # The instance that runs a generation ---------------------------------------------------

    def publish(self, generation: Generation) -> None:
        mirror = _Mirror(self, generation)
        self._mirrors.add(mirror)
        generation.subscribe(mirror.grown)
        mirror.grown(generation)

    def _mirror_failed(self, mirror: _Mirror, exc: BaseException) -> None:
        if not self._failing:
            log.warning(
                "cannot mirror generations to Redis (%s); they are delivered from this instance only",
                exc,
                extra={"request_id": mirror.generation.id},
            )
        self._failing = True

    def _mirror_ok(self) -> None:
        if self._failing:
            log.info("mirroring generations to Redis again")
        self._failing = False

    async def _listen(self, subscribed: asyncio.Future[None]) -> None:
        delay = 0.1
        while True:
            pubsub: Any = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CONTROL)
                if not subscribed.done():
                    subscribed.set_result(None)
                delay = 0.1
                async for message in pubsub.listen():
                    self._handle(message["data"])
            except (RedisError, OSError) as exc:
                log.debug("generation control lost (%s); subscribing again", exc)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)

    def _handle(self, data: Any) -> None:
        try:
            request = orjson.loads(data)
            if request.get("to") != self.instance.id or self._control is None:
                return
            op, namespace, generation_id = request["op"], request["ns"], request["id"]
            if op == "cancel":
                self._control.cancel_local(namespace, generation_id)
            elif op == "orphan":
                self._control.orphan_local(namespace, generation_id, float(request["grace"]))
            elif op == "adopt":
                self._control.adopt_local(namespace, generation_id)
        except Exception:
            log.exception("a generation control request failed")

    # Other instances ------------------------------------------------------------------------

    def offer(self, generation: Generation, grace_s: float) -> None:
        self._spawn(self.redis.set(_offered_key(generation.id), generation.namespace, px=max(1, int(grace_s * 1000))))

    def withdraw(self, generation: Generation) -> None:
        self._spawn(self.redis.delete(_offered_key(generation.id)))

    async def find(
        self, namespaces: list[str], generation_id: str, *, offered: bool = False
    ) -> Generation | None:
        try:
            if offered and (namespace := await self.redis.get(_offered_key(generation_id))):
                namespaces = [*namespaces, namespace.decode()]
            for namespace in namespaces:
                key = stream_key(namespace, generation_id)
                known = self._replicas.get(key)
                if known is not None:
                    return known
                first = await self.redis.xrange(key, "-", "+", count=1)
                if first:
                    return self._replicate(key, namespace, first[0][1])
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis is not reachable: {exc}") from exc
        return None

    def orphan(self, replica: Generation, grace_s: float) -> None:
        if isinstance(replica, _Replica) and not replica.finished:
            self._send(replica, "orphan", grace=grace_s)

    def adopt(self, replica: Generation) -> None:
        if isinstance(replica, _Replica) and not replica.finished:
            self._send(replica, "adopt")

    def _replicate(self, key: str, namespace: str, fields: dict[bytes, bytes]) -> _Replica:
        start = orjson.loads(fields[b"e"])[0]
        owner = fields.get(b"o")
        replica = _Replica(
            id=start["id"],
            conversation_id=start["conversation_id"],
            agent=start["agent"],
            model=start["model"],
            owner=owner.decode() if owner is not None else None,
            namespace=namespace,
            conversation_key=fields.get(b"k", b"").decode(),
            replica=True,
        )
        replica.bus = self
        replica.origin = fields[b"i"].decode()
        self._replicas[key] = replica
        replica.task = asyncio.create_task(self._follow(replica, key), name=f"replica-{replica.id}")
        return replica

    async def _follow(self, replica: _Replica, key: str) -> None:
        """Fill ``replica``'s log from the stream until the generation ends."""
        last = b"0-0"
        failures = 0
        block: int | None = None  # the first read takes what is there without waiting
        try:
            while not replica.finished:
                try:
                    read = await self.redis.xread({key: last}, count=1000, block=block)
                    entries = read[0][1] if read else []
                    for entry_id, fields in entries:
                        last = entry_id
                        for event in orjson.loads(fields[b"e"]):
                            replica.replay(event)
                        if replica.finished:
                            return
                    if not entries or block is None:
                        if not await self._running_somewhere(replica, key):
                            # The end may have landed just before the instance stopped.
                            for _entry, fields in await self.redis.xrange(key, f"({last.decode()}", "+"):
                                for event in orjson.loads(fields[b"e"]):
                                    replica.replay(event)
                            if not replica.finished:
                                replica.finish(_lost(replica))
                            return
                    block = BLOCK_MS
                    failures = 0
                except (RedisError, OSError) as exc:
                    failures += 1
                    if failures >= READ_ATTEMPTS:
                        log.warning("cannot read a generation from Redis: %s", exc, extra={"request_id": replica.id})
                        replica.finish(_lost(replica))
                        return
                    await asyncio.sleep(min(2.0, 0.1 * 2**failures))
        finally:
            loop = asyncio.get_running_loop()
            loop.call_later(self.keep_finished_s, self._forget, key, replica)

    async def _running_somewhere(self, replica: _Replica, key: str) -> bool:
        return await self.instance.alive(replica.origin) and bool(await self.redis.exists(key))

    def _forget(self, key: str, replica: _Replica) -> None:
        if self._replicas.get(key) is replica:
            del self._replicas[key]

    def _send(self, replica: _Replica, op: str, **extra: Any) -> None:
        request = {"op": op, "to": replica.origin, "ns": replica.namespace, "id": replica.id, **extra}
        self._spawn(self.redis.publish(CONTROL, orjson.dumps(request)))

    def _spawn(self, request: Awaitable[Any]) -> None:
        """Send ``request`` to Redis without waiting for it (kept until it is done)."""
        task = asyncio.create_task(self._quietly(request))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    @staticmethod
    async def _quietly(request: Awaitable[Any]) -> None:
        try:
            await request
        except (RedisError, OSError) as exc:
            log.warning("cannot reach Redis to share a generation: %s", exc)


class _Replica(Generation):
    """A generation another instance runs; cancelling it asks that instance to."""

    bus: RedisGenerations
    origin: str

    def cancel(self) -> None:
        if not self.finished and not self.cancel_requested:
            self.cancel_requested = True
            self.bus._send(self, "cancel")


class _Mirror:
    """Writes one generation's log to its stream: one entry per batch of events, one
    batch in flight at a time, and at most one batch per ``BATCH_S`` while tokens keep
    coming (a slow upstream's tokens go out one by one, at once)."""

    __slots__ = ("bus", "generation", "index", "key", "refresh_at", "task")

    def __init__(self, bus: RedisGenerations, generation: Generation) -> None:
        self.bus = bus
        self.generation = generation
        self.key = stream_key(generation.namespace, generation.id)
        self.index = 0
        self.refresh_at = 0.0
        self.task: asyncio.Task[None] | None = None

    def grown(self, generation: Generation) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        bus = self.bus
        loop = asyncio.get_running_loop()
        over = False
        try:
            while True:
                events = self.generation.read_from(self.index)
                if not events:
                    return
                first = self.index == 0
                self.index += len(events)
                ended = events[-1]["type"] in TERMINAL
                began = loop.time()
                fields = self._fields(events, first=first)
                if first or ended or began >= self.refresh_at:
                    pipe = bus.redis.pipeline(transaction=False)
                    pipe.xadd(self.key, fields, maxlen=STREAM_MAXLEN, approximate=True)
                    if ended:
                        pipe.pexpire(self.key, bus._keep_ms)
                    else:
                        pipe.expire(self.key, RUNNING_EXPIRE_S)
                        self.refresh_at = began + RUNNING_EXPIRE_S / 2
                    await pipe.execute()
                else:
                    await bus.redis.xadd(self.key, fields, maxlen=STREAM_MAXLEN, approximate=True)
                bus._mirror_ok()
                if ended:
                    over = True
                    return
                # Let the next tokens gather into one entry. Other instances read this log
                # only to resume, where a few milliseconds do not matter; this instance's
                # own clients read the in-process log and wait for nothing.
                wait = began + BATCH_S - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
        except (RedisError, OSError) as exc:
            over = True
            self.generation.unsubscribe(self.grown)
            bus._mirror_failed(self, exc)
        finally:
            self.task = None
            if over:
                bus._mirrors.discard(self)

    def _fields(self, events: list[Event], *, first: bool) -> dict[Any, Any]:
        fields = {b"e": orjson.dumps(events)}
        if first:  # the batch that opens the stream begins with the start event
            generation = self.generation
            fields[b"i"] = self.bus.instance.id.encode()
            fields[b"k"] = generation.conversation_key.encode()
            if generation.owner is not None:
                fields[b"o"] = generation.owner.encode()
        return fields


def _offered_key(generation_id: str) -> str:
    return f"{PREFIX}offered:{generation_id}"


def _lost(replica: Generation) -> Event:
    return error_event(
        "internal",
        "the instance answering this stopped before the answer ended; the partial answer is "
        "kept in the conversation; send the message again",
        id=replica.id,
        retryable=True,
    )
