"""The words chat/, providers/ and store/ share: who speaks, what was said, how to sample,
why a turn ended and what it cost.

A leaf: it imports only the standard library, so every layer may import it and none of
them has to reach into another layer for these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypedDict

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled", "error"]


class Message(TypedDict):
    role: Role
    content: str


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
