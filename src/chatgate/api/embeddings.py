"""Embeddings through the upstream: OpenAI's ``POST /v1/embeddings``, Ollama's
``POST /api/embed`` and its older ``POST /api/embeddings``.

Each route reads its API's request, asks :meth:`ChatService.embed` (which counts the
request against the caller's rate like a turn) and answers in its API's shape; failures
come back in that API's error shape through the application's :class:`ChatError` handler.
The routes live apart from ``openai_compat`` and ``ollama_compat`` because embeddings
share nothing with turns there but the error shapes; the app includes this router first,
so neither API's catch-all for unknown paths can shadow it.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

from fastapi import APIRouter, Request, Response

from chatgate.api import compat
from chatgate.api.auth import caller
from chatgate.api.errors import ORJSONResponse, RequestError

router = APIRouter()
#: OpenAI's own cap on the texts of one request.
MAX_INPUTS = 2048
MAX_DIMENSIONS = 65536


def _texts(value: Any, param: str) -> list[str]:
    """One text or a list of texts; token arrays are refused (the upstreams differ in
    whether and how they take them)."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise RequestError(f"{param} must be a string or a list of strings", param=param)
    if not texts or len(texts) > MAX_INPUTS:
        raise RequestError(f"{param} must hold 1 to {MAX_INPUTS} texts", param=param)
    if not all(texts):
        raise RequestError(f"{param} must not hold an empty string", param=param)
    return texts


def _model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise RequestError("model must be a string of 1 to 256 characters", param="model")
    if compat.agent_of(model) is not None:
        raise RequestError("agents do not do embeddings; name an upstream embedding model", param="model")
    return model


def _dimensions(data: dict[str, Any]) -> int | None:
    """``dimensions``: passed to the upstream, which shortens the vectors of models trained
    for it (and refuses it for others)."""
    value = data.get("dimensions")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIMENSIONS:
        raise RequestError(f"dimensions must be an integer from 1 to {MAX_DIMENSIONS}", param="dimensions")
    return value


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def float32_base64(vector: list[float]) -> str:
    """What the ``openai`` package decodes for ``encoding_format: base64`` (its default):
    the vector as little-endian float32, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


@router.post("/v1/embeddings")
async def openai_embeddings(request: Request) -> Response:
    data = compat.read_json_object(await request.body())
    model = _model(data)
    texts = _texts(data.get("input"), "input")
    encoding = data.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise RequestError("encoding_format must be 'float' or 'base64'", param="encoding_format")
    embeddings = await compat.gateway_of(request).service.embed(
        model, texts, dimensions=_dimensions(data), owner=caller(request), client=_client(request)
    )
    encode = float32_base64 if encoding == "base64" else None
    items = [
        {"object": "embedding", "index": i, "embedding": encode(vector) if encode else vector}
        for i, vector in enumerate(embeddings.vectors)
    ]
    tokens = embeddings.prompt_tokens or 0
    return ORJSONResponse(
        {
            "object": "list",
            "data": items,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


@router.post("/api/embed")
async def ollama_embed(request: Request) -> Response:
    started = time.perf_counter_ns()
    data = compat.read_json_object(await request.body())
    model = _model(data)
    texts = _texts(data.get("input"), "input")
    embeddings = await compat.gateway_of(request).service.embed(
        model, texts, dimensions=_dimensions(data), owner=caller(request), client=_client(request)
    )
    return ORJSONResponse(
        {
            "model": model,
            "embeddings": embeddings.vectors,
            "total_duration": time.perf_counter_ns() - started,
            "load_duration": 0,
            "prompt_eval_count": embeddings.prompt_tokens or 0,
        }
    )


@router.post("/api/embeddings")
async def ollama_legacy_embeddings(request: Request) -> Response:
    """Ollama's older call: one ``prompt``, one ``embedding``."""
    data = compat.read_json_object(await request.body())
    model = _model(data)
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt must be a non-empty string", param="prompt")
    embeddings = await compat.gateway_of(request).service.embed(
        model, [prompt], owner=caller(request), client=_client(request)
    )
    return ORJSONResponse({"embedding": embeddings.vectors[0]})
