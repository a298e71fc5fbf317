"""Ollama's native API: ``POST /api/chat`` streaming NDJSON.

Tools are sent as ``tools`` and structured output as ``format`` (``"json"`` or the schema).
Ollama has neither ``tool_choice`` nor ``parallel_tool_calls``, so a choice is honoured only
as far as the tools offered can express it:

- ``auto`` (or none given): every tool; ``none``: no tools at all, so the answer is text;
- ``function``: only the named tool, which restricts the model without forcing a call
  (refused with :class:`Unsupported` when no tool offered has that name);
- ``required``: refused with :class:`Unsupported`, as nothing can force a call.

``parallel_tool_calls: false`` is kept by the chat service, which passes on an answer's
first call only.

A call's arguments go out as an object (decoded from the call's JSON text; ``{}`` when it
is not an object) and come back as JSON text. Ollama sends each call whole, so each streams
as one :class:`ToolCallDelta`, its id Ollama's when it sends one, else ``call_<n>`` numbered
within the answer. A tool message names its tool (``tool_name``), found from the earlier
assistant call with its id when the message does not say it. Ollama ends an answer that
calls tools with ``done_reason: "stop"``; the chat service makes that ``tool_calls``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp
import orjson
from pydantic import AliasChoices, Field, field_validator

from chatgate.config import WILDCARD_HOSTS, variable_for
from chatgate.providers._http import (
    JSON_HEADERS,
    LineStream,
    error_text,
    post_json,
    upstream_errors,
)
from chatgate.providers.base import (
    Chunk,
    Embeddings,
    ModelInfo,
    ModelNotFound,
    ProviderDefaults,
    ProviderError,
    ProviderHTTPError,
    ProviderRequest,
    ProviderSettings,
    ProviderStreamError,
    Unsupported,
    register_provider,
)
from chatgate.vocabulary import (
    FinishReason,
    GenerationOptions,
    Message,
    OutputFormat,
    Tool,
    ToolCallDelta,
    Tools,
    Usage,
)


def _model_info(entry: dict[str, Any]) -> ModelInfo:
    """An ``/api/tags`` or ``/api/ps`` entry; ``created`` and ``owned_by`` as Ollama's own
    ``/v1/models`` gives them (the modification time, ``library``)."""
    size, modified_at = entry.get("size"), entry.get("modified_at")
    try:
        created = int(datetime.fromisoformat(modified_at).timestamp()) if isinstance(modified_at, str) else None
    except ValueError:
        created = None
    return ModelInfo(
        name=str(entry.get("name") or entry.get("model") or ""),
        raw=entry,
        kind="ollama",
        owned_by="library",
        created=created,
        size=size if isinstance(size, int) else None,
        modified_at=modified_at if isinstance(modified_at, str) else None,
    )


def ollama_options(options: GenerationOptions) -> dict[str, Any]:
    mapped: dict[str, Any] = {
        "temperature": options.temperature,
        "num_ctx": options.num_ctx,
        "num_predict": options.max_tokens,
        "top_p": options.top_p,
        "seed": options.seed,
        "stop": list(options.stop) or None,
        "frequency_penalty": options.frequency_penalty,
        "presence_penalty": options.presence_penalty,
        "top_k": options.top_k,
    }
    return {**dict(options.ollama_extra), **{k: v for k, v in mapped.items() if v is not None}}


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def ollama_messages(messages: list[Message]) -> list[Any]:
    """``messages`` on Ollama's wire: as they are unless tool calls or results need spelling."""
    if not any("tool_calls" in message or message["role"] == "tool" for message in messages):
        return messages
    names: dict[str, str] = {}
    wire: list[Any] = []
    for message in messages:
        if "tool_calls" in message:
            names.update((call["id"], call["name"]) for call in message["tool_calls"])
            calls = [
                {"function": {"name": call["name"], "arguments": _arguments(call["arguments"])}}
                for call in message["tool_calls"]
            ]
            wire.append(
                {"role": message["role"], "content": message["content"], "tool_calls": calls}
            )
        elif message["role"] == "tool":
            answered: dict[str, Any] = {"role": "tool", "content": message["content"]}
            name = message.get("name") or names.get(message.get("tool_call_id", ""))
            if name:
                answered["tool_name"] = name
            wire.append(answered)
        else:
            wire.append(message)
    return wire


def _function(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.parameters is not None:
        function["parameters"] = dict(tool.parameters)
    return {"type": "function", "function": function}


def ollama_tools(tools: Tools | None, model: str) -> list[dict[str, Any]]:
    """The ``tools`` to send, as far as Ollama can honour ``tools.choice`` (module docstring)."""
    if tools is None or not tools.tools:
        return []
    choice = tools.choice
    offered = tools.tools
    if choice is not None and choice.mode == "none":
        return []
    if choice is not None and choice.mode == "required":
        raise Unsupported(
            "ollama cannot force a tool call (tool_choice=required)", provider="ollama", model=model
        )
    if choice is not None and choice.mode == "function":
        offered = tuple(tool for tool in offered if tool.name == choice.name)
        if not offered:
            raise Unsupported(
                f"tool_choice names {choice.name!r}, which is not among the tools offered",
                provider="ollama",
                model=model,
            )
    return [_function(tool) for tool in offered]


def ollama_format(output: OutputFormat) -> Any:
    if output.kind == "json" or output.schema is None:
        return "json"
    return dict(output.schema)


def _tool_call_deltas(calls: list[Any], first: int) -> tuple[ToolCallDelta, ...]:
    """Ollama's ``message.tool_calls``, each whole, numbered on from ``first``."""
    deltas = []
    for index, call in enumerate(calls, first):
        function = call.get("function") or {}
        arguments = function.get("arguments")
        deltas.append(
            ToolCallDelta(
                index,
                str(call.get("id") or f"call_{index}"),
                str(function.get("name") or ""),
                arguments if isinstance(arguments, str) else orjson.dumps(arguments or {}).decode(),
            )
        )
    return tuple(deltas)


class _OllamaLines:
    """An ``/api/chat`` answer: one JSON object a line, the last with ``done``."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._calls = 0  # tool calls so far: a line's calls are numbered on from here

    def decode(self, line: bytes) -> Sequence[Chunk]:
        if not line.strip():
            return ()
        data = orjson.loads(line)
        if "error" in data:
            raise ProviderStreamError(f"ollama: {data['error']}", provider="ollama", model=self._model)
        message = data.get("message") or {}
        text = message.get("content", "")
        if not data.get("done") and "tool_calls" not in message:
            return (Chunk(text),) if text else ()
        chunks: list[Chunk] = []
        calls = message.get("tool_calls")
        if calls:
            if text:
                chunks.append(Chunk(text))
                text = ""
            chunks.append(Chunk(tool_calls=_tool_call_deltas(calls, self._calls)))
            self._calls += len(calls)
        if data.get("done"):
            reason: FinishReason = "length" if data.get("done_reason") == "length" else "stop"
            usage = Usage(data.get("prompt_eval_count") or 0, data.get("eval_count") or 0)
            chunks.append(Chunk(text, finish_reason=reason, usage=usage))
        elif text:
            chunks.append(Chunk(text))
        return chunks

    def end(self) -> Chunk:
        raise ProviderStreamError("ollama ended the stream without a final message", provider="ollama", model=self._model)


class OllamaProvider:
    name: ClassVar[str] = "ollama"

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        *,
        default_model: str = "llama3.2",
        default_options: GenerationOptions | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.default_model = default_model
        self._session = session
        self._defaults = default_options or GenerationOptions()

    def stream(self, request: ProviderRequest) -> LineStream:
        model = request.model or self.default_model
        payload: dict[str, Any] = {
            "model": model,
            "messages": ollama_messages(request.messages),
            "stream": True,
        }
        tools = ollama_tools(request.tools, model)
        if tools:
            payload["tools"] = tools
        if request.output is not None:
            payload["format"] = ollama_format(request.output)
        options = ollama_options(self._defaults.merged(request.options))
        if options:
            payload["options"] = options
        return LineStream(
            self._session,
            f"{self.base_url}/api/chat",
            _OllamaLines(model),
            provider=self.name,
            model=model,
            base_url=self.base_url,
            status_error=self._status_error,
            data=orjson.dumps(payload),
            headers=JSON_HEADERS,
        )

    async def embed(self, model: str, inputs: list[str], dimensions: int | None = None) -> Embeddings:
        model = model or self.default_model
        payload: dict[str, Any] = {"model": model, "input": inputs}
        if dimensions is not None:
            payload["dimensions"] = dimensions
        data = await post_json(
            self._session,
            f"{self.base_url}/api/embed",
            payload,
            provider=self.name,
            model=model,
            base_url=self.base_url,
            status_error=self._status_error,
            headers=JSON_HEADERS,
        )
        vectors = data.get("embeddings") if isinstance(data, dict) else None
        if not isinstance(vectors, list) or len(vectors) != len(inputs):
            raise ProviderError(
                f"ollama answered /api/embed without {len(inputs)} embeddings", provider=self.name, model=model
            )
        return Embeddings(vectors, data.get("prompt_eval_count"))

    def _status_error(self, status: int, body: bytes, model: str) -> ProviderHTTPError:
        detail = error_text(body)
        if status == 404 and "not found" in detail.lower():
            return ModelNotFound(
                f"model {model!r} not found in ollama ({detail}); pull it with `ollama pull {model}`",
                provider=self.name,
                model=model,
            )
        return ProviderHTTPError(f"ollama answered {status}: {detail}", status=status, provider=self.name, model=model)

    async def models(self) -> list[str]:
        async with upstream_errors(self.name, "", self.base_url):
            async with self._session.get(f"{self.base_url}/api/tags") as response:
                if response.status >= 400:
                    raise self._status_error(response.status, await response.read(), "")
                data = await response.json(loads=orjson.loads)
        return [m.get("name") or m.get("model") for m in data.get("models", [])]

    async def model_catalog(self) -> list[ModelInfo]:
        return [_model_info(entry) for entry in (await self._get("/api/tags")).get("models") or ()]

    async def model_card(self, name: str) -> Mapping[str, Any] | None:
        async with upstream_errors(self.name, name, self.base_url):
            async with self._session.post(
                f"{self.base_url}/api/show", data=orjson.dumps({"model": name}), headers=JSON_HEADERS
            ) as response:
                if response.status >= 400:
                    raise self._status_error(response.status, await response.read(), name)
                card: dict[str, Any] = await response.json(loads=orjson.loads, content_type=None)
        return card

    async def loaded_models(self) -> list[ModelInfo]:
        return [_model_info(entry) for entry in (await self._get("/api/ps")).get("models") or ()]

    async def _get(self, path: str) -> dict[str, Any]:
        async with upstream_errors(self.name, "", self.base_url):
            async with self._session.get(f"{self.base_url}{path}") as response:
                if response.status >= 400:
                    raise self._status_error(response.status, await response.read(), "")
                data = await response.json(loads=orjson.loads, content_type=None)
        return data if isinstance(data, dict) else {}

    async def check(self) -> str:
        async with upstream_errors(self.name, "", self.base_url):
            async with self._session.get(f"{self.base_url}/api/version") as response:
                if response.status >= 400:
                    raise self._status_error(response.status, await response.read(), "")
                data = await response.json(loads=orjson.loads, content_type=None)
        return f"ollama {data.get('version', '?')} at {self.base_url}"

    async def aclose(self) -> None:
        return None


DEFAULT_ADDRESS = "http://127.0.0.1:11434"
_HOST_PORT = re.compile(r"(?P<host>\[[^\]]*\]|[^:\[\]]*)(?::(?P<port>\d+))?")
#: What a URL's authority must be after normalising: a hostname or [IPv6], then :port.
_URL_HOST_PORT = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)(?::(?P<port>\d{1,5}))?"
)
_NOT_AN_OLLAMA_URL = "expected an http(s) URL, host or host:port, e.g. http://127.0.0.1:11434"


def _check_http_url(url: str) -> None:
    """Raise ValueError unless ``url`` is http(s) with a usable host and port (1-65535)."""
    parts = urlsplit(url)
    match = _URL_HOST_PORT.fullmatch(parts.netloc.rpartition("@")[2])
    if parts.scheme.lower() not in ("http", "https") or match is None or parts.query or parts.fragment:
        raise ValueError(_NOT_AN_OLLAMA_URL)
    if match["port"] is not None and not 0 < int(match["port"]) < 65536:
        raise ValueError(f"port {match['port']} is out of range 1-65535")


class OllamaSettings(ProviderSettings):
    """Where Ollama listens. Read whichever provider is chosen: ``auto`` decides by it."""

    ollama_host: str = Field(
        DEFAULT_ADDRESS, validation_alias=AliasChoices("OLLAMA_HOST", "OLLAMA_URL"),
        description="Ollama's address: host, host:port or an http(s) URL.",
    )

    @field_validator("ollama_host")
    @classmethod
    def _normalise_ollama_host(cls, value: str) -> str:
        """Read it as Ollama does: ``host``, ``host:port``, ``0.0.0.0`` or a URL. The port
        defaults to 11434 without a scheme and to the scheme's own (80, 443) with one. What
        is not then an http(s) URL with a host and a port in 1-65535 is refused."""
        value = value.strip().rstrip("/")
        scheme, has_scheme, rest = value.partition("://")
        if not has_scheme:
            scheme, rest = "http", value
        hostport, _, path = rest.partition("/")
        match = _HOST_PORT.fullmatch(hostport)
        if match is None:
            url = f"{scheme}://{rest}"
        else:
            host = WILDCARD_HOSTS.get(match["host"], match["host"])
            port = match["port"] or ("" if has_scheme else "11434")
            url = f"{scheme}://{host}" + (f":{port}" if port else "") + (f"/{path}" if path else "")
        _check_http_url(url)
        return url

    @property
    def configured(self) -> bool:
        """Whether an address is configured at all, even the default one: pydantic puts
        the fields given by the environment, ``.env`` or an override in ``model_fields_set``."""
        return "ollama_host" in self.model_fields_set

    @property
    def address_variable(self) -> str:
        """The variable naming the address: the one in the environment, else ``OLLAMA_HOST``."""
        return variable_for("ollama_host", OllamaSettings)


@register_provider("ollama", settings=OllamaSettings)
def _from_settings(
    settings: OllamaSettings, defaults: ProviderDefaults, session: aiohttp.ClientSession
) -> OllamaProvider:
    return OllamaProvider(
        settings.ollama_host,
        session,
        default_model=defaults.model or "llama3.2",
        default_options=defaults.options,
    )
