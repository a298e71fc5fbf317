"""How long the conversation store takes: a thin wrapper timing each call of the
:class:`~chatgate.store.base.ConversationStore` protocol into
``chatgate_store_operation_seconds{store, operation}``, failed calls included."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from chatgate.store.base import Conversation, ConversationInfo, ConversationStore, StoredMessage
from chatgate.telemetry.metrics import Metrics

T = TypeVar("T")


class TimedStore:
    """``store``, each call timed; anything else (``name``, a backend's own attributes)
    passes through."""

    def __init__(self, store: ConversationStore, metrics: Metrics) -> None:
        self.store = store
        self.name = store.name
        self._record = metrics.store_operation

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def _timed(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        began = time.perf_counter()
        try:
            return await call()
        finally:
            self._record(self.name, operation, time.perf_counter() - began)

    async def open(self) -> None:
        await self._timed("open", self.store.open)

    async def close(self) -> None:
        await self._timed("close", self.store.close)

    async def append(
        self, conversation_id: str, messages: list[StoredMessage], *, owner: str | None = None, agent: str = "general"
    ) -> None:
        await self._timed("append", lambda: self.store.append(conversation_id, messages, owner=owner, agent=agent))

    async def begin_turn(
        self,
        conversation_id: str,
        turn_id: str,
        user: StoredMessage,
        *,
        owner: str | None = None,
        agent: str = "general",
    ) -> None:
        await self._timed(
            "begin_turn", lambda: self.store.begin_turn(conversation_id, turn_id, user, owner=owner, agent=agent)
        )

    async def checkpoint(self, conversation_id: str, turn_id: str, text: str) -> None:
        await self._timed("checkpoint", lambda: self.store.checkpoint(conversation_id, turn_id, text))

    async def end_turn(self, conversation_id: str, turn_id: str, answer: StoredMessage | None) -> None:
        await self._timed("end_turn", lambda: self.store.end_turn(conversation_id, turn_id, answer))

    async def interrupted(self, turn_id: str) -> str | None:
        return await self._timed("interrupted", lambda: self.store.interrupted(turn_id))

    async def window(self, conversation_id: str, max_messages: int) -> list[StoredMessage]:
        return await self._timed("window", lambda: self.store.window(conversation_id, max_messages))

    async def get(self, conversation_id: str) -> Conversation | None:
        return await self._timed("get", lambda: self.store.get(conversation_id))

    async def info(self, conversation_id: str) -> ConversationInfo | None:
        return await self._timed("info", lambda: self.store.info(conversation_id))

    async def list(self, owner: str | None, *, limit: int = 100) -> list[ConversationInfo]:
        return await self._timed("list", lambda: self.store.list(owner, limit=limit))

    async def clear(self, conversation_id: str) -> None:
        await self._timed("clear", lambda: self.store.clear(conversation_id))

    async def delete(self, conversation_id: str) -> bool:
        return await self._timed("delete", lambda: self.store.delete(conversation_id))

    async def purge_expired(self) -> int:
        return await self._timed("purge_expired", self.store.purge_expired)

    async def ping(self) -> None:
        await self._timed("ping", self.store.ping)
