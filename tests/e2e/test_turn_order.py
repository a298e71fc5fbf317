"""Turns sent back to back: on every protocol and with either store, the next turn goes
out the moment the previous answer's end is seen, and it is answered — never refused as
busy — with the whole conversation so far as its history.

Each case runs 20 turns in one conversation while three other clients stream
continuously on ``/ws`` in conversations of their own. An answer's end is what the
client sees last: ``done`` (native, CS_Agent, workshop), ``completed`` (Monty),
``message_complete`` + ``typing_stop`` (sequential), the end of the HTTP body.

A server that sends that end before it has stored the turn and released the
conversation refuses the next turn as busy; the memory store hides it (it stores without
waiting), the SQLite store does not.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.sync.client import ClientConnection, connect

from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway, run_gateway, wait_until

Frame = dict[str, Any]

TURNS = 20
TOKENS = 5
ANSWER = fake_reply(TOKENS)
#: Bound on any single read: an answer of 5 instant tokens takes milliseconds.
RECV_S = 10.0
BACKGROUND_CLIENTS = 3
#: A background client moves to a new conversation after this many turns, so the
#: requests it sends (and the fake records) stay small.
BACKGROUND_TURNS_PER_CONVERSATION = 10


@dataclass
class Outcome:
    """One turn as the client saw it: the answer text, or what refused or broke it."""

    answer: str | None = None
    error: Any = None


def user(text: str) -> Frame:
    return {"role": "user", "content": text}


def assistant(text: str) -> Frame:
    return {"role": "assistant", "content": text}


# Clients ------------------------------------------------------------------------------


class Client(ABC):
    """One protocol's client, holding one conversation for the whole case."""

    def __init__(self, gw: RunningGateway, case: str) -> None:
        self.gw = gw
        self.case = case

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @abstractmethod
    def ask(self, text: str, turn: int) -> Outcome:
        """Send one turn and read its whole answer, up to and including its end."""


class WsClient(Client):
    path = "/ws"

    def __enter__(self) -> WsClient:
        self.stack = ExitStack()
        self.ws: ClientConnection = self.stack.enter_context(
            connect(self.gw.ws_url + self.url_path(), open_timeout=RECV_S)
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def url_path(self) -> str:
        return self.path

    def send(self, frame: Frame) -> None:
        self.ws.send(orjson.dumps(frame).decode())

    def recv(self) -> Frame:
        frame: Frame = orjson.loads(self.ws.recv(timeout=RECV_S))
        return frame


class Native(WsClient):
    def ask(self, text: str, turn: int) -> Outcome:
        request_id = f"{self.case}-{turn}"
        self.send({"type": "chat", "id": request_id, "message": text, "conversation_id": self.case})
        deltas: list[str] = []
        while True:
            frame = self.recv()
            kind = frame.get("type")
            if kind == "error":
                return Outcome(error=frame)
            if frame.get("id") != request_id:
                return Outcome(error=("a frame of another request", frame))
            if kind == "delta":
                deltas.append(frame["text"])
            elif kind == "done":
                if frame.get("finish_reason") != "stop":
                    return Outcome(error=frame)
                return Outcome("".join(deltas))
            elif kind != "start":
                return Outcome(error=("unexpected frame", frame))


class Monty(WsClient):
    path = "/chat/ws"

    def ask(self, text: str, turn: int) -> Outcome:
        self.send({"message": text, "task_id": turn})
        contents: list[str] = []
        while True:
            frame = self.recv()
            if "event_type" not in frame:
                return Outcome(error=("not a Monty frame", frame))
            if frame["event_type"] == "error":
                return Outcome(error=frame)
            if frame.get("task_id") != turn:
                return Outcome(error=("a frame of another task", frame))
            if frame["event_type"] == "content":
                contents.append(frame["content"])
            elif frame["event_type"] == "completed":
                return Outcome("".join(contents))
            else:
                return Outcome(error=("unexpected frame", frame))


class MontyOnWsChat(Monty):
    path = "/ws/chat"


class CsAgent(WsClient):
    path = "/ws/chat"

    def ask(self, text: str, turn: int) -> Outcome:
        self.send({"messages": [user(text)]})
        deltas: list[str] = []
        while True:
            frame = self.recv()
            kind = frame.get("type")
            if kind == "error":
                return Outcome(error=frame)
            if kind == "delta":
                deltas.append(frame["text"])
            elif kind == "done":
                return Outcome("".join(deltas))
            else:
                return Outcome(error=("not a CS_Agent frame", frame))


class Sequential(WsClient):
    """The sequential-thinking frontend: its first frame is ``{"type": "message", ...}``."""

    path = "/ws/chat"

    def ask(self, text: str, turn: int) -> Outcome:
        self.send({"type": "message", "content": text})
        chunks: list[str] = []
        complete: Frame | None = None
        error: Frame | None = None
        while True:
            frame = self.recv()
            kind = frame.get("type")
            if kind is None:
                return Outcome(error=("not a sequential frame", frame))
            if kind == "error":
                error = frame
            elif kind == "message_chunk":
                chunks.append(frame["content"])
            elif kind == "message_complete":
                complete = frame
            elif kind == "typing_stop":
                break
        if error is not None:
            return Outcome(error=error)
        if complete is None:
            return Outcome(error="typing_stop without message_complete")
        if complete["content"] != "".join(chunks):
            return Outcome(error=("message_complete differs from the chunks", complete, chunks))
        return Outcome(complete["content"])


class SequentialDialectQuery(Sequential):
    path = "/ws?dialect=sequential"


class Workshop(WsClient):
    def url_path(self) -> str:
        return f"/ws/chat/{self.case}"

    def ask(self, text: str, turn: int) -> Outcome:
        self.send({"message": text, "agent": "default"})
        chunks: list[str] = []
        while True:
            frame = self.recv()
            kind = frame.get("type")
            if kind == "error":
                return Outcome(error=frame)
            if kind == "chunk":
                chunks.append(frame["content"])
            elif kind == "done":
                return Outcome("".join(chunks))
            else:
                return Outcome(error=("not a workshop frame", frame))


class HttpClient(Client):
    def __enter__(self) -> HttpClient:
        self.http = httpx.Client(base_url=self.gw.url, timeout=RECV_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()


class PiJson(HttpClient):
    """``POST /chat`` without streaming; the first reply names the conversation."""

    conversation_id: str | None = None

    def body(self, text: str) -> Frame:
        body: Frame = {"message": text}
        if self.conversation_id is not None:
            body["conversation_id"] = self.conversation_id
        return body

    def ask(self, text: str, turn: int) -> Outcome:
        response = self.http.post("/chat", json=self.body(text))
        if response.status_code != 200:
            return Outcome(error=(response.status_code, response.text))
        reply = response.json()
        self.conversation_id = self.conversation_id or reply["conversation_id"]
        return Outcome(reply["reply"])


class PiText(PiJson):
    """``POST /chat`` with ``stream: true``: the answer as text/plain; the conversation
    named in ``X-Conversation-Id``."""

    def ask(self, text: str, turn: int) -> Outcome:
        with self.http.stream("POST", "/chat", json={**self.body(text), "stream": True}) as response:
            body = response.read()
        if response.status_code != 200:
            return Outcome(error=(response.status_code, body.decode()))
        self.conversation_id = self.conversation_id or response.headers["x-conversation-id"]
        return Outcome(body.decode())


class PiSse(PiJson):
    """``POST /chat`` with ``Accept: text/event-stream``: the native events."""

    def ask(self, text: str, turn: int) -> Outcome:
        headers = {"Accept": "text/event-stream"}
        with self.http.stream("POST", "/chat", json=self.body(text), headers=headers) as response:
            body = response.read()
        if response.status_code != 200:
            return Outcome(error=(response.status_code, body.decode()))
        self.conversation_id = self.conversation_id or response.headers["x-conversation-id"]
        events = [
            orjson.loads(line[len("data: ") :])
            for line in body.decode().splitlines()
            if line.startswith("data: ")
        ]
        if not events or events[-1]["type"] != "done" or any(e["type"] == "error" for e in events):
            return Outcome(error=events)
        return Outcome("".join(e["text"] for e in events if e["type"] == "delta"))


class OpenAI(HttpClient):
    """``/v1/chat/completions`` with ``X-Conversation-Id``: only the new message is sent."""

    stream = False

    def request(self, text: str) -> tuple[dict[str, str], Frame]:
        headers = {"X-Conversation-Id": self.case}
        return headers, {"model": "fake-model", "messages": [user(text)], "stream": self.stream}

    def ask(self, text: str, turn: int) -> Outcome:
        headers, body = self.request(text)
        response = self.http.post("/v1/chat/completions", json=body, headers=headers)
        if response.status_code != 200:
            return Outcome(error=(response.status_code, response.text))
        content: str = response.json()["choices"][0]["message"]["content"]
        return Outcome(content)


class OpenAIStream(OpenAI):
    stream = True

    def ask(self, text: str, turn: int) -> Outcome:
        headers, body = self.request(text)
        with self.http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            raw = response.read()
        if response.status_code != 200:
            return Outcome(error=(response.status_code, raw.decode()))
        data = [line[len("data: ") :] for line in raw.decode().splitlines() if line.startswith("data: ")]
        if not data or data[-1] != "[DONE]":
            return Outcome(error=("no [DONE] at the end", data))
        chunks = [orjson.loads(item) for item in data[:-1]]
        if any("error" in chunk for chunk in chunks):
            return Outcome(error=chunks)
        return Outcome("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]))


class Ollama(OpenAI):
    """``/api/chat`` with ``X-Conversation-Id``: only the new message is sent."""

    def ask(self, text: str, turn: int) -> Outcome:
        headers, body = self.request(text)
        response = self.http.post("/api/chat", json=body, headers=headers)
        if response.status_code != 200:
            return Outcome(error=(response.status_code, response.text))
        answer = response.json()
        if answer.get("done") is not True:
            return Outcome(error=answer)
        content: str = answer["message"]["content"]
        return Outcome(content)


class OllamaStream(Ollama):
    stream = True

    def ask(self, text: str, turn: int) -> Outcome:
        headers, body = self.request(text)
        with self.http.stream("POST", "/api/chat", json=body, headers=headers) as response:
            raw = response.read()
        if response.status_code != 200:
            return Outcome(error=(response.status_code, raw.decode()))
        lines = [orjson.loads(line) for line in raw.decode().splitlines() if line.strip()]
        if not lines or any("error" in line for line in lines) or lines[-1].get("done") is not True:
            return Outcome(error=lines)
        return Outcome("".join(line["message"]["content"] for line in lines))


CLIENTS: dict[str, type[Client]] = {
    "native-ws": Native,
    "monty-chat-ws": Monty,
    "monty-ws-chat": MontyOnWsChat,
    "cs_agent-ws-chat": CsAgent,
    "sequential-ws-chat": Sequential,
    "sequential-ws-dialect": SequentialDialectQuery,
    "workshop": Workshop,
    "pi-json": PiJson,
    "pi-stream": PiText,
    "pi-sse": PiSse,
    "openai": OpenAI,
    "openai-stream": OpenAIStream,
    "ollama": Ollama,
    "ollama-stream": OllamaStream,
}


# Background load -----------------------------------------------------------------------


@dataclass
class Background:
    """Clients streaming turns on ``/ws`` back to back, each in conversations of its own,
    until ``stop`` is set; every problem they meet is kept in ``errors``."""

    gw: RunningGateway
    case: str
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[Any] = field(default_factory=list)
    completed: list[int] = field(default_factory=lambda: [0] * BACKGROUND_CLIENTS)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index in range(BACKGROUND_CLIENTS):
            thread = threading.Thread(target=self._run, args=(index,), name=f"background-{index}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, index: int) -> None:
        try:
            with connect(self.gw.ws_url + "/ws", open_timeout=RECV_S) as ws:
                turn = 0
                while not self.stop.is_set():
                    request_id = f"{self.case}-bg{index}-{turn}"
                    conversation = f"{self.case}-bg{index}-{turn // BACKGROUND_TURNS_PER_CONVERSATION}"
                    ws.send(orjson.dumps({
                        "type": "chat", "id": request_id, "message": f"background {index} turn {turn}",
                        "conversation_id": conversation,
                    }).decode())
                    deltas: list[str] = []
                    while True:
                        frame = orjson.loads(ws.recv(timeout=RECV_S))
                        if frame["type"] == "delta":
                            deltas.append(frame["text"])
                        elif frame["type"] in ("done", "error"):
                            break
                    if frame["type"] == "error" or frame.get("finish_reason") != "stop":
                        self.errors.append((index, turn, frame))
                    elif "".join(deltas) != ANSWER:
                        self.errors.append((index, turn, "wrong answer", "".join(deltas)))
                    self.completed[index] += 1
                    turn += 1
        except Exception as exc:  # reported by the test thread
            self.errors.append((index, repr(exc)))

    def __enter__(self) -> Background:
        self.start()
        try:
            wait_until(
                lambda: all(self.completed) or self.errors, timeout=RECV_S, what="background clients streaming"
            )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=RECV_S + 5)
        assert not any(thread.is_alive() for thread in self.threads), "a background client hung"


# The matrix ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["memory", "sqlite", "redis"])
def store_gateway(
    request: pytest.FixtureRequest, fake_llm_process: FakeLLM, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """One gateway per store, shared by every protocol's case; each case uses
    conversations of its own and the ``fake`` fixture resets the upstream per test."""
    data_dir: Path = tmp_path_factory.mktemp(f"turn-order-{request.param}")
    if request.param == "redis":
        store = f"{request.getfixturevalue('redis_server').url}/1"
    else:
        store = "memory" if request.param == "memory" else f"sqlite:///{data_dir}/chat.db"
    # The settings of conftest's gateway_settings, with history long enough for every turn.
    with run_gateway(
        provider="ollama",
        ollama_host=fake_llm_process.url,
        model="fake-model",
        store=store,
        data_dir=data_dir,
        resume_grace_s=30.0,
        memory_max_turns=60,
    ) as gw:
        yield gw


def expected_history(case: str, turn: int) -> list[Frame]:
    messages: list[Frame] = []
    for earlier in range(1, turn):
        messages += [user(f"{case}-turn-{earlier}"), assistant(ANSWER)]
    return [*messages, user(f"{case}-turn-{turn}")]


@pytest.mark.parametrize("protocol", list(CLIENTS))
def test_back_to_back_turns_are_answered_in_order_with_the_whole_history(
    store_gateway: RunningGateway, fake: FakeLLM, protocol: str
) -> None:
    gw = store_gateway
    assert gw.settings.memory_max_turns >= 2 * (TURNS - 1)
    fake.configure(tokens=TOKENS)
    case = f"{protocol}-{gw.settings.store.split(':')[0]}"
    outcomes: list[Outcome] = []
    with Background(gw, case) as background, CLIENTS[protocol](gw, case) as client:
        for turn in range(1, TURNS + 1):
            outcomes.append(client.ask(f"{case}-turn-{turn}", turn))
    refused = [(turn, o.error) for turn, o in enumerate(outcomes, start=1) if o.error is not None]
    assert refused == [], f"{len(refused)} of {TURNS} turns were refused or failed"
    assert [o.answer for o in outcomes] == [ANSWER] * TURNS
    assert not background.errors, (
        f"{len(background.errors)} background turns were refused or failed; the first: {background.errors[:3]}"
    )
    assert all(background.completed)

    records = fake.requests()
    for turn in range(1, TURNS + 1):
        text = f"{case}-turn-{turn}"
        sent = [r["body"]["messages"] for r in records if r["body"]["messages"][-1]["content"] == text]
        assert len(sent) == 1, f"turn {turn} reached the upstream {len(sent)} times"
        history = [m for m in sent[0] if m["role"] != "system"]
        assert history == expected_history(case, turn), f"turn {turn}"
