"""ChatService: one turn from a user message to a stored answer.

load window → system + window + new message → stream (retry, then fallback models, only
before the first token) → native events in the generation's log → store the answer,
marked partial when it was cancelled or broke off.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

from chatgate.chat.agents import Agent, AgentRegistry, check_client_system
from chatgate.chat.breaker import CircuitBreaker, Trial
from chatgate.chat.events import ChatError, DoneEvent, ErrorEvent, error_event, provider_error_code
from chatgate.chat.generation import Generation
from chatgate.chat.lifecycle import GenerationObserver, Observers
from chatgate.chat.limits import ClientLimits, LocalLimits
from chatgate.chat.record import TurnRecord, turn_id
from chatgate.chat.sharing import SharedGenerations
from chatgate.providers.base import (
    Chunk,
    Embeddings,
    Provider,
    ProviderError,
    ProviderRequest,
    ProviderTimeout,
    Unsupported,
)
from chatgate.store.base import (
    Conversation,
    ConversationInfo,
    ConversationStore,
    StoredMessage,
    StoreUnavailable,
)
from chatgate.vocabulary import (
    FinishReason,
    GenerationOptions,
    Message,
    OutputFormat,
    ToolResult,
    Tools,
    Usage,
    tool_messages,
)

log = logging.getLogger("chatgate.chat")
#: Conversation ids travel in headers (X-Conversation-Id) and URL paths: URL-safe
#: characters only, so every id a client can use can also be read back at /conversations/{id}.
CONVERSATION_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")
CONVERSATION_ID_RULE = "conversation_id must be 1 to 128 of the characters A-Z a-z 0-9 . _ ~ -"
#: The namespace of generation ids the server made for anonymous callers: unguessable
#: uuids, findable from any connection (a reconnecting page resumes by them).
ANONYMOUS = "~"
#: Owners of anonymous browsers' own identities start with this (``api/auth.py``).
ANONYMOUS_IDENTITY = "anon-"


def conversation_key(owner: str | None, conversation_id: str) -> str:
    """Where a caller's conversation lives in the store: ids are scoped to their owner,
    so another key's equal id is a different conversation. Conversation ids never hold
    ``:``, so an owner's keys cannot meet an anonymous caller's."""
    return conversation_id if owner is None else f"{owner}:{conversation_id}"


@dataclass(slots=True)
class Turn:
    """One turn: a user's ``message``, or, continuing an answer that called tools, the
    tools' ``tool_results`` (``message`` then empty)."""

    message: str
    conversation_id: str | None = None
    agent: str | None = None
    model: str | None = None
    options: GenerationOptions | None = None
    owner: str | None = None
    #: The peer address; limits apply to it when the caller is anonymous.
    client: str | None = None
    #: The generation id the client (or its dialect) chose; the server makes one if absent.
    request_id: str | None = None
    #: An anonymous caller's own namespace for the ids it chooses (one per connection).
    scope: str | None = None
    #: The client's own history for this turn (stateless APIs); replaces the stored window.
    history: list[Message] | None = None
    #: Read and write server memory for this turn.
    remember: bool = True
    apply_agent_prompt: bool = True
    #: Start the conversation afresh when it has been idle for longer than this (seconds).
    idle_reset_s: float | None = None
    tool_results: list[ToolResult] | None = None
    #: The tools the model may call in this turn, and the format its answer must take.
    tools: Tools | None = None
    output: OutputFormat | None = None

    def input(self) -> StoredMessage:
        """What the turn adds to the conversation before its answer, as stored."""
        now = time.time()
        if self.tool_results:
            return StoredMessage("tool", "", created_at=now, tool_results=tuple(self.tool_results))
        return StoredMessage("user", self.message, created_at=now)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_backoff_s, self.backoff_s * 2**attempt))


class _Answer:
    """What one generation's answer has come to so far, given it chunk by chunk by
    :meth:`take`: from the generation's task, or, once the answer is flowing, from the
    upstream connection's callback (:class:`PushedChunks`), so one token costs no task switch."""

    __slots__ = (
        "clock", "cut", "first_token_at", "generation", "observers", "reason", "record",
        "single_call", "started", "token_cap", "trial", "usage", "wants_tokens",
    )

    def __init__(
        self,
        generation: Generation,
        record: TurnRecord | None,
        observers: Observers,
        trial: Trial,
        clock: Callable[[], float],
        token_cap: int,
        *,
        single_call: bool,
    ) -> None:
        self.generation = generation
        self.record = record
        self.observers = observers
        self.trial = trial
        self.clock = clock
        self.token_cap = token_cap  # 0 never equals a count, which starts at 1
        self.single_call = single_call
        self.wants_tokens = observers.wants_tokens  # decided once: no per-token cost without them
        self.started = clock()
        self.first_token_at: float | None = None
        self.usage: Usage | None = None
        self.reason: FinishReason = "stop"
        #: Which cap ended the answer.
        self.cut: str | None = None

    def take(self, chunk: Chunk) -> bool:
        """Log ``chunk``; ``True`` when the answer must end here (the token cap)."""
        generation = self.generation
        if chunk.tool_calls:
            if self.first_token_at is None:
                self._first_token()
            for piece in chunk.tool_calls:
                if piece.index == 0 or not self.single_call:
                    generation.emit_tool_call(piece)
        if chunk.text:
            if self.first_token_at is None:
                self._first_token()
            generation.emit_delta(chunk.text)
            if self.record is not None:
                self.record.progress()
            if self.wants_tokens:
                self.observers.token(generation, chunk.text)
            if generation.tokens == self.token_cap:
                self.reason, self.cut = "length", "CHATGATE_MAX_ANSWER_TOKENS"
                return True
        if chunk.finish_reason is not None:
            self.reason = chunk.finish_reason
            self.usage = chunk.usage
        return False

    def done(self, ended: float) -> DoneEvent:
        """The answer's ``done`` event, as of ``ended``."""
        generation, usage, reason = self.generation, self.usage, self.reason
        completion = usage.completion_tokens if usage and usage.completion_tokens else generation.tokens
        if generation.tool_calls and reason == "stop":
            reason = "tool_calls"  # some upstreams (Ollama) end a call with "stop"
        first = self.first_token_at
        done: DoneEvent = {
            "type": "done",
            "id": generation.id,
            "finish_reason": reason,
            "usage": {"prompt_tokens": usage.prompt_tokens if usage else 0, "completion_tokens": completion},
            "timings": {
                "ttft_ms": round((first - self.started) * 1000, 3) if first else None,
                "total_ms": round((ended - self.started) * 1000, 3),
            },
        }
        if generation.tool_calls:
            done["tool_calls"] = generation.tool_calls
        return done

    def _first_token(self) -> None:
        self.first_token_at = self.clock()
        self.observers.first_token(self.generation, self.first_token_at - self.started)
        self.trial.answered()


def build_messages(
    agent: Agent | None, history: list[Message], message: str, tool_results: list[ToolResult] | None = None
) -> list[Message]:
    messages: list[Message] = []
    if agent is not None:
        messages.append({"role": "system", "content": agent.system_prompt})
    messages.extend(history)
    if tool_results:
        messages.extend(tool_messages(tool_results))
    else:
        messages.append({"role": "user", "content": message})
    return messages


class ChatService:
    """Starts turns and owns the generations running in this process.

    Every path that reads, writes, clears, resumes or cancels a conversation or a
    generation comes through here with the caller's owner, and a conversation or
    generation of another owner is answered exactly as one that does not exist.
    """

    def __init__(
        self,
        provider: Provider,
        store: ConversationStore,
        agents: AgentRegistry,
        *,
        memory_enabled: bool = True,
        max_turns: int = 20,
        fallback_models: list[str] | None = None,
        checkpoint_s: float = 1.0,
        retry: RetryPolicy | None = None,
        keep_finished_s: float = 30.0,
        limits: ClientLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        observers: Sequence[GenerationObserver] = (),
        shared: SharedGenerations | None = None,
        max_answer_tokens: int = 0,
        max_answer_s: float = 0.0,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.provider = provider
        self.store = store
        self.agents = agents
        self.memory_enabled = memory_enabled
        self.max_turns = max_turns
        self.fallback_models = fallback_models or []
        #: How often the answer so far is written while it streams.
        self.checkpoint_s = checkpoint_s
        self.retry = retry or RetryPolicy()
        self.keep_finished_s = keep_finished_s
        #: Every answer ends (``length``) at this many tokens, and after this many seconds (0: no cap).
        self.max_answer_tokens = max_answer_tokens
        self.max_answer_s = max_answer_s
        #: Refuses new turns while the upstream is failing; off (never opens) by default.
        self.breaker = breaker or CircuitBreaker(0, 0.0)
        self._clock = clock
        self._wall_clock = wall_clock
        self._limits: ClientLimits = limits or LocalLimits()
        self._observers = Observers(observers)
        #: Where other instances follow this one's generations, and it theirs.
        self._shared = shared
        #: Running and recently finished generations by (namespace, id).
        self._generations: dict[tuple[str, str], Generation] = {}
        #: Anonymous generations with client-chosen ids whose socket dropped, by id.
        self._orphans: dict[str, Generation] = {}
        #: The running generation of each conversation, by conversation key.
        self._by_conversation: dict[str, Generation] = {}

    # Generations -----------------------------------------------------------------------

    def generations(self) -> list[Generation]:
        """Every running or recently finished generation of this process."""
        return list(self._generations.values())

    async def find(self, owner: str | None, generation_id: str, *, scope: str | None = None) -> Generation:
        """The caller's generation ``generation_id``; ``not_found`` for anyone else's.

        An anonymous caller finds what it started on this connection (``scope``), any
        generation whose id the server made, and generations with ids of its choosing
        that lost their socket (that is how it resumes after reconnecting). One that
        another instance runs is found as a replica of it, when instances share."""
        found = self._find_here(owner, generation_id, scope)
        if found is None and self._shared is not None:
            with _store_reachable():
                found = await self._shared.find(
                    _namespaces(owner, scope), generation_id, offered=owner is None
                )
        if found is None:
            with _store_reachable():
                for namespace in _namespaces(owner, scope):
                    if await self.store.interrupted(turn_id(namespace, generation_id)) is not None:
                        raise ChatError(
                            "internal",
                            "this answer was interrupted: the gateway running it stopped; the partial "
                            "answer is kept in the conversation; send the message again",
                            retryable=True,
                        )
            raise ChatError("not_found", f"no generation {generation_id!r}")
        return found

    def _find_here(self, owner: str | None, generation_id: str, scope: str | None) -> Generation | None:
        if owner is not None:
            found = self._generations.get((owner, generation_id))
        else:
            found = (
                (self._generations.get((_scoped(scope), generation_id)) if scope else None)
                or self._generations.get((ANONYMOUS, generation_id))
                or self._orphans.get(generation_id)
            )
        return found

    def orphan(self, generation: Generation, grace_s: float) -> None:
        """Its socket dropped: keep generating for ``grace_s`` so it can be resumed."""
        if generation.finished:
            return
        if generation.replica:
            if self._shared is not None:
                self._shared.orphan(generation, grace_s)
            return
        self.adopt(generation)
        if generation.owner is None and generation.namespace != ANONYMOUS:
            self._orphans[generation.id] = generation
            if self._shared is not None:
                self._shared.offer(generation, grace_s)
        loop = asyncio.get_running_loop()
        generation.orphan_timer = loop.call_later(grace_s, generation.cancel)

    def adopt(self, generation: Generation, scope: str | None = None) -> None:
        """A socket follows ``generation`` again; an anonymous caller's client-chosen id
        moves into that socket's namespace."""
        if generation.replica:
            if self._shared is not None:
                self._shared.adopt(generation)
            return
        if generation.orphan_timer is not None:
            generation.orphan_timer.cancel()
            generation.orphan_timer = None
        if self._orphans.get(generation.id) is generation:
            del self._orphans[generation.id]
            if self._shared is not None:
                self._shared.withdraw(generation)
            if scope is not None:
                self._rekey(generation, _scoped(scope))

    # What other instances ask of this one's generations (GenerationControl).

    def cancel_local(self, namespace: str, generation_id: str) -> None:
        found = self._generations.get((namespace, generation_id))
        if found is not None:
            found.cancel()

    def orphan_local(self, namespace: str, generation_id: str, grace_s: float) -> None:
        found = self._generations.get((namespace, generation_id))
        if found is not None:
            self.orphan(found, grace_s)

    def adopt_local(self, namespace: str, generation_id: str) -> None:
        found = self._generations.get((namespace, generation_id))
        if found is not None:
            self.adopt(found)

    def _rekey(self, generation: Generation, namespace: str) -> None:
        if self._generations.get((generation.namespace, generation.id)) is generation:
            del self._generations[(generation.namespace, generation.id)]
        generation.namespace = namespace
        self._generations[(namespace, generation.id)] = generation

    def _forget(self, generation: Generation) -> None:
        if self._generations.get((generation.namespace, generation.id)) is generation:
            del self._generations[(generation.namespace, generation.id)]
        if self._orphans.get(generation.id) is generation:
            del self._orphans[generation.id]

    # Turns -----------------------------------------------------------------------------

    async def embed(
        self,
        model: str | None,
        inputs: list[str],
        *,
        dimensions: int | None = None,
        owner: str | None = None,
        client: str | None = None,
    ) -> Embeddings:
        """The upstream's embeddings of ``inputs``: counted against the caller's request
        rate like a turn (not against its concurrent replies: nothing streams), and told
        to the observers. No retry or fallback model: another model's vectors are not
        interchangeable with the ones asked for."""
        await self._limits.admit(_limit_key(Turn("", owner=owner, client=client)))
        try:
            embeddings = await self.provider.embed(model or "", inputs, dimensions)
        except ProviderError as exc:
            code = provider_error_code(exc)
            self._observers.embedded(code)
            raise ChatError(code, exc.message, retryable=exc.retryable) from exc
        self._observers.embedded("ok")
        return embeddings

    async def start(self, turn: Turn, *, wait: bool = False) -> Generation:
        """Validate the turn, load its history and start generating; the returned
        generation's log already holds the ``start`` event.

        A conversation answers one turn at a time: while one runs, another turn is
        refused as ``busy``, or with ``wait`` waits for it to end (the seed dialects,
        whose clients sent their next message whenever they liked)."""
        accepted_at = self._clock()
        agent = self.agents.get(turn.agent)
        if turn.apply_agent_prompt and turn.history:
            check_client_system(agent, turn.history)
        limit_key = _limit_key(turn)
        await self._limits.admit(limit_key)
        conversation_id = turn.conversation_id or uuid.uuid4().hex
        if not CONVERSATION_ID.fullmatch(conversation_id):
            raise ChatError("bad_request", CONVERSATION_ID_RULE)
        key = conversation_key(turn.owner, conversation_id)
        if turn.request_id is None:
            generation_id, namespace = uuid.uuid4().hex, turn.owner or ANONYMOUS
        else:
            generation_id = turn.request_id
            namespace = turn.owner or (_scoped(turn.scope) if turn.scope else ANONYMOUS)
        remember = self.memory_enabled and turn.remember
        while True:
            await self._wait_for_conversation(key, wait=wait)
            self._refuse_running_id(namespace, generation_id)
            with _store_reachable():
                history = await self._history(turn, key, remember)
            if key not in self._by_conversation:  # nobody started one while we read
                break
        self._refuse_running_id(namespace, generation_id)
        model = turn.model or agent.model or self.provider.default_model
        options = self._capped(agent.options.merged(turn.options))
        request = ProviderRequest(
            build_messages(agent if turn.apply_agent_prompt else None, history, turn.message, turn.tool_results),
            model,
            options,
            tools=turn.tools,
            output=turn.output,
        )
        generation = Generation(
            id=generation_id,
            conversation_id=conversation_id,
            agent=agent.name,
            model=model,
            owner=turn.owner,
            namespace=namespace,
            conversation_key=key,
            accepted_at=accepted_at,
        )
        await self._limits.open_stream(limit_key)
        try:  # that may have asked another server: a turn may have begun meanwhile
            self._refuse_running_id(namespace, generation_id)
            await self._wait_for_conversation(key, wait=False)
            trial = self.breaker.admit()  # last: a turn refused after it would hold the probe
        except ChatError:
            self._limits.close_stream(limit_key)
            raise
        generation.limit_key = limit_key
        generation.emit(generation.start_event())
        self._generations[(namespace, generation_id)] = generation
        self._by_conversation[key] = generation
        self._observers.started(generation)
        context = self._observers.task_context(generation, request) if self._observers.provides_context else None
        generation.task = asyncio.create_task(
            self._run(generation, request, turn, remember, trial), name=f"generation-{generation.id}", context=context
        )
        if self._shared is not None:
            self._shared.publish(generation)
        return generation

    def _capped(self, options: GenerationOptions) -> GenerationOptions:
        """A ``max_tokens`` over the answer cap is sent upstream as the cap. None stays
        unset: the upstream's own default applies, and the count in :meth:`_run` stops it."""
        cap = self.max_answer_tokens
        if cap and options.max_tokens is not None and options.max_tokens > cap:
            return dataclasses.replace(options, max_tokens=cap)
        return options

    async def _wait_for_conversation(self, key: str, *, wait: bool) -> None:
        while (running := self._by_conversation.get(key)) is not None:
            if not wait:
                raise ChatError(
                    "busy", "a generation is already running in this conversation", retryable=True
                )
            if running.orphan_timer is not None:
                # Nobody follows it (its socket dropped) and this client moved on: stop it
                # now rather than at the end of the resume grace; its partial answer is kept.
                running.cancel()
            await running.wait_finished()

    def _refuse_running_id(self, namespace: str, generation_id: str) -> None:
        running = self._generations.get((namespace, generation_id))
        if running is not None and not running.finished:
            raise ChatError("bad_request", f"a generation with id {generation_id!r} is already running")

    async def _history(self, turn: Turn, key: str, remember: bool) -> list[Message]:
        if turn.history is not None:
            return turn.history  # the client's own conversation (stateless APIs)
        if not remember:
            return []
        if turn.idle_reset_s is not None:
            info = await self.store.info(key)
            if info is not None and self._wall_clock() - info.updated_at > turn.idle_reset_s:
                await self.store.clear(key)
                return []
        window = await self.store.window(key, self.max_turns)
        return [message for stored in _whole_calls(window) for message in stored.as_prompt()]

    # Conversations ---------------------------------------------------------------------

    async def conversations(self, owner: str | None, *, limit: int = 100) -> list[ConversationInfo]:
        with _store_reachable():
            infos = await self.store.list(owner, limit=limit)
        return [_as_seen_by(owner, info) for info in infos]

    async def conversation(self, owner: str | None, conversation_id: str) -> Conversation:
        found = None
        if CONVERSATION_ID.fullmatch(conversation_id):
            with _store_reachable():
                found = await self.store.get(conversation_key(owner, conversation_id))
        if found is None or found.info.owner != owner:
            raise _no_conversation(conversation_id)
        return Conversation(_as_seen_by(owner, found.info), found.messages)

    async def branch(
        self,
        owner: str | None,
        source_id: str | None,
        conversation_id: str,
        *,
        extra: Sequence[StoredMessage] = (),
        agent: str = "general",
    ) -> list[StoredMessage]:
        """Start conversation ``conversation_id`` as a copy of the caller's ``source_id``
        (None: of nothing) followed by ``extra``, and return its messages: a conversation
        continued from any earlier point (the Responses API's ``previous_response_id``)
        leaves the one it came from as it was. ``not_found`` for another owner's source."""
        messages: list[StoredMessage] = []
        if source_id is not None:
            messages = list((await self.conversation(owner, source_id)).messages)
        messages.extend(extra)
        if messages:
            with _store_reachable():
                await self.store.append(conversation_key(owner, conversation_id), messages, owner=owner, agent=agent)
        return messages

    async def clear_history(self, owner: str | None, conversation_id: str) -> None:
        """Forget the conversation's messages; clearing one that does not exist (or is
        another owner's) is not an error, as for a conversation never written."""
        if not CONVERSATION_ID.fullmatch(conversation_id):
            raise ChatError("bad_request", CONVERSATION_ID_RULE)
        key = conversation_key(owner, conversation_id)
        self._stop_remembering(key)  # the key is the caller's own: a running reply is theirs
        with _store_reachable():
            info = await self.store.info(key)
            if info is not None and info.owner == owner:
                await self.store.clear(key)

    async def delete(self, owner: str | None, conversation_id: str) -> None:
        key = conversation_key(owner, conversation_id)
        with _store_reachable():
            info = await self.store.info(key) if CONVERSATION_ID.fullmatch(conversation_id) else None
            if info is None or info.owner != owner:
                raise _no_conversation(conversation_id)
            self._stop_remembering(key)
            await self.store.delete(key)

    def _stop_remembering(self, key: str) -> None:
        """A running reply must not write back into history the user just erased."""
        active = self._by_conversation.get(key)
        if active is not None:
            active.forgotten = True
            active.cancel()

    async def aclose(self) -> None:
        tasks = [g.task for g in self._generations.values() if g.task and not g.task.done()]
        for generation in list(self._generations.values()):
            generation.stopping = True
            generation.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # One generation --------------------------------------------------------------------

    async def _run(
        self, generation: Generation, request: ProviderRequest, turn: Turn, remember: bool, trial: Trial
    ) -> None:
        """Stream the answer, store the turn, and only then log ``done`` or ``error``: a
        client that has seen the end may send its next turn at once, and that turn finds
        the conversation free and this one in its history.

        The answer caps end it with ``length`` and close the upstream request: the token
        cap by one compare per token, the time cap by a timer on the loop."""
        generation.running = True
        if generation.cancel_requested:  # cancelled before this task took a step
            trial.abandoned()
            self._release(generation)
            stopped = _shutting_down(generation) if generation.stopping else _cancelled_at_once(generation)
            self._conclude(generation, stopped, None)
            return
        record = None
        if remember and not generation.forgotten:
            record = TurnRecord(
                self.store, generation, owner=turn.owner, interval_s=self.checkpoint_s, clock=self._clock
            )
            record.begin(turn.input())
        answer = _Answer(
            generation, record, self._observers, trial, self._clock, self.max_answer_tokens,
            # parallel_tool_calls=false, kept here for upstreams that have no such switch
            # (Ollama, Gemini): an answer's calls after its first are not passed on.
            single_call=request.tools is not None and request.tools.parallel is False,
        )
        end: ErrorEvent
        deadline = asyncio.timeout(self.max_answer_s or None)
        try:
            try:
                async with deadline:
                    first, chunks = await self._first_chunk(generation, request, trial.probe)
                    try:
                        if first is not None and not answer.take(first):
                            pump = getattr(chunks, "pump", None)  # PushedChunks (isinstance costs microseconds)
                            if pump is not None:
                                # A loop turn first: the first token goes out to the client
                                # before the rest of a burst is pushed into the log, and what
                                # arrived meanwhile is taken in one piece (TTFT at 1 client
                                # 0.1 ms lower against a fast upstream).
                                await asyncio.sleep(0)
                                await pump(answer.take)
                            else:
                                async for chunk in chunks:
                                    if answer.take(chunk):
                                        break
                    finally:
                        await _close(chunks)
            except TimeoutError:
                if not deadline.expired():
                    raise
                if not generation.tokens:
                    raise ProviderTimeout(
                        f"no answer within the gateway's time cap of {self.max_answer_s:g} s "
                        "(CHATGATE_MAX_ANSWER_S)", retryable=True,
                    ) from None
                answer.reason, answer.cut = "length", "CHATGATE_MAX_ANSWER_S"
            trial.answered()
        except asyncio.CancelledError as exc:
            trial.abandoned()
            answer.reason = "cancelled"
            if generation.stopping or not generation.cancel_requested:
                # Not a client's cancel: the process is stopping. Keep what was answered,
                # and end the followers' wait.
                self._release(generation)
                if record is not None:
                    await self._remember(generation, record, partial=True)
                self._conclude(generation, _shutting_down(generation), exc)
                raise
        except ProviderError as exc:
            trial.failed(exc)
            log.warning(
                "generation failed",
                extra={"request_id": generation.id, "conversation_id": generation.conversation_id,
                       "error": exc.message, "after_tokens": generation.tokens},
            )
            # After the first token the client may retry the whole turn; before it,
            # retryability is the upstream error's own.
            retryable = exc.retryable or generation.tokens > 0
            end = error_event(provider_error_code(exc), exc.message, id=generation.id, retryable=retryable)
            await self._end(generation, record, end, partial=True, exc=exc)
            return
        except Exception as exc:
            trial.abandoned()
            log.exception("generation crashed", extra={"request_id": generation.id})
            end = error_event("internal", f"internal error: {type(exc).__name__}", id=generation.id)
            await self._end(generation, record, end, partial=True, exc=exc)
            return
        if answer.cut is not None:
            log.info(
                "answer cut at the gateway's cap",
                extra={"request_id": generation.id, "cap": answer.cut, "after_tokens": generation.tokens},
            )
        done = answer.done(self._clock())
        await self._end(generation, record, done, partial=done["finish_reason"] == "cancelled" or answer.cut is not None)

    async def _first_chunk(
        self, generation: Generation, request: ProviderRequest, probe: bool = False
    ) -> tuple[Chunk | None, AsyncIterator[Chunk]]:
        """Open the answer on the first model that produces a chunk: that chunk, and the
        stream it came from, still open for the rest (``None`` and the stream when it ended
        without any).

        Connect errors and retryable statuses are retried with backoff, then the fallback
        models are tried; once a chunk has come, a failure is the answer's. The breaker's
        probe is one request: no retry, no fallback.
        """
        models = [request.model, *(m for m in self.fallback_models if m != request.model)]
        attempts = self.retry.attempts
        if probe:
            models, attempts = models[:1], 1
        last_error: ProviderError | None = None
        generation.upstream_at = self._clock()
        for tried, model in enumerate(models):
            if last_error is not None:
                self._observers.fell_back(generation, models[tried - 1], model, last_error)
            attempt_request = dataclasses.replace(request, model=model)
            for attempt in range(attempts):
                chunks = self.provider.stream(attempt_request)
                try:
                    first = await anext(chunks)
                except StopAsyncIteration:
                    return None, chunks
                except ProviderError as exc:
                    await _close(chunks)
                    if isinstance(exc, Unsupported):
                        raise
                    last_error = exc
                    log.info(
                        "upstream attempt failed",
                        extra={"request_id": generation.id, "model": model, "attempt": attempt + 1,
                               "error": exc.message},
                    )
                    if not exc.retryable:
                        break
                    if attempt + 1 < attempts:
                        self._observers.retried(generation, model, attempt + 1, exc)
                        await asyncio.sleep(self.retry.delay(attempt))
                    continue
                except BaseException:
                    await _close(chunks)
                    raise
                generation.first_chunk_at = self._clock()
                if model != generation.model:
                    generation.model = model
                return first, chunks
        assert last_error is not None
        raise last_error

    async def _end(
        self,
        generation: Generation,
        record: TurnRecord | None,
        end: DoneEvent | ErrorEvent,
        *,
        partial: bool,
        exc: BaseException | None = None,
    ) -> None:
        generation.ending = True  # a cancel from now on would cut the write, not the answer
        try:
            if record is not None:
                await self._remember(generation, record, partial=partial)
        finally:
            self._release(generation)
            self._conclude(generation, end, exc)

    def _conclude(self, generation: Generation, end: DoneEvent | ErrorEvent, exc: BaseException | None) -> None:
        """Tell the observers how the generation ended, then log its terminal event.

        The one place a generation ends, so its end hook fires exactly once. Observers go
        first: a client that has seen the end, and looks at the metrics, finds it counted."""
        self._observers.ended(generation, end, exc)
        generation.finish(end)

    def _release(self, generation: Generation) -> None:
        """Free the conversation for its next turn; keep the log a while for resumes."""
        if self._by_conversation.get(generation.conversation_key) is generation:
            del self._by_conversation[generation.conversation_key]
        self._limits.close_stream(generation.limit_key)
        if generation.orphan_timer is not None:
            generation.orphan_timer.cancel()
            generation.orphan_timer = None
        loop = asyncio.get_running_loop()
        loop.call_later(self.keep_finished_s, self._forget, generation)

    async def _remember(self, generation: Generation, record: TurnRecord, *, partial: bool) -> None:
        """End the turn's record: its answer, or, when nothing was answered (the upstream
        failed or the client cancelled before the first token), no turn at all: the client
        sends the message again. A conversation cleared or deleted meanwhile stays so."""
        answer = None
        if generation.tokens or not partial:
            answer = StoredMessage(
                "assistant", generation.text, partial=partial, created_at=time.time(),
                tool_calls=tuple(generation.tool_calls),
            )
        try:
            await record.end(answer)
        except Exception:
            log.exception("could not store the answer", extra={"request_id": generation.id})


def _whole_calls(window: list[StoredMessage]) -> list[StoredMessage]:
    """The window without tool results whose calls fell out of it: an upstream refuses a
    tool message that answers no call it can see."""
    start = 0
    while start < len(window) and window[start].role == "tool":
        start += 1
    return window[start:]


def _cancelled_at_once(generation: Generation) -> DoneEvent:
    """The end of a generation cancelled before it reached the upstream: nothing stored."""
    return {
        "type": "done",
        "id": generation.id,
        "finish_reason": "cancelled",
        "usage": {"prompt_tokens": 0, "completion_tokens": 0},
        "timings": {"ttft_ms": None, "total_ms": 0.0},
    }


def _shutting_down(generation: Generation) -> ErrorEvent:
    return error_event(
        "internal",
        "the gateway is shutting down before this answer ended; what was answered is kept; send the message again",
        id=generation.id,
        retryable=True,
    )


async def _close(chunks: AsyncIterator[Chunk]) -> None:
    """Close an adapter's stream, also one left before its end (an answer cap): that closes
    its upstream request at once, where an abandoned one would wait for the collector."""
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()


@contextlib.contextmanager
def _store_reachable() -> Iterator[None]:
    """A store that cannot be reached is a clear, retryable refusal of the request."""
    try:
        yield
    except StoreUnavailable as exc:
        raise ChatError(
            "internal", "the conversation store is not reachable; try again in a moment", retryable=True
        ) from exc


def _limit_key(turn: Turn) -> str:
    """Whom limits count for: a key's owner, else the client's address. A browser's
    anonymous identity (a cookie it can drop to get a new one) counts as its address."""
    if turn.owner is not None and not turn.owner.startswith(ANONYMOUS_IDENTITY):
        return turn.owner
    return turn.client or "anonymous"


def _scoped(scope: str | None) -> str:
    return f"{ANONYMOUS}{scope}"


def _namespaces(owner: str | None, scope: str | None) -> list[str]:
    """Where a caller's generation ids may live, in the order :meth:`ChatService.find`
    looks (then, for an anonymous caller, ids it chose on a socket that dropped)."""
    if owner is not None:
        return [owner]
    return [_scoped(scope), ANONYMOUS] if scope else [ANONYMOUS]


def _as_seen_by(owner: str | None, info: ConversationInfo) -> ConversationInfo:
    """The conversation as its owner names it (without the store key's owner prefix)."""
    prefix = f"{owner}:" if owner is not None else ""
    return dataclasses.replace(info, id=info.id.removeprefix(prefix))


def _no_conversation(conversation_id: str) -> ChatError:
    return ChatError("not_found", f"no conversation {conversation_id!r}")
