"""The Redis store: conversations shared by every chatgate process that points at one
Redis (``redis://host:port/db``, ``rediss://…``, ``unix:///path.sock``).

Keys, under the ``chatgate:`` prefix::

    c:{id}        hash: owner (absent when anonymous), agent, title, created, updated,
                  turns (how many turns were begun: the order of open ones)
    m:{id}        list of messages, oldest first, JSON [role, content, partial, created_at],
                  then the tool fields as an object when the message has any
                  (``StoredMessage.tools_json()``), then the turn id when a turn wrote it
    recent        sorted set: every conversation by its last write (eviction, purging)
    o:{owner}     sorted set per owner (``anon`` for anonymous callers): listing
    turn:{turn}   hash of an open turn: conversation, created ("1" when the turn made it)
    turns:{id}    sorted set: the conversation's open turns, oldest first

Expiry compares ``updated`` with the injected clock, as the other stores do, so all of
them agree at the boundary; each write also sets a Redis ``EXPIRE`` a little past the
idle limit, so a conversation nobody returns to leaves Redis's memory even when no
process purges. Every write of a turn is one script, so one round trip, and atomic
against the other processes; windowed reads are one ``LRANGE`` of the window.

A turn finds its messages by their turn id, scanning from the newest: they are almost
always the last one or two, so only the last two entries are read unless another writer
came in between. The id is matched as the entry's encoded tail, ``,"<turn id>"]``,
which no other entry can end with (the id is the only string that can come last), so
nothing is decoded in Lua and no script counts an entry's elements. The turn's answer is
its entry whose role is ``assistant``. Dropping a conversation drops its open turns, and
every write refreshes their expiry with the conversation's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatgate.store.base import (
    MAX_OPEN_TURNS,
    Clock,
    Conversation,
    ConversationInfo,
    StoredMessage,
    StoreLimits,
    StoreUnavailable,
    register_store,
)
from chatgate.store.memory import title_of

PREFIX = "chatgate:"
#: Redis drops an idle conversation's keys this long after the idle limit.
EXPIRE_MARGIN_S = 60

_DROP = """
local function close_turns(p, cid)
  local tk = p .. 'turns:' .. cid
  for _, turn in ipairs(redis.call('ZRANGE', tk, 0, -1)) do redis.call('DEL', p .. 'turn:' .. turn) end
  redis.call('DEL', tk)
end
local function drop(p, cid)
  local owner = redis.call('HGET', p .. 'c:' .. cid, 'owner')
  redis.call('ZREM', owner and (p .. 'o:' .. owner) or (p .. 'anon'), cid)
  redis.call('ZREM', p .. 'recent', cid)
  close_turns(p, cid)
  return redis.call('DEL', p .. 'c:' .. cid, p .. 'm:' .. cid)
end
local function alive(p, cid, now, ttl)
  local updated = redis.call('HGET', p .. 'c:' .. cid, 'updated')
  return updated and now - tonumber(updated) <= ttl
end
local function touch(p, cid, now, expire)
  local ck = p .. 'c:' .. cid
  redis.call('HSET', ck, 'updated', now)
  local owner = redis.call('HGET', ck, 'owner')
  redis.call('ZADD', owner and (p .. 'o:' .. owner) or (p .. 'anon'), now, cid)
  redis.call('ZADD', p .. 'recent', now, cid)
  redis.call('EXPIRE', ck, expire)
  redis.call('EXPIRE', p .. 'm:' .. cid, expire)
  local tk = p .. 'turns:' .. cid
  for _, turn in ipairs(redis.call('ZRANGE', tk, 0, -1)) do redis.call('EXPIRE', p .. 'turn:' .. turn, expire) end
  redis.call('EXPIRE', tk, expire)
end
"""

# Shared by append and begin_turn. Returns whether the conversation was created.
_WRITE = _DROP + """
local function write(p, id, now, ttl, expire, max_conversations, max_messages, has_owner, owner,
                     agent, title, entries)
  local ck, mk = p .. 'c:' .. id, p .. 'm:' .. id
  if redis.call('EXISTS', ck) == 1 and not alive(p, id, tonumber(now), ttl) then drop(p, id) end
  local created = redis.call('EXISTS', ck) == 0
  if created then
    redis.call('HSET', ck, 'agent', agent, 'title', '', 'created', now)
    if has_owner == '1' then redis.call('HSET', ck, 'owner', owner) end
  end
  if title ~= '' and redis.call('HGET', ck, 'title') == '' then
    redis.call('HSET', ck, 'title', title)
  end
  for _, entry in ipairs(entries) do redis.call('RPUSH', mk, entry) end
  if #entries > 0 then redis.call('LTRIM', mk, -max_messages, -1) end
  touch(p, id, now, expire)
  local excess = redis.call('ZCARD', p .. 'recent') - max_conversations
  if excess > 0 then
    local oldest = redis.call('ZRANGE', p .. 'recent', 0, excess)
    for _, victim in ipairs(oldest) do
      if excess > 0 and victim ~= id then
        drop(p, victim)
        excess = excess - 1
      end
    end
  end
  return created
end
"""

# ARGV: prefix, id, now, ttl, expire, max_conversations, max_messages, has_owner, owner,
#       agent, title, messages...
_APPEND = _WRITE + """
local entries = {}
for i = 12, #ARGV do entries[#entries + 1] = ARGV[i] end
write(ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]),
      tonumber(ARGV[7]), ARGV[8], ARGV[9], ARGV[10], ARGV[11], entries)
return 1
"""

# ARGV: prefix, id, now, ttl, expire, max_conversations, max_messages, has_owner, owner,
#       agent, title, user message, turn id, max open turns
_BEGIN = _WRITE + """
local p, id, turn, expire = ARGV[1], ARGV[2], ARGV[13], ARGV[5]
local uk, tk = p .. 'turn:' .. turn, p .. 'turns:' .. id
local previous = redis.call('HGET', uk, 'conversation')
if previous then redis.call('ZREM', p .. 'turns:' .. previous, turn) end
local created = write(p, id, ARGV[3], tonumber(ARGV[4]), expire, tonumber(ARGV[6]),
                      tonumber(ARGV[7]), ARGV[8], ARGV[9], ARGV[10], ARGV[11], {ARGV[12]})
redis.call('HSET', uk, 'conversation', id, 'created', created and '1' or '0')
redis.call('ZADD', tk, redis.call('HINCRBY', p .. 'c:' .. id, 'turns', 1), turn)
local excess = redis.call('ZCARD', tk) - tonumber(ARGV[14])
if excess > 0 then
  for _, forgotten in ipairs(redis.call('ZRANGE', tk, 0, excess - 1)) do
    redis.call('DEL', p .. 'turn:' .. forgotten)
  end
  redis.call('ZREMRANGEBYRANK', tk, 0, excess - 1)
end
redis.call('EXPIRE', uk, expire)
redis.call('EXPIRE', tk, expire)
return 1
"""

# Finds an open turn's entries; the caller checked that the turn is open in ``id``.
_TURN = _DROP + """
local function open_turn(p, id, turn, now, ttl)
  return redis.call('HGET', p .. 'turn:' .. turn, 'conversation') == id and alive(p, id, now, ttl)
end
-- The turn's answer and user message in m:{id}, each as {index, entry} or nil: the last
-- two entries first, then the whole list when the user message is not among them (or
-- the answer, when that is all the caller needs).
local function entries_of(mk, tag, answer_only)
  local length = redis.call('LLEN', mk)
  local from = math.max(length - 2, 0)
  while true do
    local items = redis.call('LRANGE', mk, from, length - 1)
    local answer, question
    for i = #items, 1, -1 do
      local item = items[i]
      if string.sub(item, -#tag) == tag then
        if string.sub(item, 1, 13) ~= '["assistant",' then
          question = {from + i - 1, item}
          break
        elseif not answer then
          answer = {from + i - 1, item}
          if answer_only then return answer end
        end
      end
    end
    if question or from == 0 then return answer, question end
    from = 0
  end
end
-- Rewrite the turn's answer where it is, or append it when it has none.
local function put_answer(mk, tag, entry, max_messages)
  local answer = entries_of(mk, tag, true)
  if answer then
    redis.call('LSET', mk, answer[1], entry)
  else
    redis.call('RPUSH', mk, entry)
    redis.call('LTRIM', mk, -max_messages, -1)
  end
end
"""

# ARGV: prefix, id, turn id, now, ttl, expire, max_messages, tag, answer entry
_CHECKPOINT = _TURN + """
local p, id, turn = ARGV[1], ARGV[2], ARGV[3]
if not open_turn(p, id, turn, tonumber(ARGV[4]), tonumber(ARGV[5])) then return 0 end
put_answer(p .. 'm:' .. id, ARGV[8], ARGV[9], tonumber(ARGV[7]))
touch(p, id, ARGV[4], ARGV[6])
return 1
"""

# ARGV: prefix, id, turn id, now, ttl, expire, max_messages, tag, answer entry or ''
_END = _TURN + """
local p, id, turn, tag = ARGV[1], ARGV[2], ARGV[3], ARGV[8]
if not open_turn(p, id, turn, tonumber(ARGV[4]), tonumber(ARGV[5])) then return 0 end
local mk, uk = p .. 'm:' .. id, p .. 'turn:' .. turn
local created = redis.call('HGET', uk, 'created') == '1'
redis.call('DEL', uk)
redis.call('ZREM', p .. 'turns:' .. id, turn)
if ARGV[9] ~= '' then
  put_answer(mk, tag, ARGV[9], tonumber(ARGV[7]))
else
  local answer, question = entries_of(mk, tag, false)
  if answer then redis.call('LREM', mk, -1, answer[2]) end
  if question then redis.call('LREM', mk, -1, question[2]) end
  if created and redis.call('LLEN', mk) == 0 then
    drop(p, id)
    return 1
  end
end
touch(p, id, ARGV[4], ARGV[6])
return 1
"""

# ARGV: prefix, turn id, now, ttl
_INTERRUPTED = _TURN + """
local p, turn = ARGV[1], ARGV[2]
local id = redis.call('HGET', p .. 'turn:' .. turn, 'conversation')
if id and alive(p, id, tonumber(ARGV[3]), tonumber(ARGV[4])) then return id end
return false
"""

# ARGV: prefix, id, now, ttl, expire
_CLEAR = _DROP + """
local p, id, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if not alive(p, id, now, ttl) then return 0 end
redis.call('DEL', p .. 'm:' .. id)
close_turns(p, id)
touch(p, id, ARGV[3], ARGV[5])
return 1
"""

# ARGV: prefix, id, now, ttl
_DELETE = _DROP + """
local p, id, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local was_alive = alive(p, id, now, ttl)
drop(p, id)
return was_alive and 1 or 0
"""

# ARGV: prefix, oldest updated time still alive (exclusive bound below it)
_PURGE = _DROP + """
local p = ARGV[1]
local expired = redis.call('ZRANGEBYSCORE', p .. 'recent', '-inf', '(' .. ARGV[2])
local count = 0
for _, cid in ipairs(expired) do
  if drop(p, cid) > 0 then count = count + 1 end
end
return count
"""


#: Connections one client may hold at once. Each command in flight holds one (a busy
#: gateway has hundreds of answers writing at the same moment); one more waits for a
#: connection to come free, for up to ``POOL_WAIT_S``, rather than failing at once as
#: redis-py's default pool does.
POOL_SIZE = 512
POOL_WAIT_S = 10.0


def connect(url: str) -> aioredis.Redis:
    """A client with its own pool of connections to the Redis at ``url``."""
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=POOL_SIZE, timeout=POOL_WAIT_S)
    return aioredis.Redis(connection_pool=pool)


P = ParamSpec("P")
T = TypeVar("T")


def _reachable(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Report a Redis that cannot be reached as :class:`StoreUnavailable`; redis-py
    reconnects by itself on a later call, so the store recovers when Redis is back."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Redis is not reachable: {exc}") from exc

    return call


def _encode(message: StoredMessage, turn_id: str | None = None) -> bytes:
    fields: list[object] = [message.role, message.content, message.partial, message.created_at]
    tools = message.tools_json()
    if tools is not None:
        fields.append(tools)
    if turn_id is not None:
        fields.append(turn_id)  # last: see _tag
    return orjson.dumps(fields)


def _tag(turn_id: str) -> bytes:
    """How every entry a turn wrote ends (see :func:`_encode`)."""
    return b"," + orjson.dumps(turn_id) + b"]"


def _decode(raw: bytes) -> StoredMessage:
    """Told apart by type, the optional elements: the tool fields are an object, the turn
    id a string (entries written before tool fields existed have no object)."""
    role, content, partial, created_at, *rest = orjson.loads(raw)
    tools = next((item for item in rest if isinstance(item, dict)), None)
    return StoredMessage.from_tools_json(role, content, partial, created_at, tools)


def _info(conversation_id: str, fields: dict[bytes, bytes], count: int) -> ConversationInfo:
    owner = fields.get(b"owner")
    return ConversationInfo(
        id=conversation_id,
        owner=owner.decode() if owner is not None else None,
        agent=fields[b"agent"].decode(),
        created_at=float(fields[b"created"]),
        updated_at=float(fields[b"updated"]),
        message_count=count,
        title=fields.get(b"title", b"").decode(),
    )


class RedisStore:
    name = "redis"

    def __init__(self, url: str, limits: StoreLimits, clock: Clock) -> None:
        self.url = url
        self._limits = limits
        self._clock = clock
        self._expire = math.ceil(limits.ttl_s) + EXPIRE_MARGIN_S
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}

    @property
    def _db(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("RedisStore used before open() or after close()")
        return self._redis

    async def open(self) -> None:
        client = connect(self.url)
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self._redis = client
        scripts = {
            "append": _APPEND, "begin": _BEGIN, "checkpoint": _CHECKPOINT, "end": _END,
            "interrupted": _INTERRUPTED, "clear": _CLEAR, "delete": _DELETE, "purge": _PURGE,
        }
        for name, source in scripts.items():
            self._scripts[name] = client.register_script(source)

    async def close(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            await client.aclose()

    def _alive(self, fields: dict[bytes, bytes]) -> bool:
        updated = fields.get(b"updated")
        return updated is not None and self._clock() - float(updated) <= self._limits.ttl_s

    @_reachable
    async def append(
        self,
        conversation_id: str,
        messages: list[StoredMessage],
        *,
        owner: str | None = None,
        agent: str = "general",
    ) -> None:
        args: list[Any] = [
            PREFIX, conversation_id, repr(self._clock()), repr(self._limits.ttl_s), self._expire,
            self._limits.max_conversations, max(self._limits.max_messages, 1),
            "1" if owner is not None else "0", owner or "", agent, title_of(messages),
            *(_encode(m) for m in messages),
        ]
        await self._scripts["append"](args=args, client=self._db)

    @_reachable
    async def begin_turn(
        self,
        conversation_id: str,
        turn_id: str,
        user: StoredMessage,
        *,
        owner: str | None = None,
        agent: str = "general",
    ) -> None:
        args: list[Any] = [
            PREFIX, conversation_id, repr(self._clock()), repr(self._limits.ttl_s), self._expire,
            self._limits.max_conversations, max(self._limits.max_messages, 1),
            "1" if owner is not None else "0", owner or "", agent, title_of([user]),
            _encode(user, turn_id), turn_id, MAX_OPEN_TURNS,
        ]
        await self._scripts["begin"](args=args, client=self._db)

    @_reachable
    async def checkpoint(self, conversation_id: str, turn_id: str, text: str) -> None:
        now = self._clock()
        answer = StoredMessage("assistant", text, partial=True, created_at=now)
        await self._scripts["checkpoint"](args=self._turn_args(conversation_id, turn_id, now, answer), client=self._db)

    @_reachable
    async def end_turn(self, conversation_id: str, turn_id: str, answer: StoredMessage | None) -> None:
        args = self._turn_args(conversation_id, turn_id, self._clock(), answer)
        await self._scripts["end"](args=args, client=self._db)

    def _turn_args(self, conversation_id: str, turn_id: str, now: float, answer: StoredMessage | None) -> list[Any]:
        return [
            PREFIX, conversation_id, turn_id, repr(now), repr(self._limits.ttl_s), self._expire,
            max(self._limits.max_messages, 1), _tag(turn_id),
            b"" if answer is None else _encode(answer, turn_id),
        ]

    @_reachable
    async def interrupted(self, turn_id: str) -> str | None:
        args = [PREFIX, turn_id, repr(self._clock()), repr(self._limits.ttl_s)]
        found = await self._scripts["interrupted"](args=args, client=self._db)
        return None if found is None else cast(bytes, found).decode()

    @_reachable
    async def window(self, conversation_id: str, max_messages: int) -> list[StoredMessage]:
        if max_messages <= 0:
            return []
        async with self._db.pipeline(transaction=False) as pipe:
            pipe.hget(PREFIX + "c:" + conversation_id, "updated")
            pipe.lrange(PREFIX + "m:" + conversation_id, -max_messages, -1)
            updated, raw = await pipe.execute()
        if updated is None or self._clock() - float(updated) > self._limits.ttl_s:
            return []
        return [_decode(item) for item in raw]

    @_reachable
    async def get(self, conversation_id: str) -> Conversation | None:
        async with self._db.pipeline(transaction=False) as pipe:
            pipe.hgetall(PREFIX + "c:" + conversation_id)
            pipe.lrange(PREFIX + "m:" + conversation_id, 0, -1)
            fields, raw = await pipe.execute()
        if not fields or not self._alive(fields):
            return None
        return Conversation(_info(conversation_id, fields, len(raw)), [_decode(item) for item in raw])

    @_reachable
    async def info(self, conversation_id: str) -> ConversationInfo | None:
        async with self._db.pipeline(transaction=False) as pipe:
            pipe.hgetall(PREFIX + "c:" + conversation_id)
            pipe.llen(PREFIX + "m:" + conversation_id)
            fields, count = await pipe.execute()
        if not fields or not self._alive(fields):
            return None
        return _info(conversation_id, fields, count)

    @_reachable
    async def list(self, owner: str | None, *, limit: int = 100) -> list[ConversationInfo]:
        if limit <= 0:
            return []
        index = PREFIX + ("o:" + owner if owner is not None else "anon")
        oldest_alive = self._clock() - self._limits.ttl_s
        found = await self._db.zrevrangebyscore(index, "+inf", repr(oldest_alive), start=0, num=limit)
        ids = [cast(bytes, raw).decode() for raw in found]
        async with self._db.pipeline(transaction=False) as pipe:
            for conversation_id in ids:
                pipe.hgetall(PREFIX + "c:" + conversation_id)
                pipe.llen(PREFIX + "m:" + conversation_id)
            replies = await pipe.execute()
        infos = []
        for n, conversation_id in enumerate(ids):
            fields, count = replies[2 * n], replies[2 * n + 1]
            if fields and self._alive(fields):  # Redis may have expired it meanwhile
                infos.append(_info(conversation_id, fields, count))
        return infos

    @_reachable
    async def clear(self, conversation_id: str) -> None:
        args = [PREFIX, conversation_id, repr(self._clock()), repr(self._limits.ttl_s), self._expire]
        await self._scripts["clear"](args=args, client=self._db)

    @_reachable
    async def delete(self, conversation_id: str) -> bool:
        args = [PREFIX, conversation_id, repr(self._clock()), repr(self._limits.ttl_s)]
        return bool(await self._scripts["delete"](args=args, client=self._db))

    @_reachable
    async def purge_expired(self) -> int:
        oldest_alive = self._clock() - self._limits.ttl_s
        return int(await self._scripts["purge"](args=[PREFIX, repr(oldest_alive)], client=self._db))

    @_reachable
    async def ping(self) -> None:
        await self._db.ping()


def open_redis_store(url: str, limits: StoreLimits, clock: Clock) -> RedisStore:
    return RedisStore(url, limits, clock)


for _scheme in ("redis", "rediss", "unix"):
    register_store(_scheme)(open_redis_store)
