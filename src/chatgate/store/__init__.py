from chatgate.store import memory, redis, sqlite
from chatgate.store.base import (
    Conversation,
    ConversationInfo,
    ConversationStore,
    StoredMessage,
    StoreLimits,
    open_store,
)

__all__ = [
    "Conversation",
    "ConversationInfo",
    "ConversationStore",
    "StoreLimits",
    "StoredMessage",
    "memory",
    "open_store",
    "redis",
    "sqlite",
]
