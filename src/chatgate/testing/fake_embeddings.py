"""Embeddings for the fake upstream, mounted by ``fake_llm.create_app``: Ollama's
``POST /api/embed``, OpenAI's ``POST /v1/embeddings`` and Gemini's
``POST /v1beta/models/{model}:batchEmbedContents``.

Each text's vector is :func:`fake_vector`, a pure function of the text, so a test can
compute what it expects. ``missing-*`` models are 404 in each API's error shape, and every
request lands in the fake's request record like a turn does.
"""

from __future__ import annotations

import hashlib
import struct
import time
from typing import Any

from aiohttp import web

from chatgate.testing.fake_gemini import API, gemini_error, key_refusal
from chatgate.testing.fake_wire import STATE, json_response, read_object

DIMENSIONS = 8


def fake_vector(text: str) -> list[float]:
    """``DIMENSIONS`` floats in [-1, 1) from the text's SHA-256, exact in float32."""
    digest = hashlib.sha256(text.encode()).digest()
    return [(value - 32768) / 32768 for value in struct.unpack(f"<{DIMENSIONS}H", digest[: 2 * DIMENSIONS])]


def _sized(vectors: list[list[float]], dimensions: Any) -> list[list[float]]:
    """The vectors cut to ``dimensions`` when a request asks for fewer."""
    if isinstance(dimensions, int) and 0 < dimensions < DIMENSIONS:
        return [vector[:dimensions] for vector in vectors]
    return vectors


def _texts(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def _record(request: web.Request, body: Any) -> None:
    record = request.app[STATE].open_record(request.path, body, time.monotonic())
    record.finished_at = time.monotonic()
    record.completed = True


async def _ollama_embed(request: web.Request) -> web.Response:
    body = await read_object(request) or {}
    _record(request, body)
    model, texts = body.get("model"), _texts(body.get("input"))
    if not isinstance(model, str) or texts is None:
        return json_response({"error": "model and input are required"}, 400)
    if request.app[STATE].is_missing(model):
        return json_response({"error": f"model '{model}' not found"}, 404)
    return json_response(
        {
            "model": model,
            "embeddings": _sized([fake_vector(text) for text in texts], body.get("dimensions")),
            "total_duration": 1000,
            "load_duration": 100,
            "prompt_eval_count": sum(len(text.split()) for text in texts),
        }
    )


async def _openai_embeddings(request: web.Request) -> web.Response:
    body = await read_object(request) or {}
    _record(request, body)
    model, texts = body.get("model"), _texts(body.get("input"))
    if not isinstance(model, str) or texts is None:
        error = {"message": "model and input are required", "type": "invalid_request_error"}
        return json_response({"error": error}, 400)
    if request.app[STATE].is_missing(model):
        error = {
            "message": f"The model `{model}` does not exist",
            "type": "invalid_request_error",
            "code": "model_not_found",
        }
        return json_response({"error": error}, 404)
    tokens = sum(len(text.split()) for text in texts)
    vectors = _sized([fake_vector(text) for text in texts], body.get("dimensions"))
    data = [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)]
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def _gemini_batch_embed(request: web.Request) -> web.Response:
    refusal = key_refusal(request)
    body = await read_object(request) or {}
    _record(request, body)
    if refusal is not None:
        return refusal
    model = request.match_info["model"]
    if request.app[STATE].is_missing(model):
        return gemini_error(404, f"models/{model} is not found for API version v1beta")
    texts: list[str] = []
    dimensions = None
    for item in body.get("requests") or ():
        dimensions = item.get("outputDimensionality") if isinstance(item, dict) else None
        parts = (item.get("content") or {}).get("parts") if isinstance(item, dict) else None
        if not isinstance(parts, list) or item.get("model") != f"models/{model}":
            return gemini_error(400, "each request needs content.parts and the model of the URL")
        texts.append("".join(str(part.get("text", "")) for part in parts if isinstance(part, dict)))
    if not texts:
        return gemini_error(400, "requests is required")
    vectors = _sized([fake_vector(text) for text in texts], dimensions)
    return json_response({"embeddings": [{"values": vector} for vector in vectors]})


def add_embedding_routes(app: web.Application) -> None:
    app.router.add_post("/api/embed", _ollama_embed)
    app.router.add_post("/v1/embeddings", _openai_embeddings)
    app.router.add_post(API + "/models/{model:[^/:]+}:batchEmbedContents", _gemini_batch_embed)
