"""The native WebSocket protocol on /ws, over real sockets, against the fake upstream."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from chatgate.chat.agents import GENERAL_PROMPT
from chatgate.testing.fake_llm import fake_reply
from chatgate.testing.frames import recv, send, until
from chatgate.testing.servers import FakeLLM, RunningGateway, wait_until


async def test_three_turns_send_system_prompt_and_whole_history(gw: RunningGateway, fake: FakeLLM) -> None:
    questions = ["What is chatgate?", "Does it stream?", "And remember?"]
    async with connect(gw.ws_url + "/ws") as ws:
        conversation_id = None
        for n, question in enumerate(questions, start=1):
            frame: dict[str, Any] = {"type": "chat", "id": f"turn-{n}", "message": question}
            if conversation_id:
                frame["conversation_id"] = conversation_id
            await send(ws, frame)
            start = await recv(ws)
            assert start["type"] == "start" and start["id"] == f"turn-{n}"
            assert start["agent"] == "general" and start["model"] == "fake-model"
            conversation_id = conversation_id or start["conversation_id"]
            assert start["conversation_id"] == conversation_id
            done, deltas = await until(ws, "done")
            # Tokens that arrive while a delta waits for the socket join it.
            assert deltas and {d["type"] for d in deltas} == {"delta"}
            assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
            assert "".join(d["text"] for d in deltas) == fake_reply(40)
            assert done["finish_reason"] == "stop"
            assert done["usage"]["completion_tokens"] == 40
            assert done["timings"]["total_ms"] >= done["timings"]["ttft_ms"] > 0

    sent = [r["body"]["messages"] for r in fake.requests()]
    assert len(sent) == 3
    for turn, messages in enumerate(sent):
        assert messages[0]["role"] == "system"
        assert messages[0]["content"].startswith(GENERAL_PROMPT)
        expected: list[dict[str, str]] = []
        for question in questions[:turn]:
            expected += [{"role": "user", "content": question}, {"role": "assistant", "content": fake_reply(40)}]
        expected.append({"role": "user", "content": questions[turn]})
        assert messages[1:] == expected


async def test_cancel_closes_upstream_fast_and_keeps_partial(gw: RunningGateway, fake: FakeLLM) -> None:
    fake.configure(tokens=500, tps=50)
    async with connect(gw.ws_url + "/ws") as ws:
        await send(ws, {"type": "chat", "id": "c1", "message": "Tell me a long story"})
        start = await recv(ws)
        first = [await recv(ws) for _ in range(3)]
        assert [f["type"] for f in first] == ["delta"] * 3
        cancelled_at = time.monotonic()
        await send(ws, {"type": "cancel", "id": "c1"})
        done, rest = await until(ws, "done")
        assert done["finish_reason"] == "cancelled"

    record = wait_until(
        lambda: next((r for r in fake.requests() if r["disconnected_at"]), None), timeout=2, what="upstream close"
    )
    assert record["disconnected_at"] - cancelled_at < 0.2
    assert not record["completed"]

    deltas = first + [d for d in rest if d["type"] == "delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    streamed = "".join(d["text"] for d in deltas)
    assert streamed == fake_reply(done["usage"]["completion_tokens"])
    conversation = httpx.get(f"{gw.url}/conversations/{start['conversation_id']}").json()
    user, assistant = conversation["messages"]
    assert user == {**user, "role": "user", "content": "Tell me a long story", "partial": False}
    assert assistant["role"] == "assistant" and assistant["partial"] is True
    assert assistant["content"] == streamed


async def test_bad_frames_get_errors_and_the_socket_stays_open(gw: RunningGateway) -> None:
    async with connect(gw.ws_url + "/ws") as ws:
        for frame, code in [
            ("not json", "bad_request"),
            ("[1, 2]", "bad_request"),
            ('{"type": "dance"}', "bad_request"),
            ('{"type": "chat", "message": ""}', "bad_request"),
            ('{"type": "chat", "message": 5}', "bad_request"),
            ('{"type": "chat", "message": "x", "options": {"temperature": "hot"}}', "bad_request"),
            ('{"type": "chat", "message": "x", "agent": "nobody"}', "not_found"),
            ('{"type": "cancel", "id": "unknown"}', "not_found"),
            ('{"type": "resume", "id": "unknown", "after": 0}', "not_found"),
            ('{"type": "chat", "message": "' + "x" * 20_000 + '"}', "too_large"),
        ]:
            await ws.send(frame)
            error = await recv(ws)
            assert error["type"] == "error", frame
            assert error["code"] == code, (frame, error)
            assert error["retryable"] is False
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}


async def test_one_generation_per_conversation_but_many_per_socket(gw: RunningGateway, fake: FakeLLM) -> None:
    fake.configure(tokens=20, tps=200)
    async with connect(gw.ws_url + "/ws") as ws:
        await send(ws, {"type": "chat", "id": "a", "message": "first", "conversation_id": "conv-a"})
        await send(ws, {"type": "chat", "id": "b", "message": "second", "conversation_id": "conv-a"})
        await send(ws, {"type": "chat", "id": "c", "message": "third", "conversation_id": "conv-c"})
        frames: list[dict[str, Any]] = []
        while sum(f["type"] == "done" for f in frames) < 2:
            frames.append(await recv(ws))
    busy = [f for f in frames if f["type"] == "error"]
    assert busy == [{"type": "error", "id": "b", "code": "busy", "message": busy[0]["message"], "retryable": True}]
    for request_id in ("a", "c"):
        deltas = [f["text"] for f in frames if f["type"] == "delta" and f["id"] == request_id]
        assert "".join(deltas) == fake_reply(20)


async def test_clear_history_forgets_the_conversation(gw: RunningGateway, fake: FakeLLM) -> None:
    async with connect(gw.ws_url + "/ws") as ws:
        await send(ws, {"type": "chat", "message": "remember me", "conversation_id": "conv-x"})
        await until(ws, "done")
        await send(ws, {"type": "clear_history", "conversation_id": "conv-x"})
        assert await recv(ws) == {"type": "history_cleared", "conversation_id": "conv-x"}
        await send(ws, {"type": "chat", "message": "who am I?", "conversation_id": "conv-x"})
        await until(ws, "done")
    last = fake.requests()[-1]["body"]["messages"]
    assert [m["role"] for m in last] == ["system", "user"]


async def test_resume_after_reconnect_replays_then_goes_live(gw: RunningGateway, fake: FakeLLM) -> None:
    fake.configure(tokens=60, tps=100)
    async with connect(gw.ws_url + "/ws") as ws:
        await send(ws, {"type": "chat", "id": "r1", "message": "long answer please"})
        await recv(ws)
        received = [await recv(ws) for _ in range(3)]
        assert [f["type"] for f in received] == ["delta"] * 3
    # The socket is gone; the generation goes on within the grace period.
    async with connect(gw.ws_url + "/ws") as ws:
        await send(ws, {"type": "resume", "id": "r1", "after": received[-1]["seq"]})
        done, rest = await until(ws, "done")
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 60
    assert {f["type"] for f in rest} <= {"delta"}
    seqs = [f["seq"] for f in received + rest]
    assert seqs == list(range(1, len(seqs) + 1))
    assert "".join(f["text"] for f in received + rest) == fake_reply(60)


async def test_dropped_socket_without_resume_is_cancelled_after_grace(
    start_gateway: Any, fake: FakeLLM
) -> None:
    fake.configure(tokens=1000, tps=50)
    with start_gateway(resume_grace_s=0.3) as gw:
        async with connect(gw.ws_url + "/ws") as ws:
            await send(ws, {"type": "chat", "id": "g1", "message": "go on", "conversation_id": "conv-g"})
            await recv(ws)
            await recv(ws)
            dropped_at = time.monotonic()
        record = wait_until(
            lambda: next((r for r in fake.requests() if r["disconnected_at"]), None), timeout=5, what="cancel"
        )
        assert 0.25 < record["disconnected_at"] - dropped_at < 2.0
        messages = wait_until(
            lambda: httpx.get(f"{gw.url}/conversations/conv-g").json().get("messages"), timeout=2, what="stored"
        )
        assert messages[-1]["partial"] is True and messages[-1]["content"]


@pytest.mark.parametrize("path", ["/ws"])
async def test_foreign_origin_is_refused(gw: RunningGateway, path: str) -> None:
    with pytest.raises(Exception, match="403"):
        async with connect(gw.ws_url + path, origin="http://evil.example"):  # type: ignore[arg-type]
            pass
    async with connect(gw.ws_url + path, origin=gw.url) as ws:  # type: ignore[arg-type]
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}


async def test_clearing_history_during_a_reply_does_not_bring_it_back(gw: RunningGateway, fake: FakeLLM) -> None:
    fake.configure(tokens=500, tps=100)
    async with connect(gw.ws_url + "/ws") as ws:
        await send(ws, {"type": "chat", "id": "h1", "message": "secret", "conversation_id": "conv-h"})
        await recv(ws)
        await recv(ws)
        await send(ws, {"type": "clear_history", "conversation_id": "conv-h"})
        frames: list[dict[str, Any]] = []
        while {"done", "history_cleared"} - {f["type"] for f in frames}:
            frames.append(await recv(ws))
        assert next(f for f in frames if f["type"] == "done")["finish_reason"] == "cancelled"
    conversation = httpx.get(f"{gw.url}/conversations/conv-h")
    assert conversation.status_code == 404 or conversation.json()["messages"] == []


async def test_permessage_deflate_is_not_negotiated_even_when_offered(gw: RunningGateway) -> None:
    """Token frames are a few bytes: compressing each costs CPU and a compressor per socket."""
    async with connect(gw.ws_url + "/ws", compression="deflate") as ws:
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        await send(ws, {"type": "ping"})
        assert (await recv(ws))["type"] == "pong"


async def test_a_refused_clear_history_names_the_frames_id(gw: RunningGateway) -> None:
    async with connect(gw.ws_url + "/ws") as ws:
        await send(ws, {"type": "clear_history", "id": "c1", "conversation_id": "not an id!"})
        error = await recv(ws)
    assert (error["type"], error["code"], error.get("id")) == ("error", "bad_request", "c1")
