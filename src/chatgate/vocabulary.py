"""The words chat/, providers/ and store/ share: who speaks, what was said, how to sample,
why a turn ended and what it cost.

A leaf: it imports only the standard library, so every layer may import it and none of
them has to reach into another layer for these names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

Role = Literal["system", "user", "assistant", "tool"]
#: ``tool_calls``: the model stopped to have its tools called (the calls are the answer).
FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]


class ToolCall(TypedDict):
    """A call the model asked for: ``arguments`` is the JSON text it wrote (OpenAI's
    convention; adapters whose upstream sends an object encode it)."""

    id: str
    name: str
    arguments: str


class ToolResult(TypedDict):
    """What a tool answered to the call ``tool_call_id``; ``name`` is the tool's when the
    client said it (upstreams that need it, Gemini's, find it from the call otherwise)."""

    tool_call_id: str
    content: str
    name: NotRequired[str]


class Message(TypedDict):
    """One message of a prompt. An assistant message may carry ``tool_calls`` (its
    ``content`` may then be empty); a ``tool`` message answers ``tool_call_id``."""

    role: Role
    content: str
    tool_calls: NotRequired[list[ToolCall]]
    tool_call_id: NotRequired[str]
    name: NotRequired[str]


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of tool call ``index`` as it streams: the first piece of a call carries its
    ``id`` and ``name``, every piece a fragment of its ``arguments`` text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; ``parameters`` is the JSON Schema of its arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | None = None
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """``auto`` (the model decides), ``none``, ``required`` (some tool), or ``function``:
    the tool ``name``."""

    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Tools:
    """The tools offered for one turn and how the model may use them (None: the
    upstream's default)."""

    tools: tuple[Tool, ...] = ()
    choice: ToolChoice | None = None
    parallel: bool | None = None


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """Structured output: ``json`` (any JSON object) or ``json_schema`` (valid against
    ``schema``; ``name`` and ``strict`` as OpenAI's ``response_format`` has them)."""

    kind: Literal["json", "json_schema"]
    schema: Mapping[str, Any] | None = None
    name: str | None = None
    strict: bool | None = None


def tool_messages(results: list[ToolResult]) -> list[Message]:
    """Tool results as ``tool`` messages of a prompt."""
    messages: list[Message] = []
    for result in results:
        message: Message = {"role": "tool", "content": result["content"], "tool_call_id": result["tool_call_id"]}
        if "name" in result:
            message["name"] = result["name"]
        messages.append(message)
    return messages


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """Sampling options, named once here; each adapter maps them to its wire names. A
    client's options are read and range-checked by :func:`chatgate.options.parse_options`."""

    temperature: float | None = None
    max_tokens: int | None = None
    num_ctx: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    top_k: int | None = None
    #: Ollama's options with no common name (``repeat_penalty``, ``num_gpu``, ``mirostat``…),
    #: as the client sent them: passed to an Ollama upstream as they are; other upstreams
    #: have no such settings.
    ollama_extra: tuple[tuple[str, Any], ...] = ()

    def merged(self, override: GenerationOptions | None) -> GenerationOptions:
        """Options of ``override`` win where they are set."""
        if override is None:
            return self
        values = {
            name: getattr(override, name)
            if getattr(override, name) not in (None, ())
            else getattr(self, name)
            for name in self.__dataclass_fields__
        }
        return GenerationOptions(**values)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
