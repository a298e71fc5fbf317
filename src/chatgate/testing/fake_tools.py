"""What the fake upstream answers when a request offers tools or asks for JSON, the same
way in every wire format, so tests know the answer without a model.

- **Tools:** when a request offers tools and its last message is the user's (not a tool
  result), the answer is a call: of the tool ``tool_choice`` names, else of the first
  tool; when the last user message contains ``every tool``, of each tool in order. A
  ``tool_choice`` of ``none`` gets text. After tool results the answer is the usual text.
- **Arguments** (and JSON answers) are an instance of the tool's parameter schema built
  by :func:`instance_of`: each property of an object (all of them, not only the required
  ones), a string ``"fake"`` (an enum's first value), 1 for integers, 1.5 for numbers,
  ``true``, one-item arrays.
- **JSON mode:** a request asking for JSON gets :func:`instance_of` its schema, or
  :data:`JSON_ANSWER` when it gave none, as the answer's text, in three pieces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

JSON_ANSWER: dict[str, Any] = {"answer": "Hello from the fake model"}
EVERY_TOOL = "every tool"
_MAX_DEPTH = 8


@dataclass(frozen=True, slots=True)
class FakeCall:
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return orjson.dumps(self.arguments).decode()


def instance_of(schema: Any, depth: int = 0) -> Any:
    """A value valid against the simple JSON schemas tools and structured output use."""
    if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
        return "fake"
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return instance_of(schema[key][0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    kind = (kind or ("object" if "properties" in schema else "string")).lower()
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: instance_of(sub, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        return [instance_of(schema.get("items"), depth + 1)]
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "fake"


def choose_calls(
    tools: Sequence[tuple[str, Any]], choice: str | None, last_role: str | None, last_user_text: str
) -> list[FakeCall]:
    """The calls to answer with: ``tools`` as (name, parameter schema) pairs; ``choice``
    is ``none``, ``auto``/``required``/None, or a tool's name."""
    if not tools or choice == "none" or last_role not in ("user", None):
        return []
    if EVERY_TOOL in last_user_text:
        chosen = list(tools)
    else:
        named = [tool for tool in tools if tool[0] == choice]
        chosen = named or [tools[0]]
    return [FakeCall(name, instance_of(schema) if schema else {}) for name, schema in chosen]


def json_answer(schema: Any) -> str:
    """The text of a JSON-mode answer."""
    return orjson.dumps(instance_of(schema) if isinstance(schema, Mapping) else JSON_ANSWER).decode()


def pieces(text: str, count: int = 3) -> list[str]:
    """``text`` in ``count`` pieces (fewer when it is shorter), for streaming."""
    size = max(1, -(-len(text) // count))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]
