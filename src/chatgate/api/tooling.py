"""Tools, tool results and structured output as clients send them, read once for every API.

Every API spells tools OpenAI's way or close to it, so one reader serves them all:

- ``tools``: a list of ``{"type": "function", "function": {"name", "description",
  "parameters", "strict"}}`` (chat completions, Ollama, the native protocol) or of the
  same fields without the ``function`` wrapper (the Responses API; also accepted by the
  native protocol). Only function tools exist here: another ``type`` (OpenAI's hosted
  ``web_search``, ``file_search``…) is refused, naming it.
- ``tool_choice``: ``"auto"``, ``"none"``, ``"required"``, or one function by name
  (``{"type": "function", "function": {"name"}}`` or ``{"type": "function", "name"}``).
- structured output: OpenAI's ``response_format`` (``text``, ``json_object``,
  ``json_schema``), the Responses API's ``text.format`` and Ollama's ``format``
  (``"json"`` or a JSON schema).

Each reader raises :class:`RequestError` naming the field as the client spelled it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from chatgate.api.errors import RequestError
from chatgate.vocabulary import OutputFormat, Tool, ToolCall, ToolChoice, ToolResult, Tools

#: OpenAI's rule for function names, which every upstream here accepts.
TOOL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_TOOLS = 128
MAX_TOOL_CALL_ID_CHARS = 256
_CHOICE_MODES = ("auto", "none", "required")


def parse_tools(
    tools: Any, choice: Any = None, parallel: Any = None, *, where: str = ""
) -> Tools | None:
    """The turn's tools, or None when the request offers none (and sets no choice)."""
    prefix = f"{where}." if where else ""
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise RequestError(f"{prefix}tool_choice names a tool, but no tools are given", param=f"{prefix}tool_choice")
        return None
    if not isinstance(tools, list):
        raise RequestError(f"{prefix}tools must be a list", param=f"{prefix}tools")
    if len(tools) > MAX_TOOLS:
        raise RequestError(f"{prefix}tools holds more than {MAX_TOOLS} tools", param=f"{prefix}tools")
    parsed = tuple(_tool(tool, f"{prefix}tools.{i}") for i, tool in enumerate(tools))
    names = [tool.name for tool in parsed]
    if len(set(names)) != len(names):
        raise RequestError(f"{prefix}tools names a function twice", param=f"{prefix}tools")
    if parallel is not None and not isinstance(parallel, bool):
        raise RequestError(f"{prefix}parallel_tool_calls must be true or false", param=f"{prefix}parallel_tool_calls")
    tool_choice = _choice(choice, f"{prefix}tool_choice")
    if tool_choice is not None and tool_choice.mode == "function" and tool_choice.name not in names:
        raise RequestError(
            f"{prefix}tool_choice names {tool_choice.name!r}, which is not among the tools",
            param=f"{prefix}tool_choice",
        )
    return Tools(parsed, tool_choice, parallel)


def _tool(tool: Any, field: str) -> Tool:
    if not isinstance(tool, Mapping):
        raise RequestError(f"{field} must be an object", param=field)
    kind = tool.get("type", "function")
    if kind != "function":
        raise RequestError(
            f"{field}: only function tools are supported, not {str(kind)[:40]!r} (chatgate has no hosted tools)",
            param=f"{field}.type",
        )
    function = tool.get("function", tool)
    if not isinstance(function, Mapping) or ("function" not in tool and "name" not in tool):
        raise RequestError(f"{field}.function must be an object", param=f"{field}.function")
    where = f"{field}.function" if "function" in tool else field
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise RequestError(
            f"{where}.name must be 1 to 64 of the characters A-Z a-z 0-9 _ . : -", param=f"{where}.name"
        )
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise RequestError(f"{where}.description must be a string", param=f"{where}.description")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        raise RequestError(f"{where}.parameters must be a JSON schema object", param=f"{where}.parameters")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise RequestError(f"{where}.strict must be true or false", param=f"{where}.strict")
    return Tool(name, description, parameters, strict)


def _choice(choice: Any, field: str) -> ToolChoice | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in _CHOICE_MODES:
            raise RequestError(f"{field} must be one of auto, none, required or a function", param=field)
        return ToolChoice(choice)  # type: ignore[arg-type]
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        function = choice.get("function", choice)
        name = function.get("name") if isinstance(function, Mapping) else None
        if isinstance(name, str) and name:
            return ToolChoice("function", name)
    raise RequestError(f"{field} must be one of auto, none, required or a function", param=field)


def parse_response_format(value: Any, *, field: str = "response_format") -> OutputFormat | None:
    """OpenAI's ``response_format`` (chat completions) or ``text.format`` (Responses)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RequestError(f"{field} must be an object", param=field)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat("json")
    if kind == "json_schema":
        # Chat completions nest the schema under json_schema; the Responses API does not.
        spec = value.get("json_schema", value)
        where = f"{field}.json_schema" if "json_schema" in value else field
        if not isinstance(spec, Mapping):
            raise RequestError(f"{where} must be an object", param=where)
        schema, name, strict = spec.get("schema"), spec.get("name"), spec.get("strict")
        if not isinstance(schema, Mapping):
            raise RequestError(f"{where}.schema must be a JSON schema object", param=f"{where}.schema")
        if name is not None and not isinstance(name, str):
            raise RequestError(f"{where}.name must be a string", param=f"{where}.name")
        if strict is not None and not isinstance(strict, bool):
            raise RequestError(f"{where}.strict must be true or false", param=f"{where}.strict")
        return OutputFormat("json_schema", schema, name, strict)
    raise RequestError(f"{field}.type must be text, json_object or json_schema", param=f"{field}.type")


def parse_ollama_format(value: Any) -> OutputFormat | None:
    """Ollama's ``format``: ``"json"``, a JSON schema, or absent (``""`` too)."""
    if value is None or value == "":
        return None
    if value == "json":
        return OutputFormat("json")
    if isinstance(value, Mapping):
        return OutputFormat("json_schema", value)
    raise RequestError('format must be "json" or a JSON schema object', param="format")


def parse_tool_calls(calls: Any, field: str) -> list[ToolCall]:
    """An assistant message's ``tool_calls`` in OpenAI's shape (``arguments`` a JSON text)
    or Ollama's (``arguments`` an object, no id: one is made from its position)."""
    if not isinstance(calls, list):
        raise RequestError(f"{field} must be a list", param=field)
    parsed: list[ToolCall] = []
    for i, call in enumerate(calls):
        where = f"{field}.{i}"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise RequestError(f"{where}.function must be an object", param=f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"{where}.function.name must be a non-empty string", param=f"{where}.function.name")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, Mapping):
            arguments = orjson.dumps(arguments).decode()
        if not isinstance(arguments, str):
            raise RequestError(
                f"{where}.function.arguments must be a JSON text or an object", param=f"{where}.function.arguments"
            )
        call_id = call.get("id")
        if call_id is None:
            call_id = f"call_{i}"
        if not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_TOOL_CALL_ID_CHARS:
            raise RequestError(f"{where}.id must be a non-empty string", param=f"{where}.id")
        parsed.append({"id": call_id, "name": name, "arguments": arguments})
    return parsed


def parse_tool_results(results: Any, field: str = "tool_results") -> list[ToolResult]:
    """The native protocol's ``tool_results``: ``[{"tool_call_id", "content"}]``, where
    ``content`` is a string or any JSON value (sent on as its JSON text)."""
    if not isinstance(results, list) or not results:
        raise RequestError(f"{field} must be a non-empty list", param=field)
    parsed: list[ToolResult] = []
    for i, result in enumerate(results):
        where = f"{field}.{i}"
        if not isinstance(result, Mapping):
            raise RequestError(f"{where} must be an object", param=where)
        call_id = result.get("tool_call_id")
        if not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_TOOL_CALL_ID_CHARS:
            raise RequestError(f"{where}.tool_call_id must be a non-empty string", param=f"{where}.tool_call_id")
        item: ToolResult = {"tool_call_id": call_id, "content": result_text(result.get("content"))}
        name = result.get("name")
        if isinstance(name, str) and name:
            item["name"] = name
        parsed.append(item)
    return parsed


def result_text(content: Any) -> str:
    """A tool's output as the text sent upstream: a string as it is, text parts joined,
    anything else as JSON."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(
        isinstance(part, Mapping) and isinstance(part.get("text"), str) for part in content
    ):
        return "".join(part["text"] for part in content)
    return orjson.dumps(content).decode()
