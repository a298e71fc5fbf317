"""One log line per turn: its ids, agent, model, time to first token, tokens, outcome and
trace id, and never the message or answer text."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from chatgate.testing.frames import send, until
from chatgate.testing.servers import FakeLLM, RunningGateway, wait_until

SECRET = "my secret recipe for pancakes"


def turn_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "chatgate.turns" and r.getMessage() == "turn"]


def fields(record: logging.LogRecord) -> dict[str, Any]:
    names = ("request_id", "conversation_id", "agent", "model", "ttft_ms", "duration_ms",
             "input_tokens", "output_tokens", "outcome", "trace_id")
    return {name: getattr(record, name) for name in names}


async def test_each_turn_logs_one_line_without_its_text(
    gw: RunningGateway, fake: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatgate.turns")
    answered = httpx.post(f"{gw.url}/chat", json={"message": SECRET, "conversation_id": "c1"}, timeout=10)
    assert answered.status_code == 200
    wait_until(lambda: len(turn_lines(caplog)) == 1, timeout=5, what="the turn's line")
    ok = fields(turn_lines(caplog)[0])
    assert ok["conversation_id"] == "c1" and ok["agent"] == "general" and ok["model"] == "fake-model"
    assert ok["outcome"] == "stop" and ok["output_tokens"] == 40 and ok["input_tokens"] > len(SECRET.split())
    assert ok["ttft_ms"] is not None and ok["duration_ms"] >= ok["ttft_ms"]
    assert ok["trace_id"] is None  # no tracing configured

    fake.fault("http_500", times=3)
    failed = httpx.post(f"{gw.url}/chat", json={"message": SECRET}, timeout=10)
    assert failed.status_code == 502
    fake.configure(tps=50)
    async with connect(gw.ws_url + "/ws") as ws:
        await send(ws, {"type": "chat", "id": "w1", "message": SECRET})
        await until(ws, "delta")
        await send(ws, {"type": "cancel", "id": "w1"})
        done, _ = await until(ws, "done")
        assert done["finish_reason"] == "cancelled"
    wait_until(lambda: len(turn_lines(caplog)) == 3, timeout=5, what="three turn lines")
    error, cancelled = (fields(r) for r in turn_lines(caplog)[1:])
    assert error["outcome"] == "error" and turn_lines(caplog)[1].error_code == "provider_error"
    assert cancelled["outcome"] == "cancelled" and cancelled["request_id"] == "w1"
    for record in turn_lines(caplog):
        assert SECRET not in str(record.__dict__) and "pancakes" not in str(record.__dict__)
