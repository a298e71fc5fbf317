"""The native protocol (``docs/protocol.md``), the default on ``/ws``.

Its frames are the native commands and events themselves, so encoding is the identity
and decoding only validates. A refused frame's error carries the frame's ``id`` when it
had one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, NotRequired, TypedDict

from pydantic import Field

from chatgate.api import tooling
from chatgate.api.dialects.base import (
    Cancel,
    Chat,
    ClearHistory,
    Command,
    Dialect,
    Frame,
    Outgoing,
    Peer,
    Ping,
    Reply,
    Resume,
    bad,
    optional_str,
    register_dialect,
    text_of,
)
from chatgate.chat.events import ChatError
from chatgate.chat.generation import Generation
from chatgate.chat.service import Turn
from chatgate.options import OptionError, parse_options
from chatgate.vocabulary import ToolResult

#: How much of an unknown ``type`` an error repeats.
MAX_SHOWN_CHARS = 64

#: An ``id``, ``conversation_id``, ``agent`` or ``model`` a client sends.
FrameId = Annotated[str, Field(min_length=1, max_length=128)]


class OptionsFrame(TypedDict, total=False):
    """``options`` of a ``chat`` frame, as :func:`chatgate.options.parse_options` reads them."""

    temperature: float
    max_tokens: int
    max_completion_tokens: int
    num_predict: int
    num_ctx: int
    top_p: float
    stop: str | list[str]
    seed: int
    frequency_penalty: float
    presence_penalty: float
    top_k: int


class ChatFrame(TypedDict):
    """Start a reply: ``message``, or ``tool_results`` answering the last answer's calls.
    ``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``response_format`` are
    OpenAI's chat-completions shapes (:mod:`chatgate.api.tooling` checks them)."""

    type: Literal["chat"]
    id: NotRequired[FrameId]
    message: NotRequired[str]
    tool_results: NotRequired[list[ToolResult]]
    conversation_id: NotRequired[FrameId]
    agent: NotRequired[FrameId]
    model: NotRequired[FrameId]
    options: NotRequired[OptionsFrame]
    tools: NotRequired[list[dict[str, Any]]]
    tool_choice: NotRequired[Literal["auto", "none", "required"] | dict[str, Any]]
    parallel_tool_calls: NotRequired[bool]
    response_format: NotRequired[dict[str, Any]]


class CancelFrame(TypedDict):
    type: Literal["cancel"]
    id: FrameId


class ResumeFrame(TypedDict):
    """Replay reply ``id``'s pieces with ``seq`` above ``after`` (default 0), then follow it."""

    type: Literal["resume"]
    id: FrameId
    after: NotRequired[Annotated[int, Field(ge=0)]]


class ClearHistoryFrame(TypedDict):
    type: Literal["clear_history"]
    conversation_id: FrameId
    id: NotRequired[FrameId]


class PingFrame(TypedDict):
    type: Literal["ping"]


#: Every frame a native client sends; :meth:`NativeDialect.decode` checks them by hand.
ClientFrame = Annotated[
    ChatFrame | CancelFrame | ResumeFrame | ClearHistoryFrame | PingFrame, Field(discriminator="type")
]


@register_dialect("native")
class NativeDialect(Dialect):
    one_at_a_time = False  # several conversations may stream at once; a second turn in one is busy
    def __init__(self, peer: Peer) -> None:
        super().__init__(peer)
        self._decoders: dict[str, Callable[[dict[str, Any]], Awaitable[Command]]] = {
            "chat": self._chat,
            "cancel": self._cancel,
            "resume": self._resume,
            "clear_history": self._clear_history,
            "ping": self._ping,
        }

    async def decode(self, frame: dict[str, Any]) -> Command:
        frame_id = frame.get("id") if isinstance(frame.get("id"), str) else None
        try:
            kind = frame.get("type")
            # Only a string may be looked up: a dict or a list is unhashable.
            decoder = self._decoders.get(kind) if isinstance(kind, str) else None
            if decoder is None:
                raise bad(f"unknown frame type {_shown(kind)}; expected one of {', '.join(self._decoders)}")
            return await decoder(frame)
        except ChatError as exc:
            return Reply([exc.event(frame_id)])

    def encode(self, event: Outgoing, generation: Generation | None) -> list[Frame]:
        return [event]

    async def _chat(self, frame: dict[str, Any]) -> Command:
        """A user's ``message``, or ``tool_results`` answering the last answer's calls;
        ``tools`` (with ``tool_choice``, ``parallel_tool_calls``) and ``response_format``
        as in OpenAI's chat completions."""
        results = None
        if frame.get("tool_results") is not None:
            if frame.get("message") is not None:
                raise bad("send either message or tool_results, not both")
            results = tooling.parse_tool_results(frame["tool_results"])
            message = ""
        else:
            message = text_of(frame, "message")
        try:
            options = parse_options(frame.get("options"))
        except OptionError as exc:
            raise bad(str(exc)) from None
        tools = tooling.parse_tools(frame.get("tools"), frame.get("tool_choice"), frame.get("parallel_tool_calls"))
        output = tooling.parse_response_format(frame.get("response_format"))
        return Chat(
            Turn(
                message=message,
                tool_results=results,
                tools=tools,
                output=output,
                conversation_id=optional_str(frame, "conversation_id"),
                agent=optional_str(frame, "agent"),
                model=optional_str(frame, "model"),
                options=options,
                request_id=optional_str(frame, "id"),
            )
        )

    async def _cancel(self, frame: dict[str, Any]) -> Command:
        return Cancel(_required_id(frame))

    async def _resume(self, frame: dict[str, Any]) -> Command:
        generation_id = _required_id(frame)
        after = frame.get("after", 0)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise bad("after must be a delta seq (an integer >= 0)")
        return Resume(generation_id, after)

    async def _clear_history(self, frame: dict[str, Any]) -> Command:
        conversation_id = optional_str(frame, "conversation_id")
        if conversation_id is None:
            raise bad("conversation_id is required")
        return ClearHistory(conversation_id, optional_str(frame, "id"))

    async def _ping(self, frame: dict[str, Any]) -> Command:
        return Ping()


def _shown(kind: Any) -> str:
    """The client's ``type``, shortened: a frame may be as large as a message."""
    if isinstance(kind, dict):
        return "(an object)"
    if isinstance(kind, list):
        return "(a list)"
    text = repr(kind)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 1] + "…"


def _required_id(frame: dict[str, Any]) -> str:
    generation_id = optional_str(frame, "id")
    if generation_id is None:
        raise bad("id is required")
    return generation_id
