"""The conversation store contract, shared by the memory, SQLite and Redis backends.

A conversation is an ordered list of messages with an owner (the API key's identity, or
``None`` when anonymous) and the agent it was started with. Every write touches the
conversation's ``updated_at``; a conversation idle for longer than ``ttl_s`` is gone
(reads treat it as missing, and :meth:`ConversationStore.purge_expired` deletes it);
above ``max_conversations`` the least recently used one is evicted on write.

Time comes from an injected ``clock`` (seconds, like :func:`time.time`) so tests drive
expiry without sleeping.

A turn is written as it happens, so a process killed mid-answer leaves history a client
can read: :meth:`ConversationStore.begin_turn` stores the user's message and records the
turn as open, :meth:`~ConversationStore.checkpoint` keeps the answer so far in one
assistant message marked partial (written the first time, then rewritten in place, so a
conversation does not grow with each checkpoint), and :meth:`~ConversationStore.end_turn`
writes the final answer, or takes the whole turn back when nothing was answered. Each
call is one atomic write, like :meth:`~ConversationStore.append`, and counts as use of the
conversation for expiry and eviction. Once the conversation is deleted, cleared or
expired, the turn is closed: its later checkpoints and end write nothing, so erased
history stays erased. A turn that was begun and never ended is one whose process died;
:meth:`~ConversationStore.interrupted` says so while its conversation lives. Open-turn
records leave with their conversation, and at most :data:`MAX_OPEN_TURNS` are kept per
conversation (only a crash leaves one behind).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable
from urllib.parse import urlparse

from chatgate.vocabulary import Message, Role, ToolCall, ToolResult, tool_messages

Clock = Callable[[], float]

#: Messages kept per conversation; older ones are dropped. Far above any window sent
#: to a model, it only bounds what one conversation can occupy.
MAX_STORED_MESSAGES = 1000

#: Open turns remembered per conversation; beginning one more forgets the oldest. A
#: conversation answers one turn at a time, so only turns whose process died add up.
MAX_OPEN_TURNS = 8


class StoreUnavailable(Exception):
    """The store cannot be reached right now (a server that is down or unreachable); the
    same request may succeed later."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message as stored. An assistant answer may hold the ``tool_calls`` it made; a
    turn that answers tool calls is stored as one ``tool`` message holding every
    ``tool_results`` of that turn (its ``content`` empty), so each turn begins with one
    message whatever its kind."""

    role: Role
    content: str
    partial: bool = False
    created_at: float = 0.0
    tool_calls: tuple[ToolCall, ...] = ()
    tool_results: tuple[ToolResult, ...] = ()

    def as_prompt(self) -> list[Message]:
        """The message as a prompt's messages: one, or one per tool result."""
        if self.tool_results:
            return tool_messages(list(self.tool_results))
        message: Message = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = list(self.tool_calls)
        return [message]

    def tools_json(self) -> dict[str, list[ToolCall] | list[ToolResult]] | None:
        """The tool fields as a JSON object for stores that keep them in one column or
        field (None: the message has none)."""
        fields: dict[str, list[ToolCall] | list[ToolResult]] = {}
        if self.tool_calls:
            fields["tool_calls"] = list(self.tool_calls)
        if self.tool_results:
            fields["tool_results"] = list(self.tool_results)
        return fields or None

    @classmethod
    def from_tools_json(
        cls,
        role: str,
        content: str,
        partial: bool,
        created_at: float,
        tools: Mapping[str, Any] | None,
    ) -> StoredMessage:
        """The message a store reads back: ``tools`` is what :meth:`tools_json` gave, as
        decoded JSON (None: no tool fields)."""
        if not tools:
            return cls(cast(Role, role), content, partial, created_at)
        return cls(
            cast(Role, role),
            content,
            partial,
            created_at,
            tool_calls=tuple(tools.get("tool_calls", ())),
            tool_results=tuple(tools.get("tool_results", ())),
        )


@dataclass(frozen=True, slots=True)
class ConversationInfo:
    id: str
    owner: str | None
    agent: str
    created_at: float
    updated_at: float
    message_count: int
    title: str = ""


@dataclass(frozen=True, slots=True)
class Conversation:
    info: ConversationInfo
    messages: list[StoredMessage] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StoreLimits:
    ttl_s: float = 3600.0
    max_conversations: int = 10_000
    max_messages: int = MAX_STORED_MESSAGES


@runtime_checkable
class ConversationStore(Protocol):
    name: str

    async def open(self) -> None:
        """Create tables, connect; called once before use."""
        ...

    async def close(self) -> None: ...

    async def append(
        self,
        conversation_id: str,
        messages: list[StoredMessage],
        *,
        owner: str | None = None,
        agent: str = "general",
    ) -> None:
        """Add messages, creating the conversation when new (owner and agent are
        recorded at creation only), then evict least recently used ones over the cap."""
        ...

    async def begin_turn(
        self,
        conversation_id: str,
        turn_id: str,
        user: StoredMessage,
        *,
        owner: str | None = None,
        agent: str = "general",
    ) -> None:
        """Append the user's message as :meth:`append` does and record ``turn_id`` (unique
        per generation) as open in this conversation."""
        ...

    async def checkpoint(self, conversation_id: str, turn_id: str, text: str) -> None:
        """Keep the answer so far: the turn's assistant message, partial, holding ``text``
        and stamped with the clock. The first checkpoint appends it; later ones rewrite
        it in place. Nothing happens when the turn is not open in this conversation."""
        ...

    async def end_turn(
        self, conversation_id: str, turn_id: str, answer: StoredMessage | None
    ) -> None:
        """Close the turn. With an ``answer`` (an assistant message), it replaces the
        checkpointed one, or is appended when there was none. With ``None`` nothing was
        answered and the client will ask again: the turn's messages are removed, and a
        conversation this turn created and left empty is deleted. Nothing happens when
        the turn is not open in this conversation."""
        ...

    async def interrupted(self, turn_id: str) -> str | None:
        """The conversation of ``turn_id`` when it was begun and never ended (its process
        died), while that conversation lives; ``None`` otherwise."""
        ...

    async def window(self, conversation_id: str, max_messages: int) -> list[StoredMessage]:
        """The last ``max_messages`` messages, oldest first; [] when missing or expired."""
        ...

    async def get(self, conversation_id: str) -> Conversation | None: ...

    async def info(self, conversation_id: str) -> ConversationInfo | None: ...

    async def list(self, owner: str | None, *, limit: int = 100) -> list[ConversationInfo]:
        """The owner's live conversations, most recently used first."""
        ...

    async def clear(self, conversation_id: str) -> None:
        """Forget the messages but keep the conversation (``clear_history``)."""
        ...

    async def delete(self, conversation_id: str) -> bool: ...

    async def purge_expired(self) -> int:
        """Delete expired conversations; return how many."""
        ...

    async def ping(self) -> None:
        """Raise when the store cannot serve."""
        ...


StoreFactory = Callable[[str, StoreLimits, Clock], ConversationStore]
_REGISTRY: dict[str, StoreFactory] = {}


def register_store(scheme: str) -> Callable[[StoreFactory], StoreFactory]:
    def decorate(factory: StoreFactory) -> StoreFactory:
        _REGISTRY[scheme] = factory
        return factory

    return decorate


def open_store(url: str, limits: StoreLimits, clock: Clock = time.time) -> ConversationStore:
    """Build the store named by ``url``: ``memory``, ``sqlite:///path.db``, ``redis://…``."""
    scheme = urlparse(url).scheme or url
    try:
        factory = _REGISTRY[scheme]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown store {url!r}; known schemes: {known}") from None
    return factory(url, limits, clock)
