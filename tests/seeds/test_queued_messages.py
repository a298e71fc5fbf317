"""The seed systems answered one message at a time: a message their clients send while
an answer is still streaming is answered after it, in order, with that answer in its
history — not refused as busy. How many messages may wait behind the running answer is
bounded per connection (``chatgate.api.ws.MAX_QUEUED_TURNS``); each one beyond that is
refused with an error frame in the dialect's shape, and the socket stays open.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from websockets.sync.client import ClientConnection, connect

from chatgate.api import ws as ws_module
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway

Frame = dict[str, Any]

#: Answers of 10 tokens at 20 tokens/s take about half a second: the messages sent right
#: after the first one all arrive while it is surely still streaming.
TOKENS, TPS = 10, 20
ANSWER = fake_reply(TOKENS)
RECV_S = 10.0
MESSAGES = ["first", "second", "third"]


def send(ws: ClientConnection, frame: Frame) -> None:
    ws.send(orjson.dumps(frame).decode())


def recv(ws: ClientConnection) -> Frame:
    frame: Frame = orjson.loads(ws.recv(timeout=RECV_S))
    return frame


def read_until(ws: ClientConnection, done: Callable[[list[Frame]], bool], bound_s: float) -> list[Frame]:
    """Every frame until ``done(frames)``, within ``bound_s`` seconds overall."""
    deadline = time.monotonic() + bound_s
    frames: list[Frame] = []
    while not done(frames):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no end within {bound_s} s; frames so far: {frames}"
        frames.append(orjson.loads(ws.recv(timeout=min(remaining, RECV_S))))
    return frames


def collapse(values: list[Any]) -> list[Any]:
    """``values`` with runs of equal neighbours collapsed to one."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def upstream_turns(fake: FakeLLM, texts: list[str]) -> list[dict[str, Any]]:
    """The upstream requests whose new message is one of ``texts``, in arrival order."""
    return [r for r in fake.requests() if r["body"]["messages"][-1]["content"] in texts]


def assert_answered_in_order(fake: FakeLLM, texts: list[str], window: int, answer: str = ANSWER) -> None:
    """The upstream got ``texts`` one after another, each only once the answer before it
    had ended, each with the earlier ones and their answers as history (the last
    ``window`` messages of it)."""
    records = upstream_turns(fake, texts)
    assert [r["body"]["messages"][-1]["content"] for r in records] == texts
    history: list[Frame] = []
    for index, (text, record) in enumerate(zip(texts, records, strict=True)):
        sent = [m for m in record["body"]["messages"] if m["role"] != "system"]
        assert sent == [*history[max(0, len(history) - window) :], {"role": "user", "content": text}], text
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        if index:
            assert record["started_at"] >= records[index - 1]["finished_at"], f"{text} overlapped the answer before"


@dataclass(frozen=True)
class Seed:
    """One seed client: where it connects, its message frame and how to read its answers."""

    name: str
    path: str
    frame: Callable[[str, int], Frame]
    #: Whether ``frames`` hold ``n`` complete answers (or their errors).
    ended: Callable[[list[Frame], int], bool]
    is_error: Callable[[Frame], bool]
    #: The answers' texts in the order they arrived; fails when chunks of two interleave.
    answers: Callable[[list[Frame]], list[str]]


def _monty_ended(frames: list[Frame], n: int) -> bool:
    return sum(f.get("event_type") in ("completed", "error") for f in frames) >= n


def _monty_answers(frames: list[Frame]) -> list[str]:
    assert all("event_type" in f for f in frames), frames
    streamed = [f for f in frames if f["event_type"] in ("content", "completed")]
    task_ids = [f["task_id"] for f in streamed]
    assert collapse(task_ids) == list(dict.fromkeys(task_ids)), f"answers interleaved: {task_ids}"
    answers: list[str] = []
    for task_id in dict.fromkeys(task_ids):
        own = [f for f in streamed if f["task_id"] == task_id]
        assert own[-1]["event_type"] == "completed", own
        answers.append("".join(f["content"] for f in own))
    return answers


def _done_separated_answers(chunk_type: str, text_key: str) -> Callable[[list[Frame]], list[str]]:
    """Answers whose chunks carry no id: the text between one ``done`` and the next."""

    def answers(frames: list[Frame]) -> list[str]:
        found: list[str] = []
        current: list[str] = []
        for frame in frames:
            if frame.get("type") == chunk_type:
                current.append(frame[text_key])
            elif frame.get("type") == "done":
                found.append("".join(current))
                current = []
        assert current == [], f"chunks after the last done: {current}"
        return found

    return answers


def _sequential_ended(frames: list[Frame], n: int) -> bool:
    """``n`` answers have ended, or frames of another dialect arrived."""
    return sum(f.get("type") == "typing_stop" for f in frames) >= n or any("type" not in f for f in frames)


def _sequential_answers(frames: list[Frame]) -> list[str]:
    """Each answer is ``message_start``, its chunks, ``message_complete``; acknowledgements
    of waiting messages (``message_received``, ``typing_start``) may come in between."""
    assert all("type" in f for f in frames), f"not sequential frames: {frames}"
    streamed = [f for f in frames if f["type"] in ("message_start", "message_chunk", "message_complete")]
    found: list[str] = []
    text: str | None = None
    for frame in streamed:
        if frame["type"] == "message_start":
            assert text is None, f"an answer started inside another: {streamed}"
            text = ""
        elif frame["type"] == "message_chunk":
            assert text is not None, f"a chunk outside an answer: {streamed}"
            text += frame["content"]
            assert frame["accumulated_content"] == text, "chunks of two answers interleaved"
        else:
            assert text is not None and frame["content"] == text, f"an answer ended out of turn: {streamed}"
            found.append(text)
            text = None
    assert text is None, "an answer never completed"
    return found


SEEDS = [
    Seed(
        "monty", "/chat/ws", lambda text, n: {"message": text, "task_id": f"task-{n}"},
        _monty_ended, lambda f: f.get("event_type") == "error", _monty_answers,
    ),
    Seed(
        "cs_agent", "/ws/chat", lambda text, n: {"messages": [{"role": "user", "content": text}]},
        lambda frames, n: sum(f.get("type") in ("done", "error") for f in frames) >= n,
        lambda f: f.get("type") == "error", _done_separated_answers("delta", "text"),
    ),
    Seed(
        "sequential", "/ws/chat", lambda text, n: {"type": "message", "content": text},
        _sequential_ended, lambda f: f.get("type") == "error", _sequential_answers,
    ),
    Seed(
        "sequential-dialect-query", "/ws?dialect=sequential", lambda text, n: {"type": "message", "content": text},
        _sequential_ended, lambda f: f.get("type") == "error", _sequential_answers,
    ),
    Seed(
        "workshop", "/ws/chat/s1", lambda text, n: {"message": text, "agent": "default"},
        lambda frames, n: sum(f.get("type") in ("done", "error") for f in frames) >= n,
        lambda f: f.get("type") == "error", _done_separated_answers("chunk", "content"),
    ),
]


@pytest.mark.parametrize("seed", SEEDS, ids=[s.name for s in SEEDS])
def test_messages_sent_during_an_answer_are_answered_after_it_in_order(
    gw: RunningGateway, fake: FakeLLM, seed: Seed
) -> None:
    fake.configure(tokens=TOKENS, tps=TPS)
    with connect(gw.ws_url + seed.path, open_timeout=RECV_S) as ws:
        for n, text in enumerate(MESSAGES, start=1):
            send(ws, seed.frame(text, n))
        frames = read_until(ws, lambda got: seed.ended(got, len(MESSAGES)), bound_s=RECV_S + 3)
    assert [f for f in frames if seed.is_error(f)] == []
    assert seed.answers(frames) == [ANSWER] * len(MESSAGES)
    assert_answered_in_order(fake, MESSAGES, gw.settings.memory_max_turns)


# The bound ------------------------------------------------------------------------------

#: Short answers, still streaming while a burst of messages arrives: 6 tokens at 30/s.
BOUND_TOKENS, BOUND_TPS = 6, 30
BOUND_ANSWER = fake_reply(BOUND_TOKENS)


def test_monty_refuses_messages_beyond_the_queue_bound_and_stays_open(gw: RunningGateway, fake: FakeLLM) -> None:
    limit: int = ws_module.MAX_QUEUED_TURNS
    assert limit >= 1
    fake.configure(tokens=BOUND_TOKENS, tps=BOUND_TPS)
    accepted = limit + 1  # the running one and those waiting behind it
    task_ids = [f"task-{n}" for n in range(1, limit + 4)]
    texts = [f"burst {n}" for n in range(1, limit + 4)]
    bound_s = accepted * BOUND_TOKENS / BOUND_TPS + RECV_S
    with connect(gw.ws_url + "/chat/ws", open_timeout=RECV_S) as ws:
        for task_id, text in zip(task_ids, texts, strict=True):
            send(ws, {"message": text, "task_id": task_id})
        frames = read_until(ws, lambda got: _monty_ended(got, len(task_ids)), bound_s)

        errors = [f for f in frames if f["event_type"] == "error"]
        assert [f["task_id"] for f in errors] == task_ids[accepted:]
        for error in errors:
            assert error.keys() == {"task_id", "event_type", "content"}
            assert isinstance(error["content"], str) and error["content"]
        streamed = [f for f in frames if f["event_type"] != "error"]
        assert collapse([f["task_id"] for f in streamed]) == task_ids[:accepted]
        assert _monty_answers(streamed) == [BOUND_ANSWER] * accepted

        # The socket is still open and answers the next message.
        send(ws, {"message": "after the burst", "task_id": "after"})
        after = read_until(ws, lambda got: _monty_ended(got, 1), bound_s=RECV_S)
    assert after[-1] == {"task_id": "after", "event_type": "completed", "content": ""}
    assert _monty_answers(after) == [BOUND_ANSWER]
    assert_answered_in_order(fake, [*texts[:accepted], "after the burst"], gw.settings.memory_max_turns, BOUND_ANSWER)


def test_workshop_refuses_messages_beyond_the_queue_bound_and_stays_open(
    gw: RunningGateway, fake: FakeLLM
) -> None:
    limit: int = ws_module.MAX_QUEUED_TURNS
    assert limit >= 1
    fake.configure(tokens=BOUND_TOKENS, tps=BOUND_TPS)
    accepted = limit + 1
    texts = [f"burst {n}" for n in range(1, limit + 4)]
    bound_s = accepted * BOUND_TOKENS / BOUND_TPS + RECV_S
    with connect(gw.ws_url + "/ws/chat/s1", open_timeout=RECV_S) as ws:
        for text in texts:
            send(ws, {"message": text, "agent": "default"})
        frames = read_until(
            ws, lambda got: sum(f.get("type") in ("done", "error") for f in got) >= len(texts), bound_s
        )
        errors = [f for f in frames if f["type"] == "error"]
        assert len(errors) == len(texts) - accepted, errors
        for error in errors:
            assert error.keys() == {"type", "content"}
            assert isinstance(error["content"], str) and error["content"]
        streamed = [f for f in frames if f["type"] != "error"]
        assert _done_separated_answers("chunk", "content")(streamed) == [BOUND_ANSWER] * accepted

        send(ws, {"message": "after the burst", "agent": "default"})
        after = read_until(ws, lambda got: any(f.get("type") in ("done", "error") for f in got), bound_s=RECV_S)
    assert after[-1] == {"type": "done", "agent": "default"}
    assert _done_separated_answers("chunk", "content")(after) == [BOUND_ANSWER]
    assert_answered_in_order(fake, [*texts[:accepted], "after the burst"], gw.settings.memory_max_turns, BOUND_ANSWER)
