"""Any OpenAI-compatible ``/v1/chat/completions`` server (OpenAI, vLLM, llama.cpp, LM Studio).

Tools and structured output map one to one onto OpenAI's own fields: ``tools`` (each a
``function``), ``tool_choice``, ``parallel_tool_calls`` (the last two only with tools, as
OpenAI refuses them alone) and ``response_format`` (``json_schema`` without a schema is
sent as ``json_object``). Streamed ``delta.tool_calls`` pieces are yielded as they arrive;
a request without tools or an output format is sent exactly as before they existed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlparse

import aiohttp
import orjson
from pydantic import AliasChoices, Field, SecretStr

from chatgate.config import ConfigError
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

_FINISH_REASONS: dict[str, FinishReason] = {
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}


def openai_options(options: GenerationOptions) -> dict[str, Any]:
    mapped: dict[str, Any] = {
        "temperature": options.temperature,
        "max_tokens": options.max_tokens,
        "top_p": options.top_p,
        "seed": options.seed,
        "stop": list(options.stop) or None,
        "frequency_penalty": options.frequency_penalty,
        "presence_penalty": options.presence_penalty,
        # Not OpenAI's own, but vLLM's, llama.cpp's and LM Studio's; OpenAI refuses it.
        "top_k": options.top_k,
    }
    return {k: v for k, v in mapped.items() if v is not None}


def openai_messages(messages: list[Message]) -> list[Any]:
    """``messages`` on OpenAI's wire: as they are unless tool calls or results need spelling."""
    if not any("tool_calls" in message or message["role"] == "tool" for message in messages):
        return messages
    return [_openai_message(message) for message in messages]


def _openai_message(message: Message) -> Any:
    if message["role"] == "tool":
        return {
            "role": "tool",
            "tool_call_id": message.get("tool_call_id", ""),
            "content": message["content"],
        }
    if "tool_calls" not in message:
        return message
    calls = [
        {
            "id": call["id"],
            "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]},
        }
        for call in message["tool_calls"]
    ]
    return {"role": "assistant", "content": message["content"] or None, "tool_calls": calls}


def _function(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.parameters is not None:
        function["parameters"] = dict(tool.parameters)
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def openai_tools(tools: Tools | None) -> dict[str, Any]:
    """The request fields offering ``tools``: none when there are no tools to offer."""
    if tools is None or not tools.tools:
        return {}
    fields: dict[str, Any] = {"tools": [_function(tool) for tool in tools.tools]}
    choice = tools.choice
    if choice is not None:
        if choice.mode == "function":
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            fields["tool_choice"] = choice.mode
    if tools.parallel is not None:
        fields["parallel_tool_calls"] = tools.parallel
    return fields


def response_format(output: OutputFormat) -> dict[str, Any]:
    if output.kind == "json" or output.schema is None:
        return {"type": "json_object"}
    spec: dict[str, Any] = {"name": output.name or "response", "schema": dict(output.schema)}
    if output.strict is not None:
        spec["strict"] = output.strict
    return {"type": "json_schema", "json_schema": spec}


def _tool_call_deltas(pieces: list[Any]) -> tuple[ToolCallDelta, ...]:
    """``delta.tool_calls``; a piece without an index (some servers) is its position."""
    deltas = []
    for position, piece in enumerate(pieces):
        function = piece.get("function") or {}
        index = piece.get("index")
        deltas.append(
            ToolCallDelta(
                index if isinstance(index, int) else position,
                piece.get("id") or None,
                function.get("name") or None,
                function.get("arguments") or "",
            )
        )
    return tuple(deltas)


class _ChatCompletionEvents:
    """A streamed chat completion: ``data:`` lines of chunks, then ``data: [DONE]``. The
    finish reason and the usage come in chunks of their own; the last chunk made here
    carries both."""

    def __init__(self, provider: str, model: str) -> None:
        self._provider = provider
        self._model = model
        self._reason: FinishReason | None = None
        self._usage: Usage | None = None

    def decode(self, raw: bytes) -> Sequence[Chunk]:
        line = raw.strip()
        if not line.startswith(b"data:"):
            return ()
        data_part = line[5:].strip()
        if data_part == b"[DONE]":
            return (self.end(),)
        data = orjson.loads(data_part)
        if "error" in data:
            raise ProviderStreamError(
                f"{self._provider}: {error_text(data_part)}", provider=self._provider, model=self._model
            )
        if data.get("usage"):
            usage = data["usage"]
            self._usage = Usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)
        chunks: list[Chunk] = []
        for choice in data.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content") or ""
            if text:
                chunks.append(Chunk(text))
            calls = delta.get("tool_calls")
            if calls:
                chunks.append(Chunk(tool_calls=_tool_call_deltas(calls)))
            if choice.get("finish_reason"):
                self._reason = _FINISH_REASONS.get(choice["finish_reason"], "stop")
        return chunks

    def end(self) -> Chunk:
        if self._reason is None:
            raise ProviderStreamError(
                f"{self._provider} ended the stream without a finish reason",
                provider=self._provider,
                model=self._model,
            )
        return Chunk("", finish_reason=self._reason, usage=self._usage)


def api_base(url: str) -> str:
    """``http://host:port`` means ``http://host:port/v1``; any explicit path is kept."""
    url = url.rstrip("/")
    return url if urlparse(url).path else url + "/v1"


class OpenAIProvider:
    name: ClassVar[str] = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        session: aiohttp.ClientSession,
        *,
        default_model: str = "gpt-4o-mini",
        default_options: GenerationOptions | None = None,
    ) -> None:
        self.base_url = api_base(base_url)
        self.default_model = default_model
        self._session = session
        self._headers = dict(JSON_HEADERS)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._defaults = default_options or GenerationOptions()

    def stream(self, request: ProviderRequest) -> LineStream:
        model = request.model or self.default_model
        payload: dict[str, Any] = {
            "model": model,
            "messages": openai_messages(request.messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            **openai_options(self._defaults.merged(request.options)),
            **openai_tools(request.tools),
        }
        if request.output is not None:
            payload["response_format"] = response_format(request.output)
        return LineStream(
            self._session,
            f"{self.base_url}/chat/completions",
            _ChatCompletionEvents(self.name, model),
            provider=self.name,
            model=model,
            base_url=self.base_url,
            status_error=self._status_error,
            data=orjson.dumps(payload),
            headers=self._headers,
        )

    async def embed(self, model: str, inputs: list[str], dimensions: int | None = None) -> Embeddings:
        model = model or self.default_model
        payload: dict[str, Any] = {"model": model, "input": inputs, "encoding_format": "float"}
        if dimensions is not None:
            payload["dimensions"] = dimensions
        data = await post_json(
            self._session,
            f"{self.base_url}/embeddings",
            payload,
            provider=self.name,
            model=model,
            base_url=self.base_url,
            status_error=self._status_error,
            headers=self._headers,
        )
        try:
            items = sorted(data["data"], key=lambda item: item["index"])
            vectors = [item["embedding"] for item in items]
        except (KeyError, TypeError) as exc:
            raise ProviderError(
                f"{self.name} answered /embeddings in an unknown shape", provider=self.name, model=model
            ) from exc
        if len(vectors) != len(inputs):
            raise ProviderError(
                f"{self.name} answered {len(vectors)} embeddings for {len(inputs)} inputs",
                provider=self.name, model=model,
            )
        return Embeddings(vectors, (data.get("usage") or {}).get("prompt_tokens"))

    def _status_error(self, status: int, body: bytes, model: str) -> ProviderHTTPError:
        detail = error_text(body)
        if status == 404 and ("model" in detail.lower() or b"model_not_found" in body):
            return ModelNotFound(f"model {model!r} not found: {detail}", provider=self.name, model=model)
        return ProviderHTTPError(
            f"{self.name} answered {status}: {detail}", status=status, provider=self.name, model=model
        )

    async def models(self) -> list[str]:
        return [model.name for model in await self.model_catalog()]

    async def model_catalog(self) -> list[ModelInfo]:
        async with upstream_errors(self.name, "", self.base_url):
            async with self._session.get(f"{self.base_url}/models", headers=self._headers) as response:
                if response.status >= 400:
                    raise self._status_error(response.status, await response.read(), "")
                data = await response.json(loads=orjson.loads, content_type=None)
        return [
            ModelInfo(
                name=str(entry["id"]),
                raw=entry,
                kind="openai",
                owned_by=entry.get("owned_by") if isinstance(entry.get("owned_by"), str) else None,
                created=entry.get("created") if isinstance(entry.get("created"), int) else None,
            )
            for entry in data.get("data") or ()
            if isinstance(entry, dict) and "id" in entry
        ]

    async def model_card(self, name: str) -> Mapping[str, Any] | None:
        return None

    async def loaded_models(self) -> list[ModelInfo]:
        return []

    async def check(self) -> str:
        models = await self.models()
        return f"{self.name} at {self.base_url} ({len(models)} models)"

    async def aclose(self) -> None:
        return None


_BASE_URL_REQUIRED = "CHATGATE_OPENAI_BASE_URL: required when CHATGATE_PROVIDER=openai"


class OpenAISettings(ProviderSettings):
    openai_base_url: str | None = Field(
        None, validation_alias=AliasChoices("CHATGATE_OPENAI_BASE_URL"),
        description="Base URL of the OpenAI-compatible server (http://host:port means .../v1); required with CHATGATE_PROVIDER=openai.",
    )
    openai_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("CHATGATE_OPENAI_API_KEY"),
        description="API key sent to the OpenAI-compatible server.",
    )

    def problem(self) -> str | None:
        """There is no default server to talk to."""
        return None if self.openai_base_url else _BASE_URL_REQUIRED


@register_provider("openai", settings=OpenAISettings)
def _from_settings(
    settings: OpenAISettings, defaults: ProviderDefaults, session: aiohttp.ClientSession
) -> OpenAIProvider:
    if not settings.openai_base_url:
        raise ConfigError(_BASE_URL_REQUIRED)
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    return OpenAIProvider(
        settings.openai_base_url,
        key,
        session,
        default_model=defaults.model or "gpt-4o-mini",
        default_options=defaults.options,
    )
