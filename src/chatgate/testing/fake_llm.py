"""A deterministic fake LLM upstream speaking Ollama's and OpenAI's streaming wire formats,
and Gemini's (its dialect lives in ``fake_gemini.py`` and is mounted here).

Tests, demos and benchmarks point providers at it over loopback. Besides the model routes it
serves a control API under ``/_fake/``: change pacing, queue faults, read back a timed record
of every chat request and reset. Times are ``time.monotonic()`` values, which on Linux are
CLOCK_MONOTONIC and so comparable across processes. How a turn is paced and faulted is
``fake_wire``'s, shared by every dialect.

Tools and JSON mode are answered as ``fake_tools`` decides, from the request's ``tools``
(``[{"type": "function", "function": {name, parameters}}]`` in both formats), OpenAI's
``tool_choice``, its last message, and ``response_format`` (OpenAI) or ``format`` (Ollama;
the only thing ``/api/generate`` answers besides words). A streamed OpenAI call is one chunk
with its ``id`` (``call_fake_<record id>_<index>``) and name, then one per piece of its
arguments; an Ollama answer is one line with every call, its arguments an object. JSON text
comes in ``fake_tools.pieces``. Each of those frames is paced, faulted and counted (usage,
``eval_count``, ``tokens_sent``) as a token is; ``max_tokens`` does not cut them short.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, get_args

import orjson
from aiohttp import web

from chatgate.testing.fake_embeddings import add_embedding_routes
from chatgate.testing.fake_gemini import add_gemini_routes
from chatgate.testing.fake_tools import FakeCall, choose_calls, json_answer, pieces
from chatgate.testing.fake_wire import (
    STATE,
    TOKEN_JSON,
    Dialect,
    FakeSettings,
    Fault,
    FaultKind,
    Frames,
    Script,
    Turn,
    add_turn_state,
    fake_reply,
    fake_tokens,
    json_response,
    read_object,
    token_limit,
    turn_handler,
    word_count,
)

__all__ = [
    "FakeServer",
    "FakeSettings",
    "FaultKind",
    "create_app",
    "fake_reply",
    "fake_tokens",
    "run_fake_llm",
    "start_fake_llm",
]

_SHUTDOWN_TIMEOUT_S = 0.25
#: Pending connections the listening socket holds: a gateway opening thousands of upstream
#: streams at once must not have its connections dropped (the default is 128).
_BACKLOG = 4096
_MAX_BODY_BYTES = 64 * 1024 * 1024
_MODIFIED_AT = "2025-01-01T00:00:00Z"
_MODEL_DETAILS = {
    "parent_model": "",
    "format": "gguf",
    "family": "fake",
    "families": ["fake"],
    "parameter_size": "1M",
    "quantization_level": "Q8_0",
}

_FAULT_KINDS: dict[str, FaultKind] = {kind: kind for kind in get_args(FaultKind)}


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=orjson.dumps({"error": message}).decode(), content_type="application/json"
    )


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float) -> int:
    return max(1, int(seconds * 1e9))


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _tool_calls(body: dict[str, Any], choice: str | None) -> tuple[FakeCall, ...]:
    """The calls answering ``body``'s ``tools`` (the format OpenAI and Ollama share)."""
    tools = [
        (entry["function"]["name"], entry["function"].get("parameters"))
        for entry in body.get("tools") or ()
        if isinstance(entry, dict)
        and isinstance(entry.get("function"), dict)
        and isinstance(entry["function"].get("name"), str)
    ]
    if not tools:
        return ()
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else {}
    last = last if isinstance(last, dict) else {}
    return tuple(choose_calls(tools, choice, last.get("role"), _text(last.get("content"))))


def _json_script(text: str) -> Script:
    return Script(steps=len(pieces(text)), text=text)


def _message_words(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(
        word_count(message.get("content")) for message in messages if isinstance(message, dict)
    )


class _Ollama(Dialect):
    stream_default = True

    @abstractmethod
    def _content_field(self, text_json: bytes) -> bytes: ...

    @abstractmethod
    def _content_object(self, text: str, calls: tuple[FakeCall, ...] = ()) -> dict[str, Any]: ...

    def error(self, status: int, message: str) -> web.Response:
        return json_response({"error": message}, status)

    def not_found(self, model: str) -> web.Response:
        return self.error(404, f'model "{model}" not found, try pulling it first')

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        options = body.get("options")
        return token_limit(options.get("num_predict")) if isinstance(options, dict) else None

    def script(self, body: dict[str, Any]) -> Script | None:
        schema = body.get("format")
        if schema == "json" or isinstance(schema, dict):
            return _json_script(json_answer(schema))
        return None

    def frames(self, turn: Turn, body: dict[str, Any]) -> Frames:
        head = (
            b'{"model":' + orjson.dumps(turn.model)
            + b',"created_at":' + orjson.dumps(_now_iso()) + b","
        )  # fmt: skip
        script = turn.script
        if script is not None and script.calls:
            line = {
                "model": turn.model,
                "created_at": _now_iso(),
                **self._content_object("", script.calls),
                "done": False,
            }
            tokens: tuple[bytes, ...] = (orjson.dumps(line) + b"\n",)
        else:
            texts = TOKEN_JSON if script is None else map(orjson.dumps, pieces(script.text))
            tokens = tuple(head + self._content_field(text) + b',"done":false}\n' for text in texts)
        return Frames(
            content_type="application/x-ndjson",
            head=b"",
            tokens=tokens,
            error=b'{"error":"injected stream error"}\n',
            tail=lambda: orjson.dumps(self._final(turn, "")) + b"\n",
        )

    def complete(self, turn: Turn, body: dict[str, Any]) -> bytes:
        script = turn.script
        if script is None:
            return orjson.dumps(self._final(turn, fake_reply(turn.record.tokens_sent)))
        return orjson.dumps(self._final(turn, script.text, script.calls))

    def _final(self, turn: Turn, text: str, calls: tuple[FakeCall, ...] = ()) -> dict[str, Any]:
        elapsed = time.monotonic() - turn.record.started_at
        prompt_eval = min(turn.ttft_s, elapsed)
        return {
            "model": turn.model,
            "created_at": _now_iso(),
            **self._content_object(text, calls),
            "done": True,
            "done_reason": turn.finish_reason,
            "total_duration": _ns(elapsed),
            "load_duration": 0,
            "prompt_eval_count": turn.prompt_tokens,
            "prompt_eval_duration": _ns(prompt_eval),
            "eval_count": turn.record.tokens_sent,
            "eval_duration": _ns(elapsed - prompt_eval),
        }


class _OllamaChat(_Ollama):
    def _content_field(self, text_json: bytes) -> bytes:
        return b'"message":{"role":"assistant","content":' + text_json + b"}"

    def _content_object(self, text: str, calls: tuple[FakeCall, ...] = ()) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [
                {"function": {"name": call.name, "arguments": call.arguments}} for call in calls
            ]
        return {"message": message}

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        return _message_words(body)

    def script(self, body: dict[str, Any]) -> Script | None:
        calls = _tool_calls(body, None)
        return Script(steps=1, calls=calls) if calls else super().script(body)


class _OllamaGenerate(_Ollama):
    def _content_field(self, text_json: bytes) -> bytes:
        return b'"response":' + text_json

    def _content_object(self, text: str, calls: tuple[FakeCall, ...] = ()) -> dict[str, Any]:
        return {"response": text}

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        return word_count(body.get("prompt")) + word_count(body.get("system"))


class _OpenAIChat(Dialect):
    stream_default = False

    def error(self, status: int, message: str) -> web.Response:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return json_response(
            {"error": {"message": message, "type": kind, "param": None, "code": None}}, status
        )

    def not_found(self, model: str) -> web.Response:
        message = f"The model `{model}` does not exist or you do not have access to it."
        error = {
            "message": message,
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
        return json_response({"error": error}, 404)

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        limit = token_limit(body.get("max_completion_tokens"))
        return token_limit(body.get("max_tokens")) if limit is None else limit

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        return _message_words(body)

    def script(self, body: dict[str, Any]) -> Script | None:
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            function = choice.get("function")
            choice = function.get("name") if isinstance(function, dict) else None
        calls = _tool_calls(body, choice if isinstance(choice, str) else None)
        if calls:
            steps = sum(1 + len(pieces(call.arguments_json)) for call in calls)
            return Script(steps=steps, calls=calls)
        response_format = body.get("response_format")
        if not isinstance(response_format, dict):
            return None
        if response_format.get("type") == "json_object":
            return _json_script(json_answer(None))
        if response_format.get("type") == "json_schema":
            spec = response_format.get("json_schema")
            return _json_script(json_answer(spec.get("schema") if isinstance(spec, dict) else None))
        return None

    def frames(self, turn: Turn, body: dict[str, Any]) -> Frames:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        envelope = self._envelope(turn)
        prefix = b"data: " + orjson.dumps(envelope)[:-1] + b',"choices":[{"index":0,"delta":'
        close = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        suffix = b',"logprobs":null,"finish_reason":null}]' + close

        script = turn.script
        head = prefix + b'{"role":"assistant","content":""}' + suffix
        if script is None:
            tokens = tuple(prefix + b'{"content":' + text + b"}" + suffix for text in TOKEN_JSON)
        elif script.calls:
            head = b""
            tokens = tuple(
                prefix + orjson.dumps(delta) + suffix
                for delta in self._call_deltas(turn, script.calls)
            )
        else:
            tokens = tuple(
                prefix + orjson.dumps({"content": piece}) + suffix for piece in pieces(script.text)
            )

        def tail() -> bytes:
            reason = orjson.dumps(self._finish_reason(turn))
            last = prefix + b'{},"logprobs":null,"finish_reason":' + reason + b"}]" + close
            if include_usage:
                usage = {**envelope, "choices": [], "usage": self._usage(turn)}
                last += b"data: " + orjson.dumps(usage) + b"\n\n"
            return last + b"data: [DONE]\n\n"

        return Frames(
            content_type="text/event-stream",
            head=head,
            tokens=tokens,
            error=b'data: {"error":{"message":"injected stream error","type":"server_error"}}\n\n',
            tail=tail,
        )

    def complete(self, turn: Turn, body: dict[str, Any]) -> bytes:
        script = turn.script
        message: dict[str, Any] = {
            "role": "assistant",
            "content": fake_reply(turn.record.tokens_sent) if script is None else script.text,
            "refusal": None,
        }
        if script is not None and script.calls:
            message["content"] = None
            message["tool_calls"] = [
                {
                    "id": self._call_id(turn, index),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json},
                }
                for index, call in enumerate(script.calls)
            ]
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": self._finish_reason(turn),
        }
        envelope = {**self._envelope(turn), "object": "chat.completion"}
        return orjson.dumps({**envelope, "choices": [choice], "usage": self._usage(turn)})

    @staticmethod
    def _finish_reason(turn: Turn) -> str:
        return "tool_calls" if turn.script is not None and turn.script.calls else turn.finish_reason

    @staticmethod
    def _call_id(turn: Turn, index: int) -> str:
        return f"call_fake_{turn.record.id}_{index}"

    @classmethod
    def _call_deltas(cls, turn: Turn, calls: tuple[FakeCall, ...]) -> Iterator[dict[str, Any]]:
        """The streamed deltas of ``calls``: each call's id and name, then its arguments."""
        for index, call in enumerate(calls):
            opening = {
                "index": index,
                "id": cls._call_id(turn, index),
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            if index == 0:
                yield {"role": "assistant", "content": None, "tool_calls": [opening]}
            else:
                yield {"tool_calls": [opening]}
            for piece in pieces(call.arguments_json):
                yield {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}

    @staticmethod
    def _envelope(turn: Turn) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-fake-{turn.record.id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": turn.model,
            "system_fingerprint": "fp_fake",
        }

    @staticmethod
    def _usage(turn: Turn) -> dict[str, int]:
        completion = turn.record.tokens_sent
        return {
            "prompt_tokens": turn.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": turn.prompt_tokens + completion,
        }


def _ollama_tag(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": _MODIFIED_AT,
        "size": 1_048_576,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": _MODEL_DETAILS,
    }


async def _ollama_root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def _ollama_version(request: web.Request) -> web.Response:
    return json_response({"version": "0.6.0"})


async def _ollama_tags(request: web.Request) -> web.Response:
    return json_response(
        {"models": [_ollama_tag(name) for name in request.app[STATE].settings.models]}
    )


async def _ollama_show(request: web.Request) -> web.Response:
    body = await read_object(request) or {}
    name = body.get("model") or body.get("name")
    if not isinstance(name, str):
        return json_response({"error": "model is required"}, 400)
    if request.app[STATE].is_missing(name):
        return _OllamaChat().not_found(name)
    return json_response(
        {
            "modelfile": f"FROM {name}\n",
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": _MODEL_DETAILS,
            "model_info": {
                "general.architecture": "fake",
                "general.parameter_count": 1_000_000,
                "fake.context_length": 8192,
            },
            "capabilities": ["completion"],
            "modified_at": _MODIFIED_AT,
        }
    )


async def _ollama_ps(request: web.Request) -> web.Response:
    """The first model, as if loaded: Ollama's ``/api/ps`` entry."""
    models = request.app[STATE].settings.models[:1]
    loaded = [
        {**_ollama_tag(name), "size_vram": 524_288, "expires_at": "2099-01-01T00:00:00Z", "context_length": 8192}
        for name in models
    ]
    return json_response({"models": loaded})


#: ``created`` of the fake's OpenAI model objects (2024-01-01T00:00:00Z).
_CREATED = 1_704_067_200


async def _openai_models(request: web.Request) -> web.Response:
    models = request.app[STATE].settings.models
    data = [{"id": name, "object": "model", "created": _CREATED, "owned_by": "fake-org"} for name in models]
    return json_response({"object": "list", "data": data})


def _non_negative_int(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad_request(f"{key} must be a non-negative integer")
    return value


def _non_negative_number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _bad_request(f"{key} must be a non-negative number")
    return float(value)


async def _configure(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_object(request)
    if body is None:
        raise _bad_request("request body must be a JSON object")
    if unknown := body.keys() - {"tokens", "tps", "ttft_ms"}:
        raise _bad_request(f"unknown settings: {sorted(unknown)}")
    current = state.settings
    state.settings = replace(
        current,
        tokens=_non_negative_int(body, "tokens", current.tokens),
        tps=_non_negative_number(body, "tps", current.tps),
        ttft_ms=_non_negative_number(body, "ttft_ms", current.ttft_ms),
    )
    return json_response(state.settings)


def _parse_fault(item: Any) -> Fault:
    if not isinstance(item, dict):
        raise _bad_request("each fault must be a JSON object")
    if unknown := item.keys() - {"kind", "after", "model"}:
        raise _bad_request(f"unknown fault fields: {sorted(unknown)}")
    kind = _FAULT_KINDS.get(item.get("kind", ""))
    if kind is None:
        raise _bad_request(f"fault kind must be one of {sorted(_FAULT_KINDS)}")
    model = item.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad_request("fault model must be a string")
    return Fault(kind=kind, after=_non_negative_int(item, "after", 0), model=model)


async def _queue_faults(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_object(request)
    items = body.get("faults") if body is not None else None
    if not isinstance(items, list):
        raise _bad_request('expected {"faults": [...]}')
    state.faults.extend([_parse_fault(item) for item in items])
    return json_response({"queued": len(state.faults)})


async def _list_requests(request: web.Request) -> web.Response:
    return json_response({"requests": list(request.app[STATE].records)})


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return json_response({"reset": True})


def create_app(settings: FakeSettings) -> web.Application:
    """The fake's routes; serve it with ``handler_cancellation=True`` as `start_fake_llm` does.

    A handler learns that its client went away only by being cancelled, so without that
    option a ``hang`` fault lasts until shutdown and ``disconnected_at`` stays null.
    """
    app = web.Application(client_max_size=_MAX_BODY_BYTES)
    add_turn_state(app, settings)
    app.router.add_get("/", _ollama_root)
    app.router.add_get("/api/version", _ollama_version)
    app.router.add_get("/api/tags", _ollama_tags)
    app.router.add_post("/api/show", _ollama_show)
    app.router.add_get("/api/ps", _ollama_ps)
    app.router.add_post("/api/chat", turn_handler(_OllamaChat()))
    app.router.add_post("/api/generate", turn_handler(_OllamaGenerate()))
    app.router.add_get("/v1/models", _openai_models)
    app.router.add_post("/v1/chat/completions", turn_handler(_OpenAIChat()))
    add_gemini_routes(app)
    add_embedding_routes(app)
    app.router.add_post("/_fake/config", _configure)
    app.router.add_post("/_fake/faults", _queue_faults)
    app.router.add_get("/_fake/requests", _list_requests)
    app.router.add_post("/_fake/reset", _reset)
    return app


class FakeServer:
    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_fake_llm(
    host: str = "127.0.0.1", port: int = 0, settings: FakeSettings | None = None
) -> FakeServer:
    """Serve the fake on ``host:port`` (0 picks a free port) until ``close()``.

    Handlers are cancelled as soon as their client disconnects, which is what timestamps
    ``disconnected_at`` precisely.
    """
    runner = web.AppRunner(
        create_app(settings or FakeSettings()),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=_BACKLOG).start()
    except BaseException:
        await runner.cleanup()
        raise
    return FakeServer(runner, host, int(runner.addresses[0][1]))


async def _serve_until_signalled(host: str, port: int, settings: FakeSettings) -> None:
    server = await start_fake_llm(host, port, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        print(f"fake-llm listening on {server.url}", flush=True)
        await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await server.close()


def run_fake_llm(
    host: str = "127.0.0.1", port: int = 0, settings: FakeSettings | None = None
) -> None:
    """Serve in the foreground until SIGINT or SIGTERM (on uvloop when it is installed)."""
    main = _serve_until_signalled(host, port, settings or FakeSettings())
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
