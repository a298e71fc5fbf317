"""The in-process store: one dict in least-recently-written order, lost on restart.

All methods run on the event loop without awaiting anything, so each one is atomic
and needs no lock. Reads skip expired conversations but leave deleting them to writes
and :meth:`MemoryStore.purge_expired`, so purge counts match the other backends.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from chatgate.store.base import (
    Clock,
    Conversation,
    ConversationInfo,
    StoredMessage,
    StoreLimits,
    register_store,
)

TITLE_CHARS = 60


@dataclass(slots=True)
class _Entry:
    owner: str | None
    agent: str
    created_at: float
    updated_at: float
    title: str = ""
    messages: list[StoredMessage] = field(default_factory=list)

    def info(self, conversation_id: str) -> ConversationInfo:
        return ConversationInfo(
            id=conversation_id,
            owner=self.owner,
            agent=self.agent,
            created_at=self.created_at,
            updated_at=self.updated_at,
            message_count=len(self.messages),
            title=self.title,
        )


def title_of(messages: list[StoredMessage]) -> str:
    """The first non-empty user message, cut to a title."""
    for message in messages:
        if message.role == "user" and message.content:
            return message.content[:TITLE_CHARS]
    return ""


class MemoryStore:
    name = "memory"

    def __init__(self, limits: StoreLimits, clock: Clock) -> None:
        self._limits = limits
        self._clock = clock
        # Oldest write first: moving an entry to the end on every write keeps the
        # least recently used one at the front, ready for eviction.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        self._entries.clear()

    async def append(
        self,
        conversation_id: str,
        messages: list[StoredMessage],
        *,
        owner: str | None = None,
        agent: str = "general",
    ) -> None:
        now = self._clock()
        entry = self._live(conversation_id, now)
        if entry is None:
            entry = _Entry(owner=owner, agent=agent, created_at=now, updated_at=now)
            self._entries[conversation_id] = entry
        if not entry.title:
            entry.title = title_of(messages)
        entry.messages.extend(messages)
        excess = len(entry.messages) - max(self._limits.max_messages, 0)
        if excess > 0:
            del entry.messages[:excess]
        self._touch(conversation_id, entry, now)
        while (
            len(self._entries) > self._limits.max_conversations
            and next(iter(self._entries)) != conversation_id
        ):
            self._entries.popitem(last=False)

    async def window(self, conversation_id: str, max_messages: int) -> list[StoredMessage]:
        entry = self._live(conversation_id, self._clock())
        if entry is None or max_messages <= 0:
            return []
        return entry.messages[-max_messages:]

    async def get(self, conversation_id: str) -> Conversation | None:
        entry = self._live(conversation_id, self._clock())
        if entry is None:
            return None
        return Conversation(info=entry.info(conversation_id), messages=list(entry.messages))

    async def info(self, conversation_id: str) -> ConversationInfo | None:
        entry = self._live(conversation_id, self._clock())
        return None if entry is None else entry.info(conversation_id)

    async def list(self, owner: str | None, *, limit: int = 100) -> list[ConversationInfo]:
        if limit <= 0:
            return []
        now = self._clock()
        mine = [
            entry.info(conversation_id)
            for conversation_id, entry in reversed(self._entries.items())
            if entry.owner == owner and not self._expired(entry, now)
        ]
        mine.sort(key=lambda info: info.updated_at, reverse=True)
        return mine[:limit]

    async def clear(self, conversation_id: str) -> None:
        now = self._clock()
        entry = self._live(conversation_id, now)
        if entry is not None:
            entry.messages.clear()
            self._touch(conversation_id, entry, now)

    async def delete(self, conversation_id: str) -> bool:
        entry = self._live(conversation_id, self._clock())
        self._entries.pop(conversation_id, None)
        return entry is not None

    async def purge_expired(self) -> int:
        now = self._clock()
        expired = [cid for cid, entry in self._entries.items() if self._expired(entry, now)]
        for conversation_id in expired:
            del self._entries[conversation_id]
        return len(expired)

    async def ping(self) -> None:
        pass

    def _expired(self, entry: _Entry, now: float) -> bool:
        return now - entry.updated_at > self._limits.ttl_s

    def _live(self, conversation_id: str, now: float) -> _Entry | None:
        entry = self._entries.get(conversation_id)
        if entry is None or self._expired(entry, now):
            return None
        return entry

    def _touch(self, conversation_id: str, entry: _Entry, now: float) -> None:
        entry.updated_at = now
        self._entries.move_to_end(conversation_id)


@register_store("memory")
def open_memory_store(url: str, limits: StoreLimits, clock: Clock) -> MemoryStore:
    return MemoryStore(limits, clock)
