"""Google Gemini's API: ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse``.

The conversation goes out as ``contents`` with roles ``user`` and ``model`` (chatgate's
``assistant``), the system messages joined into one ``systemInstruction``, and the options as
``generationConfig`` (``num_ctx`` has no Gemini equivalent and is not sent). The API key
travels in the ``x-goog-api-key`` header, never in the URL, so it cannot reach a log line.

Transport: the issue asked for httpx, but this adapter streams over the aiohttp session the
factory is handed, like every other adapter: one pooled session per upstream, and aiohttp
relayed streams about 4x faster than httpx when we measured both.

Tools go out as ``functionDeclarations`` and the tool choice as
``toolConfig.functionCallingConfig`` (``required`` is ``ANY``; one named function is ``ANY``
with ``allowedFunctionNames``; Gemini has no switch for parallel calls: the chat service
keeps ``parallel_tool_calls: false`` by passing on the first call only). History keeps the
calls as ``functionCall`` parts of a ``model`` content and the results as ``functionResponse``
parts of one ``user`` content; a result names its function, taken from the call it answers
when the client did not say. Gemini streams each call whole, as a ``functionCall`` part with
``args`` as an object: one :class:`ToolCallDelta` per call, its arguments as JSON text, its
id Gemini's when it sent one, else ``call_<index>``. Structured output is
``responseMimeType: application/json``, with ``responseSchema`` for a schema. Schemas (tool
parameters and ``responseSchema``) pass through :func:`gemini_schema`: Gemini's ``Schema``
is an OpenAPI subset and refuses a request with any key it does not know.

Finish reasons: ``STOP`` ends the answer normally and ``MAX_TOKENS`` is ``length``. Any other
(``SAFETY``, ``RECITATION``, ``BLOCKLIST``, ``PROHIBITED_CONTENT``, ``SPII``, ``OTHER``…), and a
prompt refused with ``promptFeedback.blockReason``, means Gemini withheld the answer: that is
a :class:`ProviderStreamError` naming the reason, with ``retryable=False`` because the same
request would be withheld again; the text already streamed stays a partial answer.

Errors: Google's ``{"error": {"code", "message", "status"}}`` bodies become
:class:`ProviderHTTPError` (400, 401 and 403 are final; 429 and 5xx retryable), a 404 for the
model :class:`ModelNotFound`, and an in-stream ``data: {"error": …}`` event a
:class:`ProviderStreamError`, retryable unless its code is a client error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlparse

import aiohttp
import orjson
from pydantic import AliasChoices, Field, SecretStr

from chatgate.config import ConfigError
from chatgate.providers._http import JSON_HEADERS, LineStream, post_json, upstream_errors
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
    ToolCallDelta,
    ToolChoice,
    Tools,
    Usage,
)

DEFAULT_MODEL = "gemini-2.0-flash"
_FINISHED: dict[str, FinishReason] = {"STOP": "stop", "MAX_TOKENS": "length"}
_MAX_MODEL_PAGES = 20
#: The fields of Gemini's ``Schema`` (``title`` left out: older API versions refuse it, and it
#: constrains nothing). ``oneOf`` is sent as ``anyOf``, the nearest Gemini has.
_SCHEMA_KEYS = frozenset({
    "type", "format", "description", "nullable", "enum", "items", "properties", "required",
    "anyOf", "minItems", "maxItems", "minProperties", "maxProperties", "minLength", "maxLength",
    "pattern", "minimum", "maximum", "example", "default", "propertyOrdering",
})  # fmt: skip
_MAX_SCHEMA_DEPTH = 32
_LOCAL_REFS = ("#/$defs/", "#/definitions/")
_CALLING_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY", "function": "ANY"}


def gemini_options(options: GenerationOptions) -> dict[str, Any]:
    mapped: dict[str, Any] = {
        "temperature": options.temperature,
        "maxOutputTokens": options.max_tokens,
        "topP": options.top_p,
        "stopSequences": list(options.stop) or None,
        "seed": options.seed,
        "frequencyPenalty": options.frequency_penalty,
        "presencePenalty": options.presence_penalty,
        "topK": options.top_k,
    }
    return {k: v for k, v in mapped.items() if v is not None}


def gemini_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` (JSON Schema) as Gemini's ``Schema`` takes it: keys it does not know
    (``additionalProperties``, ``$schema``, ``strict``, ``title``…) dropped, references to
    ``$defs``/``definitions`` inlined (a recursive one cut where it recurs), a ``type`` list
    holding ``"null"`` made ``nullable``, and ``enum`` kept only when its values are
    strings, the only ones Gemini takes."""
    definitions = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    return _schema_subset(schema, definitions, frozenset(), 0)


def _schema_subset(
    schema: Any, definitions: Mapping[str, Any], expanding: frozenset[str], depth: int
) -> dict[str, Any]:
    if not isinstance(schema, Mapping) or depth > _MAX_SCHEMA_DEPTH:
        return {}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        if ref in expanding:
            return {}
        target = definitions.get(ref.rsplit("/", 1)[-1]) if ref.startswith(_LOCAL_REFS) else None
        rest = {key: value for key, value in schema.items() if key != "$ref"}
        schema = {**target, **rest} if isinstance(target, Mapping) else rest
        expanding |= {ref}

    def sub(value: Any) -> dict[str, Any]:
        return _schema_subset(value, definitions, expanding, depth + 1)

    subset: dict[str, Any] = {}
    for key, value in schema.items():
        key = "anyOf" if key == "oneOf" else key
        if key not in _SCHEMA_KEYS:
            continue
        if key == "properties" and isinstance(value, Mapping):
            subset[key] = {name: sub(prop) for name, prop in value.items()}
        elif key == "items":
            subset[key] = sub(value)
        elif key == "anyOf" and isinstance(value, list):
            subset[key] = [sub(choice) for choice in value]
        elif key == "type" and isinstance(value, list):
            kinds = [kind for kind in value if kind != "null"]
            if len(kinds) < len(value):
                subset["nullable"] = True
            if kinds:
                subset["type"] = kinds[0]
        elif key != "enum" or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            subset[key] = value
    return subset


def gemini_tools(tools: Tools) -> dict[str, Any]:
    """The ``tools`` and ``toolConfig`` fields for the tools a request offers (none: no field).
    An object schema without properties is left out: Gemini refuses an empty ``properties``."""
    if not tools.tools:
        return {}
    declarations: list[dict[str, Any]] = []
    for tool in tools.tools:
        declaration: dict[str, Any] = {"name": tool.name}
        if tool.description:
            declaration["description"] = tool.description
        parameters = gemini_schema(tool.parameters) if tool.parameters else {}
        if parameters.get("properties") or parameters.get("type", "object") != "object":
            declaration["parameters"] = parameters
        declarations.append(declaration)
    fields: dict[str, Any] = {"tools": [{"functionDeclarations": declarations}]}
    if tools.choice is not None:
        fields["toolConfig"] = {"functionCallingConfig": _calling_config(tools.choice)}
    return fields


def _calling_config(choice: ToolChoice) -> dict[str, Any]:
    config: dict[str, Any] = {"mode": _CALLING_MODES[choice.mode]}
    if choice.mode == "function" and choice.name:
        config["allowedFunctionNames"] = [choice.name]
    return config


def gemini_contents(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The conversation without its system messages as Gemini ``contents``: consecutive
    tool results become one ``user`` content of ``functionResponse`` parts."""
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    results: list[dict[str, Any]] | None = None  # the parts of the tool results being gathered
    for message in messages:
        role = message["role"]
        if role == "system":
            continue
        if role != "tool":
            results = None
            parts: list[dict[str, Any]] = []
            calls = message.get("tool_calls") or []
            if message["content"] or not calls:
                parts.append({"text": message["content"]})
            for call in calls:
                call_names[call["id"]] = call["name"]
                args = _json_object(call["arguments"], "arguments")
                parts.append({"functionCall": {"name": call["name"], "args": args}})
            contents.append({"role": "model" if role == "assistant" else "user", "parts": parts})
            continue
        call_id = message.get("tool_call_id", "")
        name = message.get("name") or call_names.get(call_id)
        if not name:
            raise Unsupported(
                f"gemini needs the name of the tool that answered call {call_id!r}: "
                "no earlier tool call has that id, and the result does not name its tool",
                provider="gemini",
            )
        response = _json_object(message["content"], "content")
        if results is None:
            results = []
            contents.append({"role": "user", "parts": results})
        results.append({"functionResponse": {"name": name, "response": response}})
    return contents


def _json_object(text: str, key: str) -> dict[str, Any]:
    """``text`` parsed when it is a JSON object (empty text: an empty one), else ``{key: text}``:
    Gemini's ``args`` and ``response`` are objects."""
    if not text.strip():
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {key: text}
    return value if isinstance(value, dict) else {key: text}


def gemini_payload(
    messages: list[Message],
    options: GenerationOptions,
    *,
    tools: Tools | None = None,
    output: OutputFormat | None = None,
) -> dict[str, Any]:
    """The ``generateContent`` body for a chat: history, system instruction, tools, config."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    payload: dict[str, Any] = {"contents": gemini_contents(messages)}
    if system:
        payload["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    if tools is not None:
        payload.update(gemini_tools(tools))
    config = gemini_options(options)
    if output is not None:
        config["responseMimeType"] = "application/json"
        if output.kind == "json_schema" and output.schema:
            config["responseSchema"] = gemini_schema(output.schema)
    if config:
        payload["generationConfig"] = config
    return payload


def tool_call_delta(call: Mapping[str, Any], index: int) -> ToolCallDelta:
    """Streamed ``functionCall`` ``index``, whole: Gemini does not send calls in pieces."""
    arguments = orjson.dumps(call.get("args") or {}).decode()
    call_id = str(call.get("id") or f"call_{index}")
    return ToolCallDelta(index, call_id, str(call.get("name") or ""), arguments)


def api_root(url: str) -> str:
    """``https://host`` means ``https://host/v1beta``; an explicit version path is kept."""
    url = url.rstrip("/")
    return url if urlparse(url).path.rsplit("/", 1)[-1].startswith("v1") else url + "/v1beta"


def model_resource(model: str) -> str:
    """``gemini-2.0-flash`` → ``models/gemini-2.0-flash``; ``tunedModels/x`` stays as it is."""
    return model if "/" in model else f"models/{model}"


def google_error(data: Any) -> tuple[int | None, str, str]:
    """``(code, status, message)`` of a decoded Google error (an object, or a list of one)."""
    if isinstance(data, list) and data:
        data = data[0]
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None, "", str(data)[:500]
    code = error.get("code")
    return (
        code if isinstance(code, int) else None,
        str(error.get("status") or ""),
        str(error.get("message") or error)[:500],
    )


def google_error_body(body: bytes) -> tuple[int | None, str, str]:
    try:
        return google_error(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None, "", body.decode("utf-8", "replace").strip()[:500] or "no detail"


class _GeminiEvents:
    """A ``streamGenerateContent?alt=sse`` answer: ``data:`` lines of candidates, the
    finish reason and usage in the last; the body's end ends the answer."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._reason: FinishReason | None = None
        self._usage: Usage | None = None
        self._calls = 0
        self._withheld: ProviderStreamError | None = None

    def decode(self, raw: bytes) -> Sequence[Chunk]:
        if self._withheld is not None:
            raise self._withheld
        line = raw.strip()
        if not line.startswith(b"data:"):
            return ()
        data = self._event(line[5:])
        if isinstance(meta := data.get("usageMetadata"), dict):
            self._usage = Usage(meta.get("promptTokenCount") or 0, meta.get("candidatesTokenCount") or 0)
        candidate = (data.get("candidates") or [{}])[0]
        chunks: list[Chunk] = []
        for part in (candidate.get("content") or {}).get("parts") or ():
            text = part.get("text")
            if text and not part.get("thought"):
                chunks.append(Chunk(text))
            if isinstance(call := part.get("functionCall"), dict):
                chunks.append(Chunk(tool_calls=(tool_call_delta(call, self._calls),)))
                self._calls += 1
        if candidate.get("finishReason"):
            try:
                self._reason = self._finish_reason(candidate["finishReason"])
            except ProviderStreamError as exc:
                self._withheld = exc  # raised once this event's text has been handed on
        return chunks

    def end(self) -> Chunk:
        if self._withheld is not None:
            raise self._withheld
        if self._reason is None:
            raise ProviderStreamError(
                "gemini ended the stream without a finish reason", provider="gemini", model=self._model
            )
        return Chunk("", finish_reason=self._reason, usage=self._usage)

    def _event(self, raw: bytes) -> dict[str, Any]:
        """One decoded SSE event; in-stream errors and refused prompts raise."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ProviderStreamError(
                f"gemini sent an event that is not JSON: {raw[:200]!r}",
                provider="gemini",
                model=self._model,
            ) from exc
        if not isinstance(data, dict):
            raise ProviderStreamError(
                f"gemini sent an unexpected event: {raw[:200]!r}", provider="gemini", model=self._model
            )
        if "error" in data:
            code, status, message = google_error(data)
            retryable = code is None or code >= 500 or code == 429
            label = status or (str(code) if code else "error")
            raise ProviderStreamError(
                f"gemini: {label}: {message}", provider="gemini", model=self._model, retryable=retryable
            )
        block = (data.get("promptFeedback") or {}).get("blockReason")
        if block:
            raise ProviderStreamError(
                f"gemini refused to answer the prompt ({block})",
                provider="gemini",
                model=self._model,
                retryable=False,
            )
        return data

    def _finish_reason(self, value: str) -> FinishReason:
        if value in _FINISHED:
            return _FINISHED[value]
        raise ProviderStreamError(
            f"gemini withheld the answer (finishReason {value})",
            provider="gemini",
            model=self._model,
            retryable=False,
        )


class GeminiProvider:
    name: ClassVar[str] = "gemini"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        session: aiohttp.ClientSession,
        *,
        default_model: str = DEFAULT_MODEL,
        default_options: GenerationOptions | None = None,
    ) -> None:
        self.base_url = api_root(base_url)
        self.default_model = default_model
        self._session = session
        self._headers = {**JSON_HEADERS, "x-goog-api-key": api_key}
        self._defaults = default_options or GenerationOptions()

    def stream(self, request: ProviderRequest) -> LineStream:
        model = (request.model or self.default_model).removeprefix("models/")
        payload = gemini_payload(
            request.messages,
            self._defaults.merged(request.options),
            tools=request.tools,
            output=request.output,
        )
        url = f"{self.base_url}/{model_resource(model)}:streamGenerateContent"
        return LineStream(
            self._session,
            url,
            _GeminiEvents(model),
            provider=self.name,
            model=model,
            base_url=self.base_url,
            status_error=self._status_error,
            params={"alt": "sse"},
            data=orjson.dumps(payload),
            headers=self._headers,
        )

    async def embed(self, model: str, inputs: list[str], dimensions: int | None = None) -> Embeddings:
        model = (model or self.default_model).removeprefix("models/")
        resource = model_resource(model)
        requests: list[dict[str, Any]] = [
            {"model": resource, "content": {"parts": [{"text": text}]}} for text in inputs
        ]
        if dimensions is not None:
            for item in requests:
                item["outputDimensionality"] = dimensions
        data = await post_json(
            self._session,
            f"{self.base_url}/{resource}:batchEmbedContents",
            {"requests": requests},
            provider=self.name,
            model=model,
            base_url=self.base_url,
            status_error=self._status_error,
            headers=self._headers,
        )
        try:
            vectors = [item["values"] for item in data["embeddings"]]
        except (KeyError, TypeError) as exc:
            raise ProviderError(
                "gemini answered batchEmbedContents in an unknown shape", provider=self.name, model=model
            ) from exc
        if len(vectors) != len(inputs):
            raise ProviderError(
                f"gemini answered {len(vectors)} embeddings for {len(inputs)} inputs",
                provider=self.name, model=model,
            )
        return Embeddings(vectors)

    def _status_error(self, status: int, body: bytes, model: str) -> ProviderHTTPError:
        _, status_name, message = google_error_body(body)
        if status == 404 and model:
            return ModelNotFound(
                f"model {model!r} not found in gemini: {message}", provider=self.name, model=model
            )
        label = f"{status} {status_name}" if status_name else str(status)
        return ProviderHTTPError(
            f"gemini answered {label}: {message}", status=status, provider=self.name, model=model
        )

    async def models(self) -> list[str]:
        """The models that can generate content (all listed, when the field is absent)."""
        return [model.name for model in await self.model_catalog()]

    async def model_catalog(self) -> list[ModelInfo]:
        """The models that can generate content, each with its resource as Gemini lists it."""
        models: list[ModelInfo] = []
        params = {"pageSize": "1000"}
        async with upstream_errors(self.name, "", self.base_url):
            for _ in range(_MAX_MODEL_PAGES):
                async with self._session.get(
                    f"{self.base_url}/models", params=params, headers=self._headers
                ) as response:
                    if response.status >= 400:
                        raise self._status_error(response.status, await response.read(), "")
                    data = await response.json(loads=orjson.loads, content_type=None)
                for entry in data.get("models") or ():
                    methods = entry.get("supportedGenerationMethods")
                    if "name" in entry and (methods is None or "generateContent" in methods):
                        models.append(ModelInfo(entry["name"].removeprefix("models/"), entry, "gemini", owned_by="google"))
                token = data.get("nextPageToken")
                if not token:
                    break
                params = {"pageSize": "1000", "pageToken": token}
        return models

    async def model_card(self, name: str) -> Mapping[str, Any] | None:
        return None

    async def loaded_models(self) -> list[ModelInfo]:
        return []

    async def check(self) -> str:
        models = await self.models()
        return f"gemini at {self.base_url} ({len(models)} models)"

    async def aclose(self) -> None:
        return None


_KEY_REQUIRED = "GEMINI_API_KEY: required when CHATGATE_PROVIDER=gemini"


class GeminiSettings(ProviderSettings):
    gemini_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("GEMINI_API_KEY", "GOOGLE_API_KEY"),
        description="Gemini API key; required with CHATGATE_PROVIDER=gemini.",
    )
    gemini_base_url: str = Field(
        "https://generativelanguage.googleapis.com",
        validation_alias=AliasChoices("CHATGATE_GEMINI_BASE_URL"),
        description="Base URL of the Gemini API.",
    )

    def api_key(self) -> str | None:
        key = self.gemini_api_key.get_secret_value() if self.gemini_api_key else ""
        return key or None

    def problem(self) -> str | None:
        """Google answers nothing without a key."""
        return None if self.api_key() else _KEY_REQUIRED


@register_provider("gemini", settings=GeminiSettings)
def _from_settings(
    settings: GeminiSettings, defaults: ProviderDefaults, session: aiohttp.ClientSession
) -> GeminiProvider:
    key = settings.api_key()
    if key is None:
        raise ConfigError(_KEY_REQUIRED)
    return GeminiProvider(
        settings.gemini_base_url,
        key,
        session,
        default_model=defaults.model or DEFAULT_MODEL,
        default_options=defaults.options,
    )
