"""Datadog LLM Observability: every generation one LLMObs ``llm`` span, sent agentless.

On with ``DD_LLMOBS_ENABLED`` (``1`` or ``true``) and the ``datadog`` extra installed.
ddtrace itself reads the rest, as it does for any application: ``DD_LLMOBS_ML_APP``,
``DD_API_KEY``, ``DD_SITE`` (the intake is derived from it), ``DD_ENV``, ``DD_SERVICE``.
Agentless unless ``DD_LLMOBS_AGENTLESS_ENABLED`` is false (then through a local Agent).

Only LLM Observability is switched on: no integration is patched (aiohttp, FastAPI and the
rest stay as they are), and APM tracing is off unless ``DD_APM_TRACING_ENABLED`` says
otherwise, so the spans go straight to the LLM Observability intake rather than riding an
APM trace that would hold nothing else. Without ``DD_LLMOBS_ENABLED`` ddtrace is not even
imported.

A span opens as the generation's task is made (:meth:`GenerationObserver.task_context`,
inside that task's context, so it is current there and nowhere else) and ends with the
generation: model name and provider, the prompt's messages, the answer (text and tool
calls), the token counts and time to first token, how it ended, and the error if it failed.
"""

from __future__ import annotations

import contextvars
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatgate.chat.events import DoneEvent, ErrorEvent
from chatgate.chat.generation import Generation
from chatgate.chat.lifecycle import GenerationObserver
from chatgate.config import ConfigError
from chatgate.providers.base import ProviderError, ProviderRequest
from chatgate.vocabulary import Message, ToolCall

if TYPE_CHECKING:
    from ddtrace.llmobs import LLMObs
    from ddtrace.trace import Span

INSTALL = "pip install 'chatgate[datadog]'"
#: What ddtrace itself takes as true (its `asbool`): anything else is off there too.
_TRUE = ("1", "true")


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``DD_LLMOBS_ENABLED`` asks for LLM Observability."""
    env = os.environ if environ is None else environ
    return env.get("DD_LLMOBS_ENABLED", "").strip().lower() in _TRUE


def start_datadog() -> type[LLMObs] | None:
    """Enable LLM Observability when ``DD_LLMOBS_ENABLED`` says so, and return ddtrace's
    ``LLMObs`` for :class:`LLMObsObserver`; None when it is off. A missing package or a
    setting ddtrace refuses (no ``DD_API_KEY`` in agentless mode) is a ConfigError, raised
    before the gateway opens anything."""
    if not enabled():
        return None
    # Read by ddtrace when it is imported: without an APM trace to ride, LLM Observability
    # events are sent on their own, to the LLM Observability intake.
    os.environ.setdefault("DD_APM_TRACING_ENABLED", "false")
    try:
        from ddtrace.llmobs import LLMObs
    except ImportError:
        raise ConfigError(
            f"DD_LLMOBS_ENABLED is set but ddtrace is not installed: {INSTALL}"
        ) from None
    agentless = os.environ.get("DD_LLMOBS_AGENTLESS_ENABLED", "true").strip().lower() in _TRUE
    try:
        LLMObs.enable(integrations_enabled=False, agentless_enabled=agentless)
    except ValueError as exc:
        raise ConfigError(f"Datadog LLM Observability: {exc}") from None
    return LLMObs


def stop_datadog(observer: LLMObsObserver) -> None:
    """Send the spans still queued and disable LLM Observability. Blocks while it sends."""
    observer.llmobs.flush()
    observer.llmobs.disable()


@dataclass(slots=True)
class _Open:
    """A generation's span while it runs, and what is learnt before it ends."""

    span: Span
    request: ProviderRequest
    ttft_s: float | None = None
    retries: int = 0
    fell_back_from: list[str] = field(default_factory=list)


class LLMObsObserver(GenerationObserver):
    """One LLMObs ``llm`` span per generation (see the module docstring)."""

    provides_context = True

    def __init__(self, provider: str, llmobs: type[LLMObs]) -> None:
        #: The span's ``model_provider``, and its name ``{provider}.generate``.
        self.provider = provider
        self.llmobs = llmobs
        self._open: dict[Generation, _Open] = {}

    def task_context(
        self, generation: Generation, request: ProviderRequest, context: contextvars.Context
    ) -> contextvars.Context:
        span = context.run(self._start, generation, request)
        self._open[generation] = _Open(span, request)
        return context

    def _start(self, generation: Generation, request: ProviderRequest) -> Span:
        span = self.llmobs.llm(
            model_name=request.model,
            name=f"{self.provider}.generate",
            model_provider=self.provider,
            session_id=generation.conversation_key or generation.conversation_id,
        )
        try:
            self.llmobs.annotate(
                span=span,
                input_data=[_message(message) for message in request.messages],
                tags={
                    "generation_id": generation.id,
                    "conversation_id": generation.conversation_id,
                    "agent": generation.agent,
                },
                tool_definitions=_tool_definitions(request),
            )
        except Exception:
            span.finish()  # a span that could not be described is not left open
            raise
        return span

    def first_token(self, generation: Generation, ttft_s: float) -> None:
        found = self._open.get(generation)
        if found is not None:
            found.ttft_s = ttft_s

    def retried(self, generation: Generation, model: str, attempt: int, exc: ProviderError) -> None:
        found = self._open.get(generation)
        if found is not None:
            found.retries += 1

    def fell_back(self, generation: Generation, failed: str, model: str, exc: ProviderError) -> None:
        found = self._open.get(generation)
        if found is not None:
            found.fell_back_from.append(failed)

    def finished(self, generation: Generation, done: DoneEvent) -> None:
        self._end(generation, done["finish_reason"], done["usage"]["prompt_tokens"],
                  done["usage"]["completion_tokens"])

    def cancelled(self, generation: Generation, done: DoneEvent) -> None:
        self._end(generation, "cancelled", done["usage"]["prompt_tokens"], generation.tokens)

    def failed(self, generation: Generation, error: ErrorEvent, exc: BaseException | None) -> None:
        self._end(generation, "error", 0, generation.tokens, error=error, exc=exc)

    def _end(
        self,
        generation: Generation,
        outcome: str,
        input_tokens: int,
        output_tokens: int,
        *,
        error: ErrorEvent | None = None,
        exc: BaseException | None = None,
    ) -> None:
        found = self._open.pop(generation, None)
        if found is None:
            return
        span = found.span
        try:
            metrics: dict[str, float] = {"output_tokens": output_tokens}
            if input_tokens:  # 0: the upstream did not say
                metrics["input_tokens"] = input_tokens
                metrics["total_tokens"] = input_tokens + output_tokens
            if found.ttft_s is not None:
                metrics["time_to_first_token"] = found.ttft_s
            tags = {"outcome": outcome}
            if error is not None:
                tags["error_code"] = str(error.get("code", "internal"))
            self.llmobs.annotate(
                span=span,
                output_data=[_answer(generation)],
                metrics=metrics,
                metadata=_metadata(found, generation),
                tags=tags,
            )
        finally:
            if error is not None:
                _mark_error(span, error, exc)
            span.finish()


def _mark_error(span: Span, error: ErrorEvent, exc: BaseException | None) -> None:
    from ddtrace.constants import ERROR_MSG, ERROR_TYPE

    if exc is not None:
        span.set_exc_info(type(exc), exc, exc.__traceback__)
    else:
        span.error = 1
        span.set_tag(ERROR_TYPE, str(error.get("code", "internal")))
    # What the client was told, rather than the exception's own words.
    span.set_tag(ERROR_MSG, error.get("message", ""))


def _message(message: Message) -> dict[str, Any]:
    """A prompt message as LLMObs takes it."""
    converted: dict[str, Any] = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        converted["tool_calls"] = [_tool_call(call) for call in message["tool_calls"]]
    if message["role"] == "tool":
        result: dict[str, Any] = {"result": message["content"], "type": "function_call_output"}
        if message.get("tool_call_id"):
            result["tool_id"] = message["tool_call_id"]
        if message.get("name"):
            result["name"] = message["name"]
        converted["tool_results"] = [result]
    return converted


def _answer(generation: Generation) -> dict[str, Any]:
    answer: dict[str, Any] = {"role": "assistant", "content": generation.text}
    calls = [call for call in generation.tool_calls if call["name"]]
    if calls:
        answer["tool_calls"] = [_tool_call(call) for call in calls]
    return answer


def _tool_call(call: ToolCall) -> dict[str, Any]:
    """LLMObs wants a call's arguments as an object; the JSON text of an answer cut short
    may not parse, and is then kept as it is under ``arguments``."""
    try:
        arguments = json.loads(call["arguments"] or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        arguments = {"arguments": call["arguments"]}
    converted: dict[str, Any] = {"name": call["name"], "arguments": arguments, "type": "function"}
    if call["id"]:
        converted["tool_id"] = call["id"]
    return converted


def _tool_definitions(request: ProviderRequest) -> list[dict[str, Any]] | None:
    if request.tools is None or not request.tools.tools:
        return None
    definitions = []
    for tool in request.tools.tools:
        definition: dict[str, Any] = {"name": tool.name}
        if tool.description:
            definition["description"] = tool.description
        if tool.parameters is not None:
            definition["schema"] = dict(tool.parameters)
        definitions.append(definition)
    return definitions


def _metadata(found: _Open, generation: Generation) -> dict[str, Any]:
    """The sampling options sent, and how the upstream was reached when it took more
    than one attempt or model."""
    options = found.request.options
    metadata: dict[str, Any] = {
        name: value
        for name in ("temperature", "max_tokens", "top_p", "top_k", "seed", "num_ctx",
                     "frequency_penalty", "presence_penalty")
        if (value := getattr(options, name)) is not None
    }
    if options.stop:
        metadata["stop"] = list(options.stop)
    if found.retries:
        metadata["retries"] = found.retries
    if found.fell_back_from:
        metadata["fell_back_from"] = found.fell_back_from
        metadata["answered_by"] = generation.model
    return metadata
