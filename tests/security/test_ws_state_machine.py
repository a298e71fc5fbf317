"""The native /ws protocol as a Hypothesis state machine, against a real gateway and the
fake upstream: two clients send valid and malformed frames, cancel, resume, clear, drop
their socket and reconnect, while the upstream fails now and then.

Every rule ends with a JSON ``ping``: refusals are written while their frame is handled,
so any refusal a frame earns arrives before the ``pong`` of the ping sent after it. That
makes each rule's outcome (accepted or refused, and with which code) exact, while the
answers it started go on streaming and are checked as they arrive:

- each connection keeps answering ``ping``, and a new connection can always be opened;
- every accepted turn gets its ``start``, and every following of a generation (its own
  connection, or one that resumed it) ends with exactly one ``done`` or ``error``;
- deltas' ``seq`` rise by one per generation per following connection, from 1 or from
  the ``after`` of a resume;
- a turn sent to a conversation whose every answer has ended is accepted (``busy`` only
  while one may be running); cancel and resume find exactly the ids the protocol says
  (the socket's own, server-made ones, dropped sockets' running ones), else ``not_found``;
  malformed frames get one ``error`` with the documented code and ``id``;
- after a reconnect, every answer the dropped socket was following is resumed; only an
  answer with a client-chosen id that ended before the server saw the drop may be
  ``not_found``, and then the gateway must hold it finished;
- at the end, every generation in the gateway has finished and the number of asyncio
  tasks on the gateway's loop is back to what it was before the first example.

The gateway runs in this process (``run_gateway``); its state is read on its own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)
from websockets.sync.client import ClientConnection, connect

from chatgate.config import Settings
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway, wait_until

SETTINGS = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    database=None,  # a real server's timing decides some outcomes: a saved run may not replay
    suppress_health_check=[HealthCheck.too_slow],
)
#: How long a pong, a start or the end of every answer may take.
SYNC_S = 10.0
END_S = 10.0
LEAK_S = 3.0
#: Codes with which a generation ends; every other error frame refuses a frame.
TERMINAL_CODES = frozenset({"provider_error", "provider_unavailable", "timeout", "internal"})
SERVER_ID = re.compile(r"[0-9a-f]{32}")
MESSAGE_LIMIT: int = Settings.model_fields["max_message_bytes"].default
_ids = itertools.count()
#: Picks one of a list whose length depends on what the server did: drawn the same way
#: whatever the list, so that Hypothesis can replay and shrink a run.
PICK = st.integers(0, 1_000)
MESSAGES = st.text(min_size=1, max_size=40).filter(str.strip)
MAX_TOKENS = st.sampled_from([None, None, None, 2, 5])
T = TypeVar("T")


@dataclass(eq=False)
class Turn:
    """One accepted chat frame, as this client knows it."""

    id: str | None  # None until the start of a chat without an id names it
    conversation: str | None
    server_id: bool
    home: Client | None  # the connection whose namespace holds a client-chosen id
    ended: bool = False  # a done or error was received for it somewhere
    lost: bool = False  # its socket dropped after it ended: nobody can see its end again


@dataclass(eq=False)
class Follow:
    """One connection following one generation: what it has of it so far."""

    turn: Turn
    last_seq: int
    text: str | None = ""  # the answer so far, when followed from its first delta


@dataclass(eq=False)
class Client:
    ws: ClientConnection
    follows: dict[str, Follow] = field(default_factory=dict)
    #: Chats sent (or accepted) whose start has not arrived, in the order they were sent.
    awaiting: deque[Turn] = field(default_factory=deque)
    #: Resumes sent whose outcome is not known yet: the turn and the ``after``.
    resuming: dict[str, tuple[Turn, int]] = field(default_factory=dict)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)
    pings: int = 0

    def send(self, frame: dict[str, Any] | str | bytes) -> None:
        self.ws.send(frame if isinstance(frame, str | bytes) else orjson.dumps(frame).decode())


def _invalid_frames() -> st.SearchStrategy[tuple[str | bytes, str, str | None]]:
    """A malformed frame, the code of its error and the id that error carries."""
    frame_id = st.one_of(st.none(), st.text(min_size=1, max_size=20))

    def with_id(frame: dict[str, Any], code: str = "bad_request") -> Callable[[str | None], tuple[str, str, str | None]]:
        def build(request_id: str | None) -> tuple[str, str, str | None]:
            full = {**frame, **({"id": request_id} if request_id is not None else {})}
            return orjson.dumps(full).decode(), code, request_id
        return build

    wrong_fields: list[dict[str, Any]] = [
        {"type": "chat", "message": 5},
        {"type": "chat", "message": ""},
        {"type": "chat", "message": "  \n"},
        {"type": "chat"},
        {"type": "chat", "message": "hi", "conversation_id": "no spaces"},
        {"type": "chat", "message": "hi", "conversation_id": "x" * 129},
        {"type": "chat", "message": "hi", "agent": ""},
        {"type": "chat", "message": "hi", "model": 7},
        {"type": "chat", "message": "hi", "options": "hot"},
        {"type": "chat", "message": "hi", "options": {"temperature": 7}},
        {"type": "chat", "message": "hi", "options": {"max_tokens": True}},
        {"type": "resume", "after": -1},
        {"type": "resume", "after": "3"},
        {"type": "resume", "after": 1.5},
        {"type": "clear_history"},
        {"type": "dance"},
        {"type": 5},
        {"type": ["chat"]},
        {"type": {"chat": 1}},
        {},
    ]
    no_id_needed: list[tuple[str | bytes, str, str | None]] = [
        ("not json", "bad_request", None),
        ('{"type": "chat", "message": "cut', "bad_request", None),
        ("[1, 2]", "bad_request", None),
        ("5", "bad_request", None),
        ("null", "bad_request", None),
        ('"ping"', "bad_request", None),
        ("[" * 5000 + "]" * 5000, "bad_request", None),
        (b"\xff\xfe not utf-8", "bad_request", None),
        ('{"type": "cancel"}', "bad_request", None),
        ('{"type": "cancel", "id": 5}', "bad_request", None),
        ('{"type": "resume", "id": ""}', "bad_request", ""),
        # The conversation id is checked past the decoding, where an id is not looked for.
        ('{"type": "clear_history", "conversation_id": "a/b"}', "bad_request", None),
        ('{"type": "chat", "message": "' + "x" * 30_000 + '", "id": "big"}', "too_large", None),
    ]
    return st.one_of(
        st.sampled_from(no_id_needed),
        st.sampled_from(wrong_fields).flatmap(lambda frame: frame_id.map(with_id(frame))),
        frame_id.map(with_id({"type": "chat", "message": "é" * (MESSAGE_LIMIT // 2 + 1)}, "too_large")),
        frame_id.map(with_id({"type": "chat", "message": "hi", "agent": "nobody"}, "not_found")),
    )


@dataclass
class Served:
    """The gateway under test and the event loop its thread runs, to look inside it there."""

    gw: RunningGateway
    loop: asyncio.AbstractEventLoop

    def on_loop(self, read: Callable[[], T]) -> T:
        """``read()`` called on the gateway's own loop, between two of its steps."""

        async def call() -> T:
            return read()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=5)

    def tasks(self) -> int:
        return self.on_loop(lambda: len(asyncio.all_tasks()))

    def sockets(self) -> int:
        return self.on_loop(lambda: int(self.gw.gateway.websockets_open))

    def finished(self, generation_id: str | None = None) -> bool:
        """Whether every generation (with that id) in the gateway has finished."""
        generations = self.on_loop(self.gw.gateway.service.generations)
        return all(g.finished for g in generations if generation_id in (None, g.id))


class NativeProtocol(RuleBasedStateMachine):
    def __init__(self, served: Served, fake: FakeLLM, baseline_tasks: int) -> None:
        super().__init__()
        self.served = served
        self.fake = fake
        self.baseline_tasks = baseline_tasks
        self.run = uuid.uuid4().hex[:6]
        self.conversations = [f"{self.run}-conv-{n}" for n in range(3)]
        self.sockets = contextlib.ExitStack()  # every client socket, closed at the end
        self.clients: list[Client] = []
        self.turns: list[Turn] = []
        self.tokens = 0
        self.faults = 0

    def open_client(self) -> Client:
        url = self.served.gw.ws_url + "/ws"
        ws = self.sockets.enter_context(connect(url, compression=None, proxy=None, max_queue=None, open_timeout=5))
        return Client(ws)

    # Reading: every frame a client receives goes through absorb --------------------------

    def absorb(self, client: Client, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "pong":
            assert frame == {"type": "pong"} and client.pings > 0, f"unasked pong: {frame}"
            client.pings -= 1
        elif kind == "start":
            self._started(client, frame)
        elif kind == "delta":
            follow = self._follow(client, frame["id"])
            assert frame["seq"] == follow.last_seq + 1, f"seq after {follow.last_seq}: {frame}"
            assert isinstance(frame["text"], str) and frame["text"], frame
            follow.last_seq = frame["seq"]
            if follow.text is not None:
                follow.text += frame["text"]
        elif kind == "done" or (
            kind == "error" and frame.get("code") in TERMINAL_CODES
            and (frame.get("id") in client.follows or frame.get("id") in client.resuming)
        ):
            self._ended(client, frame)
        elif kind == "error":
            assert isinstance(frame.get("message"), str) and isinstance(frame.get("retryable"), bool), frame
            if frame.get("id") in client.resuming:
                del client.resuming[frame["id"]]
            client.refusals.append(frame)
        elif kind == "history_cleared":
            client.cleared.append(frame["conversation_id"])
        else:
            raise AssertionError(f"unexpected frame {frame}")

    def _started(self, client: Client, frame: dict[str, Any]) -> None:
        generation_id = frame["id"]
        assert client.awaiting, f"a start nobody asked for: {frame}"
        turn = client.awaiting.popleft()
        if turn.id is None:
            assert SERVER_ID.fullmatch(generation_id), frame
            turn.id = generation_id
        assert generation_id == turn.id, f"start of {generation_id!r}, expected {turn.id!r}"
        assert generation_id not in client.follows, f"second start before the end: {frame}"
        if turn.conversation is None:
            turn.conversation = frame["conversation_id"]
        assert frame["conversation_id"] == turn.conversation, frame
        assert frame["model"] == "fake-model" and frame["agent"] == "general", frame
        client.follows[generation_id] = Follow(turn, last_seq=0)

    def _follow(self, client: Client, generation_id: str) -> Follow:
        """The following this event belongs to; the first event after a resume starts it."""
        if generation_id in client.resuming:
            turn, after = client.resuming.pop(generation_id)
            client.follows[generation_id] = Follow(turn, last_seq=after, text="" if after == 0 else None)
        assert generation_id in client.follows, f"an event of {generation_id!r}, which this socket does not follow"
        return client.follows[generation_id]

    def _ended(self, client: Client, frame: dict[str, Any]) -> None:
        follow = self._follow(client, frame["id"])
        del client.follows[frame["id"]]
        follow.turn.ended = True
        if frame["type"] == "error":
            assert isinstance(frame["message"], str) and isinstance(frame["retryable"], bool), frame
        else:
            assert frame["finish_reason"] in ("stop", "length", "cancelled"), frame
        if follow.text is None:
            return
        if frame.get("finish_reason") in ("stop", "length"):
            assert follow.text == fake_reply(frame["usage"]["completion_tokens"]), frame
        else:  # cut short: what came is the start of the fake's answer
            assert fake_reply(self.tokens).startswith(follow.text), frame

    def read(self, client: Client, until: Callable[[], bool], what: str, within_s: float = SYNC_S) -> None:
        deadline = time.monotonic() + within_s
        while not until():
            left = deadline - time.monotonic()
            try:
                raw = client.ws.recv(timeout=max(left, 0.001))
            except TimeoutError:
                raise AssertionError(f"no {what} within {within_s} s") from None
            assert isinstance(raw, str), raw
            self.absorb(client, orjson.loads(raw))

    def sync(self, client: Client) -> list[dict[str, Any]]:
        """Ping and read up to the pong; the refusals the frames sent before earned."""
        client.pings += 1
        client.send({"type": "ping"})
        self.read(client, lambda: client.pings == 0, "pong")
        for generation_id, (turn, after) in client.resuming.items():  # accepted: no refusal came
            client.follows[generation_id] = Follow(turn, last_seq=after, text="" if after == 0 else None)
        client.resuming.clear()
        refusals, client.refusals = client.refusals, []
        return refusals

    def settle(self, client: Client) -> None:
        """Read until every accepted chat's start has arrived."""
        self.read(client, lambda: not client.awaiting, "start")

    # What the client may expect ----------------------------------------------------------

    def maybe_busy(self, conversation: str | None) -> bool:
        return conversation is not None and any(
            not turn.ended and not turn.lost for turn in self.turns if turn.conversation == conversation
        )

    def findable(self, client: Client, turn: Turn) -> bool:
        """Whether cancel or resume of ``turn``'s id finds it from ``client``."""
        if turn.lost:
            return False
        return turn.server_id or turn.home is client

    def known(self) -> list[Turn]:
        latest = {turn.id: turn for turn in self.turns if turn.id is not None}
        return list(latest.values())

    # Rules -------------------------------------------------------------------------------

    @initialize(tokens=st.integers(1, 60), tps=st.sampled_from([0, 50, 400]))
    def start(self, tokens: int, tps: int) -> None:
        self.fake.reset()
        self.fake.configure(tokens=tokens, tps=tps)
        self.tokens = tokens
        self.clients = [self.open_client(), self.open_client()]

    @rule(slot=st.integers(0, 1), conversation=st.integers(0, 2), own_id=st.booleans(), message=MESSAGES,
          max_tokens=MAX_TOKENS)
    def chat_in_a_shared_conversation(
        self, slot: int, conversation: int, own_id: bool, message: str, max_tokens: int | None
    ) -> None:
        self.chat(self.clients[slot], self.conversations[conversation], own_id, message, max_tokens)

    @rule(slot=st.integers(0, 1), own_id=st.booleans(), message=MESSAGES, max_tokens=MAX_TOKENS)
    def chat_in_a_new_conversation(self, slot: int, own_id: bool, message: str, max_tokens: int | None) -> None:
        self.chat(self.clients[slot], None, own_id, message, max_tokens)

    def chat(
        self, client: Client, conversation_id: str | None, own_id: bool, message: str, max_tokens: int | None
    ) -> None:
        request_id = f"{self.run}-{next(_ids)}" if own_id else None
        frame: dict[str, Any] = {"type": "chat", "message": message}
        if request_id is not None:
            frame["id"] = request_id
        if conversation_id is not None:
            frame["conversation_id"] = conversation_id
        if max_tokens is not None:
            frame["options"] = {"max_tokens": max_tokens}
        turn = Turn(request_id, conversation_id, server_id=not own_id, home=client)
        busy = self.maybe_busy(conversation_id)
        client.awaiting.append(turn)
        client.send(frame)
        refusals = self.sync(client)
        if not refusals:
            self.turns.append(turn)
            return
        assert turn in client.awaiting, f"a refused chat started: {refusals}"
        client.awaiting.remove(turn)
        assert len(refusals) == 1 and busy, f"refused {frame} ({refusals}); a turn might run: {busy}"
        assert refusals[0]["code"] == "busy" and refusals[0].get("id") == request_id, refusals

    @rule(slot=st.integers(0, 1), pick=PICK)
    def chat_with_a_running_id(self, slot: int, pick: int) -> None:
        """Reuse the id of an answer this socket is following: refused while it runs."""
        client = self.clients[slot]
        running = sorted(i for i, follow in client.follows.items() if not follow.turn.server_id)
        if not running:
            assert self.sync(client) == []
            return
        request_id = running[pick % len(running)]
        turn = Turn(request_id, None, server_id=False, home=client)
        client.awaiting.append(turn)
        client.send({"type": "chat", "id": request_id, "message": "again"})
        refusals = self.sync(client)
        if not refusals:
            self.turns.append(turn)
            return
        assert turn in client.awaiting, f"a refused chat started: {refusals}"
        client.awaiting.remove(turn)
        assert [(r["code"], r.get("id")) for r in refusals] == [("bad_request", request_id)], refusals

    @rule(slot=st.integers(0, 1), invalid=_invalid_frames())
    def malformed(self, slot: int, invalid: tuple[str | bytes, str, str | None]) -> None:
        raw, code, request_id = invalid
        client = self.clients[slot]
        client.send(raw)
        refusals = self.sync(client)
        assert len(refusals) == 1, (raw[:200], refusals)
        assert refusals[0]["code"] == code and refusals[0].get("id") == request_id, (raw[:200], refusals)
        assert refusals[0]["retryable"] is False, refusals

    def target(self, known: list[Turn], pick: int | None) -> tuple[Turn | None, str]:
        """A known turn (``pick`` of them, when there are any) or an id nobody used."""
        if pick is None or not known:
            return None, f"unknown-{next(_ids)}"
        turn = known[pick % len(known)]
        assert turn.id is not None
        return turn, turn.id

    @rule(slot=st.integers(0, 1), pick=st.one_of(st.none(), PICK))
    def cancel(self, slot: int, pick: int | None) -> None:
        client = self.clients[slot]
        turn, generation_id = self.target(self.known(), pick)
        client.send({"type": "cancel", "id": generation_id})
        refusals = self.sync(client)
        found = turn is not None and self.findable(client, turn)
        expected = [] if found else [("not_found", generation_id)]
        assert [(r["code"], r.get("id")) for r in refusals] == expected, (turn, refusals)

    @rule(slot=st.integers(0, 1), pick=st.one_of(st.none(), PICK), after=st.integers(0, 40))
    def resume(self, slot: int, pick: int | None, after: int) -> None:
        client = self.clients[slot]
        # Not what it follows already (that replays it, from a point the client cannot
        # tell apart), nor what it has not seen the start of yet.
        known = [t for t in self.known() if t.id not in client.follows and t not in client.awaiting]
        turn, generation_id = self.target(known, pick)
        found = turn is not None and self.findable(client, turn)
        if turn is not None:
            client.resuming[generation_id] = (turn, after)
        client.send({"type": "resume", "id": generation_id, "after": after})
        refusals = self.sync(client)
        expected = [] if found else [("not_found", generation_id)]
        assert [(r["code"], r.get("id")) for r in refusals] == expected, (turn, refusals)

    @rule(slot=st.integers(0, 1), conversation=st.integers(0, 2))
    def clear_history(self, slot: int, conversation: int) -> None:
        client = self.clients[slot]
        client.send({"type": "clear_history", "conversation_id": self.conversations[conversation]})
        assert self.sync(client) == []
        assert client.cleared == [self.conversations[conversation]]
        client.cleared.clear()

    @rule(slot=st.integers(0, 1))
    def ping(self, slot: int) -> None:
        assert self.sync(self.clients[slot]) == []

    @rule(slot=st.integers(0, 1), afters=st.lists(st.one_of(st.none(), st.integers(0, 40)), min_size=4, max_size=4))
    def reconnect(self, slot: int, afters: list[int | None]) -> None:
        """Drop the socket; from a new one, resume what it was following, after the last
        delta it had (``None``) or after any other seq."""
        old = self.clients[slot]
        self.settle(old)
        running = list(old.follows.items())
        sockets = self.served.sockets()
        old.ws.close()
        # Resuming a client-chosen id needs the server to have seen the socket go.
        wait_until(lambda: self.served.sockets() == sockets - 1, timeout=5, what="the server to see the drop")
        new = self.clients[slot] = self.open_client()
        for n, (generation_id, follow) in enumerate(running):
            after = afters[n % len(afters)]
            after = follow.last_seq if after is None else after
            new.resuming[generation_id] = (follow.turn, after)
            new.send({"type": "resume", "id": generation_id, "after": after})
        refusals = self.sync(new)
        turns = {generation_id: follow.turn for generation_id, follow in running}
        for refusal in refusals:
            turn = turns[refusal["id"]]
            # Only an answer that ended before its socket dropped is not kept for a resume
            # (a client-chosen id); a server-made id is always found.
            assert refusal["code"] == "not_found" and not turn.server_id, refusals
            assert self.served.finished(refusal["id"]), f"{refusal['id']!r} is running but cannot be resumed"
            turn.lost = True
        for _, follow in running:
            if not follow.turn.lost and follow.turn.home is old:
                follow.turn.home = new

    @precondition(lambda self: self.faults < 3)
    @rule(kind=st.sampled_from(["http_500", "drop", "error_line", "hang"]), after=st.integers(0, 10),
          times=st.integers(1, 3))
    def upstream_fault(self, kind: str, after: int, times: int) -> None:
        times = 1 if kind == "hang" else times
        self.fake.fault(kind, after=after, times=times)
        self.faults += 1

    # The end -----------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            for client in self.clients:
                # Cancelled, slow answers end now; the cancel finds them, as it finds
                # everything a socket follows.
                self.settle(client)
                for generation_id in list(client.follows):
                    client.send({"type": "cancel", "id": generation_id})
                assert self.sync(client) == []
                self.read(client, lambda c=client: not c.follows, "end of every answer", END_S)
            unfinished = [t for t in self.turns if not t.ended and not t.lost]
            assert not unfinished, f"accepted turns that never ended: {unfinished}"
            wait_until(self.served.finished, timeout=LEAK_S, what="every generation finished")
            fresh = self.open_client()
            self.clients.append(fresh)
            assert self.sync(fresh) == []
        finally:
            self.sockets.close()
        wait_until(lambda: self.served.sockets() == 0, timeout=LEAK_S, what="every socket closed")
        wait_until(
            lambda: self.served.tasks() <= self.baseline_tasks,
            timeout=LEAK_S, what=f"the gateway's tasks back to {self.baseline_tasks}",
        )


def _warm_up(gw: RunningGateway) -> Served:
    """One answer over /ws, so the provider's session is up; its task ran on the gateway's
    loop, which the checks then use."""
    with connect(gw.ws_url + "/ws", compression=None, proxy=None) as ws:
        ws.send(orjson.dumps({"type": "chat", "message": "warm up"}).decode())
        while orjson.loads(ws.recv(timeout=SYNC_S))["type"] != "done":
            pass
    task = gw.gateway.service.generations()[-1].task
    assert task is not None
    return Served(gw, task.get_loop())


def test_native_protocol_state_machine(start_gateway: Callable[..., Any], fake: FakeLLM) -> None:
    # A hung upstream is given up after 1 s, so a fault costs an example little time. The
    # upstream's circuit breaker is off: the faults of one example could open it and refuse
    # the turns of the next ones, which this model does not predict.
    breaker = {"breaker_failures": 0} if "breaker_failures" in Settings.model_fields else {}
    with start_gateway(request_timeout_s=1.0, **breaker) as gw:
        served = _warm_up(gw)
        wait_until(lambda: served.sockets() == 0, timeout=LEAK_S, what="the warm-up socket closed")
        time.sleep(0.2)
        baseline = served.tasks()
        run_state_machine_as_test(lambda: NativeProtocol(served, fake, baseline), settings=SETTINGS)
