"""The per-generation event log: ordered replay, live following, resume after a seq."""

from __future__ import annotations

import asyncio

from chatgate.chat.events import DoneEvent
from chatgate.chat.generation import Generation


def done(generation: Generation) -> DoneEvent:
    return {
        "type": "done",
        "id": generation.id,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 0, "completion_tokens": generation.seq},
        "timings": {"ttft_ms": 1.0, "total_ms": 2.0},
    }


def new_generation() -> Generation:
    generation = Generation(id="g", conversation_id="c", agent="general", model="m")
    generation.emit(generation.start_event())
    return generation


async def collect(generation: Generation, after: int | None = None) -> list[dict[str, object]]:
    return [dict(e) async for e in generation.events(after)]


async def test_subscribers_see_every_event_in_order_live_and_late() -> None:
    generation = new_generation()
    early = asyncio.create_task(collect(generation))
    for text in ("a", "b", "c"):
        generation.emit_delta(text)
        await asyncio.sleep(0)
    generation.finish(done(generation))
    late = await collect(generation)
    assert await early == late
    assert [e["type"] for e in late] == ["start", "delta", "delta", "delta", "done"]
    assert [e["seq"] for e in late if e["type"] == "delta"] == [1, 2, 3]
    assert generation.text == "abc"


async def test_resume_after_seq_skips_start_and_seen_deltas() -> None:
    generation = new_generation()
    for text in "abcde":
        generation.emit_delta(text)
    follower = asyncio.create_task(collect(generation, after=3))
    generation.emit_delta("f")
    generation.finish(done(generation))
    events = await follower
    assert [e.get("text") for e in events] == ["d", "e", "f", None]
    assert events[-1]["type"] == "done"


async def test_resume_beyond_the_last_seq_waits_for_newer_deltas() -> None:
    generation = new_generation()
    generation.emit_delta("a")
    follower = asyncio.create_task(collect(generation, after=2))
    generation.emit_delta("b")
    generation.emit_delta("c")
    generation.finish(done(generation))
    assert [e.get("seq") for e in await follower] == [3, None]


async def test_waiting_subscribers_cost_one_future_each_and_are_released() -> None:
    generation = new_generation()
    followers = [asyncio.create_task(collect(generation)) for _ in range(3)]
    await asyncio.sleep(0)
    assert len(generation._waiters) == 3
    generation.emit_delta("x")
    assert generation._waiters == []
    generation.finish(done(generation))
    assert all(len(result) == 3 for result in await asyncio.gather(*followers))
