"""WebSocket dialects: one codec per seed system's client, over the native protocol.

Importing this package registers every dialect; see :mod:`.base` for the contract.
"""

from chatgate.api.dialects import cs_agent, monty, native, sequential, workshop
from chatgate.api.dialects.base import (
    Dialect,
    DialectFactory,
    Peer,
    dialect_named,
    dialect_names,
    register_dialect,
)
from chatgate.api.dialects.detect import first_frame

__all__ = [
    "Dialect",
    "DialectFactory",
    "Peer",
    "cs_agent",
    "dialect_named",
    "dialect_names",
    "first_frame",
    "monty",
    "native",
    "register_dialect",
    "sequential",
    "workshop",
]
