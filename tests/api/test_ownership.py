"""Conversation and generation ids are scoped to their caller: another API key's equal id
is a different conversation or generation, and whatever one key has is, to every other
key, exactly like something that never existed — on every path that writes, reads,
lists, deletes, clears, resumes or cancels.

Runs on the SQLite store, where ownership is a column rather than an object in memory.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.sync.client import ClientConnection, connect

from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.servers import FakeLLM, RunningGateway, wait_until

Frame = dict[str, Any]

K1 = {"Authorization": "Bearer k1"}
K2 = {"Authorization": "Bearer k2"}
ANSWER = fake_reply(40)
RECV_S = 10.0
POLL_S = 5.0


@pytest.fixture
def owned(start_gateway: Any, tmp_path: Path) -> Iterator[RunningGateway]:
    """A gateway with two API keys and the SQLite store."""
    with start_gateway(api_keys="k1,k2", store=f"sqlite:///{tmp_path}/owners.db") as running:
        yield running


# Helpers ------------------------------------------------------------------------------


def user(text: str) -> Frame:
    return {"role": "user", "content": text}


def assistant(text: str) -> Frame:
    return {"role": "assistant", "content": text}


def chat(gw: RunningGateway, headers: dict[str, str] | None, **body: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}/chat", json=body, headers=headers, timeout=RECV_S)


def contents(gw: RunningGateway, headers: dict[str, str], conversation_id: str) -> list[str] | None:
    """The contents of a conversation's messages as ``headers``' key sees them; ``None``
    when that key gets no conversation."""
    response = httpx.get(f"{gw.url}/conversations/{conversation_id}", headers=headers, timeout=RECV_S)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    return [m["content"] for m in response.json()["messages"]]


def stored(gw: RunningGateway, headers: dict[str, str], conversation_id: str, count: int) -> list[str]:
    """The conversation's contents once at least ``count`` messages are stored."""

    def enough() -> list[str] | None:
        found = contents(gw, headers, conversation_id)
        return found if found is not None and len(found) >= count else None

    result: list[str] = wait_until(enough, timeout=POLL_S, what=f"{count} messages in {conversation_id}")
    return result


def listed(gw: RunningGateway, headers: dict[str, str]) -> list[str]:
    response = httpx.get(f"{gw.url}/conversations", headers=headers, timeout=RECV_S)
    assert response.status_code == 200, response.text
    return [c["id"] for c in response.json()["conversations"]]


def never_used() -> str:
    return "never-" + uuid.uuid4().hex


def without(value: Any, conversation_id: str) -> Any:
    """``value`` with ``conversation_id`` replaced wherever a string holds it: answers about
    two ids compare equal when they differ only in the id they name."""
    if isinstance(value, str):
        return value.replace(conversation_id, "<id>")
    if isinstance(value, dict):
        return {key: without(item, conversation_id) for key, item in value.items()}
    if isinstance(value, list):
        return [without(item, conversation_id) for item in value]
    return value


@contextmanager
def socket(gw: RunningGateway, key: str | None = None) -> Iterator[ClientConnection]:
    query = f"?api_key={key}" if key else ""
    with connect(gw.ws_url + "/ws" + query, open_timeout=RECV_S) as ws:
        yield ws


def send(ws: ClientConnection, frame: Frame) -> None:
    ws.send(orjson.dumps(frame).decode())


def recv(ws: ClientConnection) -> Frame:
    frame: Frame = orjson.loads(ws.recv(timeout=RECV_S))
    return frame


def until(ws: ClientConnection, *types: str) -> tuple[Frame, list[Frame]]:
    """Frames until one of ``types``: that frame and every frame before it."""
    seen: list[Frame] = []
    while True:
        frame = recv(ws)
        if frame["type"] in types:
            return frame, seen
        seen.append(frame)


def text_of(deltas: list[Frame]) -> str:
    return "".join(d["text"] for d in deltas if d["type"] == "delta")


def assert_continuous(deltas: list[Frame]) -> None:
    seqs = [d["seq"] for d in deltas]
    assert seqs == list(range(1, len(seqs) + 1)), seqs


def upstream_record(fake: FakeLLM, text: str) -> dict[str, Any]:
    [record] = [r for r in fake.requests() if r["body"]["messages"][-1]["content"] == text]
    return record


# Writes -------------------------------------------------------------------------------


def k2_writes_to_c1(gw: RunningGateway, path: str) -> str:
    """k2 sends "k2 words" to its conversation "c1" by ``path``; returns the answer."""
    if path == "chat":
        response = chat(gw, K2, message="k2 words", conversation_id="c1")
        assert response.status_code == 200, response.text
        assert response.json()["conversation_id"] == "c1"
        reply: str = response.json()["reply"]
        return reply
    headers = {**K2, "X-Conversation-Id": "c1"}
    if path == "openai":
        # A messages list with history of its own: the path that skipped the owner check.
        messages = [user("k2 earlier"), assistant("k2 earlier answer"), user("k2 words")]
        response = httpx.post(
            f"{gw.url}/v1/chat/completions", json={"model": "fake-model", "messages": messages},
            headers=headers, timeout=RECV_S,
        )
        assert response.status_code == 200, response.text
        content: str = response.json()["choices"][0]["message"]["content"]
        return content
    if path == "ollama":
        response = httpx.post(
            f"{gw.url}/api/chat",
            json={"model": "fake-model", "messages": [user("k2 words")], "stream": False},
            headers=headers, timeout=RECV_S,
        )
        assert response.status_code == 200, response.text
        content = response.json()["message"]["content"]
        return content
    assert path == "ws"
    with socket(gw, "k2") as ws:
        send(ws, {"type": "chat", "id": "w1", "message": "k2 words", "conversation_id": "c1"})
        end, frames = until(ws, "done", "error")
    assert end["type"] == "done", end
    assert frames[0]["type"] == "start" and frames[0]["conversation_id"] == "c1"
    return text_of(frames)


@pytest.mark.parametrize("path", ["chat", "openai", "ollama", "ws"])
def test_another_keys_equal_conversation_id_is_its_own_conversation(
    owned: RunningGateway, fake: FakeLLM, path: str
) -> None:
    first = chat(owned, K1, message="k1 private words", conversation_id="c1")
    assert first.status_code == 200, first.text
    assert stored(owned, K1, "c1", 2) == ["k1 private words", ANSWER]

    assert k2_writes_to_c1(owned, path) == ANSWER

    # The upstream answered k2 from k2's history alone.
    sent = [m for m in upstream_record(fake, "k2 words")["body"]["messages"] if m["role"] != "system"]
    if path == "openai":
        assert sent == [user("k2 earlier"), assistant("k2 earlier answer"), user("k2 words")]
    else:
        assert sent == [user("k2 words")]
    # k2's "c1" holds the new message and its answer, k1's is untouched.
    def landed() -> tuple[list[str] | None, list[str] | None] | None:
        k1, k2 = contents(owned, K1, "c1"), contents(owned, K2, "c1")
        return (k1, k2) if (k2 and len(k2) >= 2) or (k1 and len(k1) > 2) else None

    k1_now, _ = wait_until(landed, timeout=POLL_S, what="k2's turn stored")
    assert k1_now == ["k1 private words", ANSWER], "k2's turn went into k1's conversation"
    assert stored(owned, K2, "c1", 2) == ["k2 words", ANSWER]
    assert contents(owned, K1, "c1") == ["k1 private words", ANSWER]
    assert listed(owned, K2) == ["c1"]
    assert listed(owned, K1) == ["c1"]

    # Each key continues its own conversation.
    again = chat(owned, K1, message="k1 again", conversation_id="c1")
    assert again.status_code == 200, again.text
    sent = [m for m in upstream_record(fake, "k1 again")["body"]["messages"] if m["role"] != "system"]
    assert sent == [user("k1 private words"), assistant(ANSWER), user("k1 again")]
    assert stored(owned, K1, "c1", 4) == ["k1 private words", ANSWER, "k1 again", ANSWER]
    assert contents(owned, K2, "c1") == ["k2 words", ANSWER]


# Reads, lists, deletes, clears --------------------------------------------------------


@pytest.fixture
def k1_only(owned: RunningGateway) -> str:
    """A conversation only k1 has, with its two messages stored."""
    response = chat(owned, K1, message="k1 secret", conversation_id="k1-only")
    assert response.status_code == 200, response.text
    assert stored(owned, K1, "k1-only", 2) == ["k1 secret", ANSWER]
    return "k1-only"


def test_reading_another_keys_conversation_is_like_reading_one_that_never_was(
    owned: RunningGateway, k1_only: str
) -> None:
    other = never_used()
    theirs = httpx.get(f"{owned.url}/conversations/{k1_only}", headers=K2)
    nothing = httpx.get(f"{owned.url}/conversations/{other}", headers=K2)
    assert theirs.status_code == nothing.status_code == 404
    assert theirs.headers["content-type"] == nothing.headers["content-type"]
    assert without(theirs.json(), k1_only) == without(nothing.json(), other)
    assert "k1 secret" not in theirs.text

    assert k1_only not in listed(owned, K2)
    assert listed(owned, K2) == []
    assert listed(owned, K1) == [k1_only]


def test_deleting_another_keys_conversation_is_404_and_deletes_nothing(
    owned: RunningGateway, k1_only: str
) -> None:
    other = never_used()
    theirs = httpx.delete(f"{owned.url}/conversations/{k1_only}", headers=K2)
    nothing = httpx.delete(f"{owned.url}/conversations/{other}", headers=K2)
    assert theirs.status_code == nothing.status_code == 404
    assert without(theirs.json(), k1_only) == without(nothing.json(), other)
    assert contents(owned, K1, k1_only) == ["k1 secret", ANSWER]
    assert listed(owned, K1) == [k1_only]


def test_clearing_another_keys_conversation_is_like_clearing_one_that_never_was(
    owned: RunningGateway, k1_only: str
) -> None:
    other = never_used()
    with socket(owned, "k2") as ws:
        send(ws, {"type": "clear_history", "conversation_id": k1_only})
        theirs = recv(ws)
        send(ws, {"type": "clear_history", "conversation_id": other})
        nothing = recv(ws)
    assert theirs["type"] == nothing["type"], (theirs, nothing)
    assert without(theirs, k1_only) == without(nothing, other)
    assert contents(owned, K1, k1_only) == ["k1 secret", ANSWER]


# Generations --------------------------------------------------------------------------


def test_another_key_cannot_cancel_or_resume_a_generation(owned: RunningGateway, fake: FakeLLM) -> None:
    fake.configure(tokens=60, tps=100)
    with socket(owned, "k1") as mine:
        send(mine, {"type": "chat", "id": "g1", "message": "k1 long answer"})
        assert recv(mine)["type"] == "start"
        first = recv(mine)
        assert first["type"] == "delta"

        with socket(owned, "k2") as theirs:
            refusals = []
            for frame in ({"type": "cancel", "id": "g1"}, {"type": "resume", "id": "g1", "after": 0}):
                send(theirs, frame)
                refusals.append(recv(theirs))
            send(theirs, {"type": "cancel", "id": "never-used"})
            unknown = recv(theirs)
            send(theirs, {"type": "ping"})
            assert recv(theirs) == {"type": "pong"}, "k2 was sent frames of k1's generation"
        for refusal in refusals:
            assert refusal["type"] == "error" and refusal["code"] == "not_found", refusal
            assert without(refusal, "g1") == without(unknown, "never-used")

        done, rest = until(mine, "done", "error")
    assert done["type"] == "done" and done["finish_reason"] == "stop", done
    assert_continuous([first, *rest])
    assert text_of([first, *rest]) == fake_reply(60)


def test_equal_generation_ids_of_two_keys_are_two_generations(owned: RunningGateway, fake: FakeLLM) -> None:
    fake.configure(tokens=200, tps=100)  # two seconds: still running when k1 resumes
    with socket(owned, "k1") as mine, socket(owned, "k2") as theirs:
        send(mine, {"type": "chat", "id": "1", "message": "k1 story"})
        send(theirs, {"type": "chat", "id": "1", "message": "k2 story"})
        for ws in (mine, theirs):
            start = recv(ws)
            assert start["type"] == "start" and start["id"] == "1", start
        received = [recv(mine)]
        assert received[0]["type"] == "delta", received

        send(theirs, {"type": "cancel", "id": "1"})
        cancelled, _ = until(theirs, "done", "error")
        assert cancelled["type"] == "done" and cancelled["finish_reason"] == "cancelled", cancelled
        received.append(recv(mine))
        assert received[-1]["type"] == "delta", received
    # k1's first socket closed in the middle of its answer; a new one resumes it.
    with socket(owned, "k1") as again:
        send(again, {"type": "resume", "id": "1", "after": received[-1]["seq"]})
        done, rest = until(again, "done", "error")
    assert done["type"] == "done" and done["finish_reason"] == "stop", done
    assert {f["type"] for f in rest} <= {"delta"}, rest
    assert_continuous(received + rest)
    assert text_of(received + rest) == fake_reply(200)

    assert upstream_record(fake, "k1 story")["completed"]
    k2_record = upstream_record(fake, "k2 story")
    assert not k2_record["completed"]


def test_anonymous_sockets_with_equal_generation_ids_cancel_only_their_own(
    start_gateway: Any, fake: FakeLLM, tmp_path: Path
) -> None:
    fake.configure(tokens=100, tps=100)
    with start_gateway(store=f"sqlite:///{tmp_path}/anonymous.db") as gw:
        with socket(gw) as first, socket(gw) as second:
            send(first, {"type": "chat", "id": "1", "message": "first story"})
            assert recv(first)["type"] == "start"
            send(second, {"type": "chat", "id": "1", "message": "second story"})
            assert recv(second)["type"] == "start"

            send(first, {"type": "cancel", "id": "1"})
            cancelled, _ = until(first, "done", "error")
            completed, deltas = until(second, "done", "error")
    assert cancelled["type"] == "done" and cancelled["finish_reason"] == "cancelled", cancelled
    assert completed["type"] == "done" and completed["finish_reason"] == "stop", completed
    assert_continuous(deltas)
    assert text_of(deltas) == fake_reply(100)


# Conversation id charset ---------------------------------------------------------------


def test_conversation_ids_are_url_safe_characters(owned: RunningGateway, fake: FakeLLM) -> None:
    response = chat(owned, K1, message="hi", conversation_id="a/b")
    assert response.status_code == 422, response.text

    with socket(owned, "k1") as ws:
        send(ws, {"type": "chat", "id": "slash", "message": "hi", "conversation_id": "a/b"})
        error = recv(ws)
    assert error["type"] == "error" and error["code"] == "bad_request", error

    openai = httpx.post(
        f"{owned.url}/v1/chat/completions",
        json={"model": "fake-model", "messages": [user("hi")]},
        headers={**K1, "X-Conversation-Id": "a/b"},
    )
    assert openai.status_code == 400, openai.text
    assert set(openai.json()["error"]) == {"message", "type", "param", "code"}
    assert openai.json()["error"]["type"] == "invalid_request_error"

    ollama = httpx.post(
        f"{owned.url}/api/chat",
        json={"model": "fake-model", "messages": [user("hi")], "stream": False},
        headers={**K1, "X-Conversation-Id": "a/b"},
    )
    assert ollama.status_code == 400, ollama.text
    assert set(ollama.json()) == {"error"}
    assert fake.requests() == [], "a refused id reached the upstream"

    good = "Ab_9-x.y~z"
    response = chat(owned, K1, message="a fine id", conversation_id=good)
    assert response.status_code == 200, response.text
    assert response.json()["conversation_id"] == good
    assert stored(owned, K1, good, 2) == ["a fine id", ANSWER]
    assert good in listed(owned, K1)
