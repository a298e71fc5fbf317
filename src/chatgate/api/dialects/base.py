"""What every WebSocket dialect is: a codec between one client protocol and the native one.

A dialect decodes each client frame into one native *command* — :class:`Chat`,
:class:`Cancel`, :class:`Resume`, :class:`ClearHistory`, :class:`Ping` — or into a
:class:`Reply` of its own frames (how a dialect answers a frame it cannot accept), and
encodes each native event (``start``/``delta``/``done``/``error`` of a generation, and the
``pong`` and ``history_cleared`` answers) into zero, one or several frames of its own.
It may keep per-connection state for that: a conversation id made per socket, the
client's ``task_id`` of each request, the text accumulated so far.

Everything else — starting turns (one at a time, queued, for the seed dialects), sending
and its timeout, cancel, resume, orphaning generations when the socket drops — is the
connection's (:mod:`chatgate.api.ws`), written once for every dialect.

Dialects register themselves by name with :func:`register_dialect`; ``?dialect=NAME`` on
any WebSocket path picks one from the registry.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypedDict, TypeVar

from chatgate.api.limits import SizeLimits
from chatgate.chat.events import ChatError, Event
from chatgate.chat.generation import Generation
from chatgate.chat.service import Turn

if TYPE_CHECKING:
    from chatgate.gateway import Gateway

#: One frame a dialect sends, serialised as a JSON object.
Frame = Mapping[str, Any]
MAX_ID_CHARS = 128


class PongEvent(TypedDict):
    type: Literal["pong"]


class HistoryClearedEvent(TypedDict):
    type: Literal["history_cleared"]
    conversation_id: str


#: Everything a dialect is asked to encode.
Outgoing = Event | PongEvent | HistoryClearedEvent


@dataclass(frozen=True, slots=True)
class Chat:
    """Start ``turn``; the connection fills in its owner and client address."""

    turn: Turn


@dataclass(frozen=True, slots=True)
class Cancel:
    id: str


@dataclass(frozen=True, slots=True)
class Resume:
    id: str
    after: int


@dataclass(frozen=True, slots=True)
class ClearHistory:
    conversation_id: str
    #: The frame's own ``id``, if it had one: a refusal names it.
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Reply:
    """Send these frames as they are (a dialect's answer to a frame it refuses)."""

    frames: list[Frame]


Command = Chat | Cancel | Resume | ClearHistory | Ping | Reply


@dataclass
class Peer:
    """The other end of one WebSocket: what a dialect may need to know about it."""

    gateway: Gateway
    #: The URL's path parameters, e.g. ``session_id`` of ``/ws/chat/{session_id}``.
    path_params: Mapping[str, str] = field(default_factory=dict)
    #: Known once the connection is authenticated; ``None`` when auth is off.
    owner: str | None = None
    client: str | None = None
    #: This connection's own namespace for the generation ids an anonymous client chooses.
    scope: str | None = None
    #: The size limits, derived from the settings once per connection rather than per frame.
    limits: SizeLimits = field(init=False)

    def __post_init__(self) -> None:
        self.limits = SizeLimits.of(self.gateway.settings)


class Dialect(ABC):
    """One connection's codec. Instances live as long as their socket."""

    name: ClassVar[str]
    #: The client sends its next message whenever it likes, and the seed system it was
    #: written for answered them one after another: queue them on the connection.
    one_at_a_time: ClassVar[bool] = True

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    @classmethod
    def claims(cls, frame: dict[str, Any]) -> bool:
        """Whether ``frame`` has this dialect's shape (for paths shared by several)."""
        return False

    def max_frame_bytes(self) -> int:
        """The largest frame read at all; the message in it has its own, smaller cap, so a
        message slightly too long is refused in the dialect's terms (with its ``task_id``…)."""
        return self.peer.limits.body_bytes

    @abstractmethod
    async def decode(self, frame: dict[str, Any]) -> Command:
        """The command ``frame`` asks for; raising :class:`ChatError` answers it with
        ``encode(error, None)``."""

    @abstractmethod
    def encode(self, event: Outgoing, generation: Generation | None) -> list[Frame]:
        """This dialect's frames for ``event``. ``generation`` is the one the event belongs
        to, ``None`` for answers and errors outside any generation."""


DialectT = TypeVar("DialectT", bound=type[Dialect])
DialectFactory = Callable[[Peer], Dialect]
_REGISTRY: dict[str, type[Dialect]] = {}


def register_dialect(name: str) -> Callable[[DialectT], DialectT]:
    def decorate(cls: DialectT) -> DialectT:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def dialect_named(name: str) -> type[Dialect]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ChatError(
            "bad_request", f"unknown dialect {name!r}; expected one of {', '.join(dialect_names())}"
        ) from None


def dialect_names() -> list[str]:
    return sorted(_REGISTRY)


# Helpers the codecs share ------------------------------------------------------------


def bad(message: str) -> ChatError:
    return ChatError("bad_request", message)


def new_id() -> str:
    return uuid.uuid4().hex


def optional_str(frame: Mapping[str, Any], key: str) -> str | None:
    value = frame.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise bad(f"{key} must be a non-empty string of at most {MAX_ID_CHARS} characters")
    return value


def text_of(frame: Mapping[str, Any], *keys: str) -> str:
    """The first of ``keys`` that ``frame`` has, which must be a non-empty string."""
    key = next((k for k in keys if frame.get(k) is not None), keys[0])
    value = frame.get(key)
    if not isinstance(value, str) or not value.strip():
        raise bad(f"{key} must be a non-empty string")
    return value


def utc_timestamp() -> str:
    """ISO-8601 in UTC with milliseconds and ``Z``, as JavaScript's ``toISOString()``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"
