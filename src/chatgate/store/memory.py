"""The in-process store: one dict in least-recently-written order, lost on restart.

All methods run on the event loop without awaiting anything, so each one is atomic
and needs no lock. Reads skip expired conversations but leave deleting them to writes
and :meth:`MemoryStore.purge_expired`, so purge counts match the other backends.

Every write stores copies of the messages it is given, tool calls and results included,
so a caller changing its objects later does not change history. An open turn finds its
messages again by identity, searching from the newest message: they are almost always the
last ones.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace

from chatgate.store.base import (
    MAX_OPEN_TURNS,
    Clock,
    Conversation,
    ConversationInfo,
    StoredMessage,
    StoreLimits,
    register_store,
)

TITLE_CHARS = 60


@dataclass(slots=True)
class _OpenTurn:
    user: StoredMessage
    answer: StoredMessage | None = None
    #: The turn created its conversation: taking it back leaves nothing worth keeping.
    created: bool = False


@dataclass(slots=True)
class _Entry:
    owner: str | None
    agent: str
    created_at: float
    updated_at: float
    title: str = ""
    messages: list[StoredMessage] = field(default_factory=list)
    #: Oldest first, so the one to forget over the cap is at the front.
    open_turns: dict[str, _OpenTurn] = field(default_factory=dict)

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
        #: The conversation of every open turn, kept in step with ``_Entry.open_turns``.
        self._turns: dict[str, str] = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        self._entries.clear()
        self._turns.clear()

    async def append(
        self,
        conversation_id: str,
        messages: list[StoredMessage],
        *,
        owner: str | None = None,
        agent: str = "general",
    ) -> None:
        self._write(conversation_id, [_own(m) for m in messages], owner, agent, self._clock())

    def _write(
        self,
        conversation_id: str,
        messages: list[StoredMessage],
        owner: str | None,
        agent: str,
        now: float,
    ) -> tuple[_Entry, bool]:
        """Append, creating the conversation when missing or expired, then evict over
        the cap; return the conversation and whether it was created."""
        entry = self._live(conversation_id, now)
        created = entry is None
        if entry is None:
            self._drop(conversation_id)
            entry = _Entry(owner=owner, agent=agent, created_at=now, updated_at=now)
            self._entries[conversation_id] = entry
        if not entry.title:
            entry.title = title_of(messages)
        entry.messages.extend(messages)
        self._trim(entry)
        self._touch(conversation_id, entry, now)
        while (
            len(self._entries) > self._limits.max_conversations
            and next(iter(self._entries)) != conversation_id
        ):
            self._drop(next(iter(self._entries)))
        return entry, created

    async def begin_turn(
        self,
        conversation_id: str,
        turn_id: str,
        user: StoredMessage,
        *,
        owner: str | None = None,
        agent: str = "general",
    ) -> None:
        self._close_turn(turn_id)
        own = _own(user)
        entry, created = self._write(conversation_id, [own], owner, agent, self._clock())
        entry.open_turns[turn_id] = _OpenTurn(user=own, created=created)
        self._turns[turn_id] = conversation_id
        while len(entry.open_turns) > MAX_OPEN_TURNS:
            self._close_turn(next(iter(entry.open_turns)))

    async def checkpoint(self, conversation_id: str, turn_id: str, text: str) -> None:
        now = self._clock()
        found = self._open_turn(conversation_id, turn_id, now)
        if found is None:
            return
        entry, turn = found
        self._put_answer(
            entry, turn, StoredMessage("assistant", text, partial=True, created_at=now)
        )
        self._touch(conversation_id, entry, now)

    async def end_turn(
        self, conversation_id: str, turn_id: str, answer: StoredMessage | None
    ) -> None:
        now = self._clock()
        found = self._open_turn(conversation_id, turn_id, now)
        if found is None:
            return
        entry, turn = found
        self._close_turn(turn_id)
        if answer is not None:
            self._put_answer(entry, turn, _own(answer))
        else:
            for written in (turn.answer, turn.user):
                position = _position(entry.messages, written)
                if position is not None:
                    del entry.messages[position]
            if turn.created and not entry.messages:
                self._drop(conversation_id)
                return
        self._touch(conversation_id, entry, now)

    async def interrupted(self, turn_id: str) -> str | None:
        conversation_id = self._turns.get(turn_id)
        if conversation_id is None or self._live(conversation_id, self._clock()) is None:
            return None
        return conversation_id

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
            for turn_id in list(entry.open_turns):
                self._close_turn(turn_id)
            self._touch(conversation_id, entry, now)

    async def delete(self, conversation_id: str) -> bool:
        entry = self._live(conversation_id, self._clock())
        self._drop(conversation_id)
        return entry is not None

    async def purge_expired(self) -> int:
        now = self._clock()
        expired = [cid for cid, entry in self._entries.items() if self._expired(entry, now)]
        for conversation_id in expired:
            self._drop(conversation_id)
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

    def _trim(self, entry: _Entry) -> None:
        excess = len(entry.messages) - max(self._limits.max_messages, 0)
        if excess > 0:
            del entry.messages[:excess]

    def _drop(self, conversation_id: str) -> None:
        entry = self._entries.pop(conversation_id, None)
        if entry is not None:
            for turn_id in entry.open_turns:
                del self._turns[turn_id]

    def _open_turn(
        self, conversation_id: str, turn_id: str, now: float
    ) -> tuple[_Entry, _OpenTurn] | None:
        """The live conversation and the turn, when the turn is open in it."""
        if self._turns.get(turn_id) != conversation_id:
            return None
        entry = self._live(conversation_id, now)
        return None if entry is None else (entry, entry.open_turns[turn_id])

    def _close_turn(self, turn_id: str) -> None:
        conversation_id = self._turns.pop(turn_id, None)
        entry = None if conversation_id is None else self._entries.get(conversation_id)
        if entry is not None:
            del entry.open_turns[turn_id]

    def _put_answer(self, entry: _Entry, turn: _OpenTurn, answer: StoredMessage) -> None:
        """Rewrite the turn's answer where it is, or append it when it has none (or
        it was trimmed away)."""
        position = None if turn.answer is None else _position(entry.messages, turn.answer)
        if position is None:
            entry.messages.append(answer)
            self._trim(entry)
        else:
            entry.messages[position] = answer
        turn.answer = answer


def _own(message: StoredMessage) -> StoredMessage:
    """A copy of ``message`` the store alone holds: a new object (an open turn finds its
    messages by identity) with its own tool call and result dicts."""
    return replace(
        message,
        tool_calls=tuple(call.copy() for call in message.tool_calls),
        tool_results=tuple(result.copy() for result in message.tool_results),
    )


def _position(messages: list[StoredMessage], message: StoredMessage | None) -> int | None:
    """Where ``message`` itself (not an equal one) is, searching from the newest."""
    if message is not None:
        for position in range(len(messages) - 1, -1, -1):
            if messages[position] is message:
                return position
    return None


@register_store("memory")
def open_memory_store(url: str, limits: StoreLimits, clock: Clock) -> MemoryStore:
    return MemoryStore(limits, clock)
