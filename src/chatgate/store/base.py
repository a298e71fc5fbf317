"""The conversation store contract, shared by the memory, SQLite and Redis backends.

A conversation is an ordered list of messages with an owner (the API key's identity, or
``None`` when anonymous) and the agent it was started with. Every write touches the
conversation's ``updated_at``; a conversation idle for longer than ``ttl_s`` is gone
(reads treat it as missing, and :meth:`ConversationStore.purge_expired` deletes it);
above ``max_conversations`` the least recently used one is evicted on write.

Time comes from an injected ``clock`` (seconds, like :func:`time.time`) so tests drive
expiry without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import urlparse

from chatgate.vocabulary import Role

Clock = Callable[[], float]

#: Messages kept per conversation; older ones are dropped. Far above any window sent
#: to a model, it only bounds what one conversation can occupy.
MAX_STORED_MESSAGES = 1000


class StoreUnavailable(Exception):
    """The store cannot be reached right now (a server that is down or unreachable); the
    same request may succeed later."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    role: Role
    content: str
    partial: bool = False
    created_at: float = 0.0

    def as_prompt(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


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
