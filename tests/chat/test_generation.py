"""The per-generation event log: ordered replay, live following, resume after a seq, and
coalescing of tokens that no subscriber has read yet."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from contextlib import aclosing
from typing import TypeVar, cast

from chatgate.chat.events import DoneEvent, Event
from chatgate.chat.generation import MAX_COALESCED_CHARS, Generation

Subscriber = AsyncGenerator[Event, None]
T = TypeVar("T")
#: No await here needs more than a few loop turns; a lost wake-up fails instead of hanging.
BOUND_S = 5.0


def done(generation: Generation) -> DoneEvent:
    return {
        "type": "done",
        "id": generation.id,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 0, "completion_tokens": generation.tokens},
        "timings": {"ttft_ms": 1.0, "total_ms": 2.0},
    }


def new_generation() -> Generation:
    generation = Generation(id="g", conversation_id="c", agent="general", model="m")
    generation.emit(generation.start_event())
    return generation


def subscribe(generation: Generation, after: int | None = None) -> Subscriber:
    """``events()``, typed as the async generator it is, so a test can close it the way a
    dropped socket does."""
    return cast(Subscriber, generation.events(after))


async def soon(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, BOUND_S)


async def drain(subscriber: Subscriber) -> list[dict[str, object]]:
    async with asyncio.timeout(BOUND_S):
        return [dict(e) async for e in subscriber]


async def collect(generation: Generation, after: int | None = None) -> list[dict[str, object]]:
    return await drain(subscribe(generation, after))


async def until_waiting(generation: Generation, count: int) -> None:
    """Let the loop run until ``count`` subscribers wait for the next event."""
    for _ in range(100):
        if len(generation._waiters) >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{len(generation._waiters)} of {count} subscribers are waiting")


def deltas(events: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(e["seq"], e["text"]) for e in events if e["type"] == "delta"]


async def test_subscribers_see_every_event_in_order_live_and_late() -> None:
    generation = new_generation()
    async with aclosing(subscribe(generation)) as live:
        seen = [dict(await soon(anext(live)))]
        for text in ("a", "b", "c"):
            pending = asyncio.ensure_future(anext(live))
            await until_waiting(generation, 1)
            generation.emit_delta(text)
            seen.append(dict(await soon(pending)))
        generation.finish(done(generation))
        seen += await drain(live)
    late = await collect(generation)
    assert seen == late
    assert [e["type"] for e in late] == ["start", "delta", "delta", "delta", "done"]
    assert deltas(late) == [(1, "a"), (2, "b"), (3, "c")]
    assert generation.text == "abc" and generation.tokens == 3


async def test_resume_after_seq_skips_start_and_seen_deltas() -> None:
    generation = new_generation()
    async with aclosing(subscribe(generation)) as reader:
        await soon(anext(reader))
        for text in "abcde":
            generation.emit_delta(text)
            await soon(anext(reader))  # read each before the next arrives: one delta apiece
    follower = asyncio.create_task(collect(generation, after=3))
    generation.emit_delta("f")
    generation.finish(done(generation))
    events = await soon(follower)
    assert [e.get("text") for e in events] == ["d", "e", "f", None]
    assert [e.get("seq") for e in events] == [4, 5, 6, None]
    assert events[-1]["type"] == "done"


async def test_resume_beyond_the_last_seq_waits_for_newer_deltas() -> None:
    generation = new_generation()
    async with aclosing(subscribe(generation)) as reader:
        await soon(anext(reader))
        generation.emit_delta("a")
        await soon(anext(reader))
        follower = asyncio.create_task(collect(generation, after=2))
        await until_waiting(generation, 1)
        generation.emit_delta("b")
        await soon(anext(reader))
        generation.emit_delta("c")
        generation.finish(done(generation))
        assert deltas(await drain(reader)) == [(3, "c")]
    assert [e.get("seq") for e in await soon(follower)] == [3, None]


async def test_waiting_subscribers_cost_one_future_each_and_are_released() -> None:
    generation = new_generation()
    followers = [asyncio.create_task(collect(generation)) for _ in range(3)]
    await until_waiting(generation, 3)
    assert len(generation._waiters) == 3
    generation.emit_delta("x")
    assert generation._waiters == []
    generation.finish(done(generation))
    assert all(len(result) == 3 for result in await soon(asyncio.gather(*followers)))


async def test_tokens_emitted_with_no_reader_merge_into_one_delta() -> None:
    generation = new_generation()
    for text in ("Hello", " there", ",", " friend"):
        generation.emit_delta(text)
    assert generation.seq == 1 and generation.tokens == 4
    assert generation.text == "Hello there, friend"
    generation.finish(done(generation))
    events = await collect(generation)
    assert [e["type"] for e in events] == ["start", "delta", "done"]
    assert deltas(events) == [(1, "Hello there, friend")]
    assert events[-1]["usage"] == {"prompt_tokens": 0, "completion_tokens": 4}


async def test_tokens_that_arrive_before_a_woken_subscriber_runs_join_its_delta() -> None:
    generation = new_generation()
    follower = asyncio.create_task(collect(generation))
    await until_waiting(generation, 1)
    for text in "abc":  # the first wakes the follower; it has not run when the rest arrive
        generation.emit_delta(text)
    generation.finish(done(generation))
    assert deltas(await soon(follower)) == [(1, "abc")]


async def test_a_delta_handed_to_a_subscriber_is_never_changed() -> None:
    generation = new_generation()
    async with aclosing(subscribe(generation)) as reader:
        await soon(anext(reader))
        generation.emit_delta("a")
        first = await soon(anext(reader))
        handed = dict(first)
        generation.emit_delta("b")
        generation.emit_delta("c")
        assert first == handed == {"type": "delta", "id": "g", "seq": 1, "text": "a"}
        second = await soon(anext(reader))
        assert (second["type"], second.get("seq"), second.get("text")) == ("delta", 2, "bc")
        generation.emit_delta("d")
        generation.finish(done(generation))
        assert deltas(await drain(reader)) == [(3, "d")]
    assert deltas(await collect(generation)) == [(1, "a"), (2, "bc"), (3, "d")]
    assert generation.tokens == 4 and generation.seq == 3


def test_a_listener_is_told_once_per_delta_and_read_from_freezes_what_it_returns() -> None:
    generation = new_generation()
    told: list[int] = []
    generation.subscribe(lambda g: told.append(len(g.log)))
    for text in "abc":
        generation.emit_delta(text)
    assert told == [2], "tokens that joined the delta it was told about are no news"
    [first] = generation.read_from(1)
    handed = dict(first)
    generation.emit_delta("d")
    generation.emit_delta("e")
    assert first == handed == {"type": "delta", "id": "g", "seq": 1, "text": "abc"}
    assert told == [2, 3]
    generation.finish(done(generation))
    rest = generation.read_from(2)
    assert [(e["type"], e.get("seq"), e.get("text")) for e in rest] == [("delta", 2, "de"), ("done", None, None)]
    assert generation.tokens == 5


async def test_merging_stops_at_max_coalesced_chars() -> None:
    generation = new_generation()
    generation.emit_delta("a" * (MAX_COALESCED_CHARS - 1))
    generation.emit_delta("b")  # the delta is still under the limit: it takes this one in
    generation.emit_delta("c")  # now it is full: a new delta starts
    generation.emit_delta("d")
    generation.finish(done(generation))
    assert deltas(await collect(generation)) == [(1, "a" * (MAX_COALESCED_CHARS - 1) + "b"), (2, "cd")]
    assert generation.tokens == 4


async def test_many_large_tokens_split_into_deltas_near_the_limit_in_order() -> None:
    generation = new_generation()
    tokens = [f"<{i}>".ljust(1000, ".") for i in range(20)]
    for token in tokens:
        generation.emit_delta(token)
    generation.finish(done(generation))
    found = deltas(await collect(generation))
    texts = [str(text) for _, text in found]
    assert "".join(texts) == "".join(tokens)
    assert [seq for seq, _ in found] == list(range(1, len(found) + 1))
    assert len(found) > 1
    assert all(MAX_COALESCED_CHARS <= len(text) < MAX_COALESCED_CHARS + 1000 for text in texts[:-1])


async def test_resume_over_coalesced_deltas_replays_exactly_the_unseen_text() -> None:
    generation = new_generation()
    async with aclosing(subscribe(generation)) as socket:
        await soon(anext(socket))
        generation.emit_delta("Hel")
        generation.emit_delta("lo")
        seen = await soon(anext(socket))
        generation.emit_delta(" wor")
        generation.emit_delta("ld")
    # The socket dropped without reading seq 2; more tokens join that waiting delta.
    generation.emit_delta(",")
    assert (seen["type"], seen.get("seq"), seen.get("text")) == ("delta", 1, "Hello")
    async with aclosing(subscribe(generation, after=1)) as resumed:
        replayed = [dict(await soon(anext(resumed)))]
        pending = asyncio.ensure_future(anext(resumed))
        await until_waiting(generation, 1)
        generation.emit_delta(" how")
        generation.emit_delta(" are you?")
        replayed.append(dict(await soon(pending)))
        generation.finish(done(generation))
        replayed += await drain(resumed)
    assert deltas(replayed) == [(2, " world,"), (3, " how are you?")]
    assert replayed[-1]["type"] == "done"
    assert "Hello" + "".join(str(text) for _, text in deltas(replayed)) == generation.text
    assert generation.text == "Hello world, how are you?" and generation.tokens == 7


async def test_two_subscribers_get_the_same_unchanged_deltas_when_one_is_behind() -> None:
    generation = new_generation()
    handed: dict[str, list[tuple[Event, dict[str, object]]]] = {"ahead": [], "behind": []}

    async def read(name: str, subscriber: Subscriber) -> Event:
        event = await soon(anext(subscriber))
        handed[name].append((event, dict(event)))
        return event

    async with aclosing(subscribe(generation)) as ahead, aclosing(subscribe(generation)) as behind:
        await read("ahead", ahead)
        await read("behind", behind)
        generation.emit_delta("a")
        await read("ahead", ahead)  # only "ahead" has seen seq 1
        generation.emit_delta("b")
        generation.emit_delta("c")
        assert (await read("behind", behind)).get("text") == "a"
        assert (await read("behind", behind)).get("text") == "bc"
        assert (await read("ahead", ahead)).get("text") == "bc"
        generation.emit_delta("d")
        generation.finish(done(generation))
        for name, subscriber in (("ahead", ahead), ("behind", behind)):
            while (await read(name, subscriber))["type"] != "done":
                pass
    for name in ("ahead", "behind"):
        assert all(event == copy for event, copy in handed[name]), f"{name} saw a delta change"
    ahead_events = [copy for _, copy in handed["ahead"]]
    assert ahead_events == [copy for _, copy in handed["behind"]]
    assert deltas(ahead_events) == [(1, "a"), (2, "bc"), (3, "d")]
    assert "".join(str(text) for _, text in deltas(ahead_events)) == generation.text == "abcd"


async def test_tool_call_pieces_share_seq_with_deltas_and_gather_whole_calls() -> None:
    from chatgate.vocabulary import ToolCallDelta

    generation = Generation(id="g", conversation_id="c", agent="general", model="m")
    generation.emit_delta("Let me look.")
    generation.read_from(0)  # the delta has been seen: pieces may not join it
    generation.emit_tool_call(ToolCallDelta(0, None, "get_weather", '{"ci'))
    generation.emit_tool_call(ToolCallDelta(0, None, None, 'ty": "Paris"}'))
    generation.emit_tool_call(ToolCallDelta(1, "given", "get_time", "{}"))
    pieces = [e for e in generation.log if e["type"] == "tool_call"]
    # Unseen pieces of the same call join, as deltas do; a new call starts a new event.
    assert [(p["seq"], p["index"], p["arguments"]) for p in pieces] == [
        (2, 0, '{"city": "Paris"}'), (3, 1, "{}")
    ]
    assert pieces[0]["call_id"] == "call_g_0" and pieces[1]["call_id"] == "given"
    assert generation.tool_calls == [
        {"id": "call_g_0", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"id": "given", "name": "get_time", "arguments": "{}"},
    ]
    replica = Generation(id="g", conversation_id="c", agent="general", model="m", replica=True)
    for event in generation.log:
        replica.replay(event)
    assert replica.tool_calls == generation.tool_calls and replica.seq == 3
