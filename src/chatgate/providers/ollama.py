"""Ollama's native API: ``POST /api/chat`` streaming NDJSON."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import aiohttp
import orjson

from chatgate.providers._http import JSON_HEADERS, error_text, streamed_post, upstream_errors
from chatgate.providers.base import (
    Chunk,
    FinishReason,
    GenerationOptions,
    ModelNotFound,
    ProviderHTTPError,
    ProviderRequest,
    ProviderStreamError,
    Usage,
    register_provider,
)


def ollama_options(options: GenerationOptions) -> dict[str, Any]:
    mapped: dict[str, Any] = {
        "temperature": options.temperature,
        "num_ctx": options.num_ctx,
        "num_predict": options.max_tokens,
        "top_p": options.top_p,
        "seed": options.seed,
        "stop": list(options.stop) or None,
    }
    return {k: v for k, v in mapped.items() if v is not None}


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

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Chunk]:
        model = request.model or self.default_model
        payload: dict[str, Any] = {"model": model, "messages": request.messages, "stream": True}
        options = ollama_options(self._defaults.merged(request.options))
        if options:
            payload["options"] = options
        async with streamed_post(
            self._session,
            f"{self.base_url}/api/chat",
            provider=self.name,
            model=model,
            base_url=self.base_url,
            status_error=self._status_error,
            data=orjson.dumps(payload),
            headers=JSON_HEADERS,
        ) as body:
            async for line in body.lines():
                if not line.strip():
                    continue
                data = orjson.loads(line)
                if "error" in data:
                    raise ProviderStreamError(f"ollama: {data['error']}", provider=self.name, model=model)
                text = (data.get("message") or {}).get("content", "")
                if data.get("done"):
                    body.complete()
                    reason: FinishReason = "length" if data.get("done_reason") == "length" else "stop"
                    usage = Usage(data.get("prompt_eval_count") or 0, data.get("eval_count") or 0)
                    yield Chunk(text, finish_reason=reason, usage=usage)
                    return
                if text:
                    yield Chunk(text)
            raise ProviderStreamError(
                "ollama ended the stream without a final message", provider=self.name, model=model
            )

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

    async def check(self) -> str:
        async with upstream_errors(self.name, "", self.base_url):
            async with self._session.get(f"{self.base_url}/api/version") as response:
                if response.status >= 400:
                    raise self._status_error(response.status, await response.read(), "")
                data = await response.json(loads=orjson.loads, content_type=None)
        return f"ollama {data.get('version', '?')} at {self.base_url}"

    async def aclose(self) -> None:
        return None


@register_provider("ollama")
def _from_settings(settings: Any, session: aiohttp.ClientSession) -> OllamaProvider:
    return OllamaProvider(
        settings.ollama_host,
        session,
        default_model=settings.model or "llama3.2",
        default_options=settings.generation_options,
    )
