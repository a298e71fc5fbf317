"""ChatService: one turn from a user message to a stored answer.

load window → system + window + new message → stream (retry, then fallback models, only
before the first token) → native events in the generation's log → store the answer,
marked partial when it was cancelled or broke off.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from chatgate import observability as obs
from chatgate.chat.agents import Agent, AgentRegistry
from chatgate.chat.events import ChatError, DoneEvent, error_event, provider_error_code
from chatgate.chat.generation import Generation
from chatgate.chat.limits import RateLimiter, StreamCounter
from chatgate.providers.base import (
    Chunk,
    FinishReason,
    GenerationOptions,
    Message,
    Provider,
    ProviderError,
    ProviderRequest,
    Usage,
)
from chatgate.store.base import ConversationStore, StoredMessage

log = logging.getLogger("chatgate.chat")
#: Conversation ids travel in headers (X-Conversation-Id) and URLs: printable ASCII only.
CONVERSATION_ID = re.compile(r"[\x21-\x7e]{1,128}")


@dataclass(slots=True)
class Turn:
    message: str
    conversation_id: str | None = None
    agent: str | None = None
    model: str | None = None
    options: GenerationOptions | None = None
    owner: str | None = None
    #: The peer address; limits apply to it when the caller is anonymous.
    client: str | None = None
    request_id: str | None = None
    #: The client's own history for this turn (stateless APIs); replaces the stored window.
    history: list[Message] | None = None
    #: Read and write server memory for this turn.
    remember: bool = True
    apply_agent_prompt: bool = True


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_backoff_s, self.backoff_s * 2**attempt))


def build_messages(agent: Agent | None, history: list[Message], message: str) -> list[Message]:
    messages: list[Message] = []
    if agent is not None:
        messages.append({"role": "system", "content": agent.system_prompt})
    messages.extend(history)
    messages.append({"role": "user", "content": message})
    return messages


class ChatService:
    def __init__(
        self,
        provider: Provider,
        store: ConversationStore,
        agents: AgentRegistry,
        *,
        memory_enabled: bool = True,
        max_turns: int = 20,
        fallback_models: list[str] | None = None,
        retry: RetryPolicy | None = None,
        keep_finished_s: float = 30.0,
        rate_limiter: RateLimiter | None = None,
        max_streams_per_client: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.store = store
        self.agents = agents
        self.memory_enabled = memory_enabled
        self.max_turns = max_turns
        self.fallback_models = fallback_models or []
        self.retry = retry or RetryPolicy()
        self.keep_finished_s = keep_finished_s
        self._clock = clock
        self._rate_limiter = rate_limiter
        self._streams = StreamCounter(max_streams_per_client)
        self._generations: dict[str, Generation] = {}
        self._by_conversation: dict[str, Generation] = {}

    def get(self, generation_id: str) -> Generation | None:
        return self._generations.get(generation_id)

    def active(self, conversation_id: str) -> Generation | None:
        return self._by_conversation.get(conversation_id)

    async def start(self, turn: Turn) -> Generation:
        """Validate the turn, load its history and start generating; the returned
        generation's log already holds the ``start`` event."""
        agent = self.agents.get(turn.agent)
        limit_key = turn.owner or turn.client or "anonymous"
        if self._rate_limiter is not None:
            self._rate_limiter.acquire(limit_key)
        conversation_id = turn.conversation_id or uuid.uuid4().hex
        if not CONVERSATION_ID.fullmatch(conversation_id):
            raise ChatError(
                "bad_request", "conversation_id must be 1 to 128 printable ASCII characters without spaces"
            )
        if conversation_id in self._by_conversation:
            raise ChatError(
                "busy", "a generation is already running in this conversation", status=409, retryable=True
            )
        remember = self.memory_enabled and turn.remember
        history: list[Message] = []
        if turn.history is not None:
            history = turn.history
        elif remember:
            info = await self.store.info(conversation_id)
            if info is not None and info.owner != turn.owner:
                raise ChatError("forbidden", "this conversation belongs to another client", status=403)
            window = await self.store.window(conversation_id, self.max_turns)
            history = [{"role": m.role, "content": m.content} for m in window]
        model = turn.model or agent.model or self.provider.default_model
        options = agent.options.merged(turn.options)
        request = ProviderRequest(
            build_messages(agent if turn.apply_agent_prompt else None, history, turn.message), model, options
        )
        generation = Generation(
            id=turn.request_id or uuid.uuid4().hex,
            conversation_id=conversation_id,
            agent=agent.name,
            model=model,
            owner=turn.owner,
        )
        if conversation_id in self._by_conversation:  # raced while loading history
            raise ChatError("busy", "a generation is already running in this conversation", status=409, retryable=True)
        self._streams.acquire(limit_key)
        generation.limit_key = limit_key
        generation.emit(generation.start_event())
        self._generations[generation.id] = generation
        self._by_conversation[conversation_id] = generation
        generation.task = asyncio.create_task(
            self._run(generation, request, turn, remember), name=f"generation-{generation.id}"
        )
        return generation

    def orphan(self, generation: Generation, grace_s: float) -> None:
        """Its socket dropped: keep generating for ``grace_s`` so it can be resumed."""
        if generation.finished:
            return
        self.adopt(generation)
        loop = asyncio.get_running_loop()
        generation.orphan_timer = loop.call_later(grace_s, generation.cancel)

    def adopt(self, generation: Generation) -> None:
        if generation.orphan_timer is not None:
            generation.orphan_timer.cancel()
            generation.orphan_timer = None

    async def clear_history(self, conversation_id: str, owner: str | None) -> None:
        info = await self.store.info(conversation_id)
        if info is not None and info.owner != owner:
            raise ChatError("forbidden", "this conversation belongs to another client", status=403)
        self._stop_remembering(conversation_id)
        await self.store.clear(conversation_id)

    async def delete(self, conversation_id: str) -> bool:
        self._stop_remembering(conversation_id)
        return await self.store.delete(conversation_id)

    def _stop_remembering(self, conversation_id: str) -> None:
        """A running reply must not write back into history the user just erased."""
        active = self._by_conversation.get(conversation_id)
        if active is not None:
            active.forgotten = True
            active.cancel()

    async def aclose(self) -> None:
        tasks = [g.task for g in self._generations.values() if g.task and not g.task.done()]
        for generation in list(self._generations.values()):
            generation.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, generation: Generation, request: ProviderRequest, turn: Turn, remember: bool) -> None:
        started = self._clock()
        first_token_at: float | None = None
        usage: Usage | None = None
        reason: FinishReason = "stop"
        try:
            async for chunk in self._stream_with_fallback(generation, request):
                if chunk.text:
                    if first_token_at is None:
                        first_token_at = self._clock()
                        obs.TTFT.labels(self.provider.name).observe(first_token_at - started)
                    generation.emit_delta(chunk.text)
                if chunk.finish_reason is not None:
                    reason = chunk.finish_reason
                    usage = chunk.usage
        except asyncio.CancelledError:
            reason = "cancelled"
            if not generation.cancel_requested:
                raise
        except ProviderError as exc:
            obs.GENERATIONS.labels(self.provider.name, "error").inc()
            log.warning(
                "generation failed",
                extra={"request_id": generation.id, "conversation_id": generation.conversation_id,
                       "error": exc.message, "after_tokens": generation.tokens},
            )
            # After the first token the client may retry the whole turn; before it,
            # retryability is the upstream error's own.
            retryable = exc.retryable or generation.tokens > 0
            generation.finish(
                error_event(provider_error_code(exc), exc.message, id=generation.id, retryable=retryable)
            )
            await self._finish(generation, turn, remember, partial=True)
            return
        except Exception as exc:
            log.exception("generation crashed", extra={"request_id": generation.id})
            generation.finish(error_event("internal", f"internal error: {type(exc).__name__}", id=generation.id))
            await self._finish(generation, turn, remember, partial=True)
            return
        ended = self._clock()
        obs.GENERATIONS.labels(self.provider.name, reason).inc()
        obs.TOKENS.labels(self.provider.name).inc(generation.tokens)
        completion = usage.completion_tokens if usage and usage.completion_tokens else generation.tokens
        done: DoneEvent = {
            "type": "done",
            "id": generation.id,
            "finish_reason": reason,
            "usage": {"prompt_tokens": usage.prompt_tokens if usage else 0, "completion_tokens": completion},
            "timings": {
                "ttft_ms": round((first_token_at - started) * 1000, 3) if first_token_at else None,
                "total_ms": round((ended - started) * 1000, 3),
            },
        }
        generation.finish(done)
        await self._finish(generation, turn, remember, partial=reason == "cancelled")

    async def _stream_with_fallback(
        self, generation: Generation, request: ProviderRequest
    ) -> AsyncIterator[Chunk]:
        """Yield chunks from the first model that produces a token.

        Connect errors and retryable statuses are retried with backoff, then the fallback
        models are tried; once a token has been yielded, a failure propagates.
        """
        models = [request.model, *(m for m in self.fallback_models if m != request.model)]
        last_error: ProviderError | None = None
        for model in models:
            attempt_request = ProviderRequest(request.messages, model, request.options)
            for attempt in range(self.retry.attempts):
                produced = False
                try:
                    async for chunk in self.provider.stream(attempt_request):
                        if not produced:
                            produced = True
                            if model != generation.model:
                                generation.model = model
                        yield chunk
                    return
                except ProviderError as exc:
                    if produced:
                        raise
                    last_error = exc
                    log.info(
                        "upstream attempt failed",
                        extra={"request_id": generation.id, "model": model, "attempt": attempt + 1,
                               "error": exc.message},
                    )
                    if not exc.retryable:
                        break
                    if attempt + 1 < self.retry.attempts:
                        await asyncio.sleep(self.retry.delay(attempt))
        assert last_error is not None
        raise last_error

    async def _finish(self, generation: Generation, turn: Turn, remember: bool, *, partial: bool) -> None:
        try:
            if remember and not generation.forgotten:
                await self._remember(generation, turn, partial=partial)
        except Exception:
            log.exception("could not store the answer", extra={"request_id": generation.id})
        finally:
            self._streams.release(generation.limit_key)
            self._by_conversation.pop(generation.conversation_id, None)
            loop = asyncio.get_running_loop()
            loop.call_later(self.keep_finished_s, self._generations.pop, generation.id, None)

    async def _remember(self, generation: Generation, turn: Turn, *, partial: bool) -> None:
        now = time.time()
        text = generation.text
        if generation.tokens == 0 and generation.log[-1]["type"] == "error":
            return  # nothing was answered; the client will send the message again
        messages = [StoredMessage("user", turn.message, created_at=now)]
        if text or not partial:
            messages.append(StoredMessage("assistant", text, partial=partial, created_at=now))
        await self.store.append(
            generation.conversation_id, messages, owner=turn.owner, agent=generation.agent
        )
