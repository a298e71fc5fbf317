"""The ConversationStore contract, run against every backend."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as redis
from hypothesis import given, settings
from hypothesis import strategies as st

from chatgate.store import ConversationStore, StoredMessage, StoreLimits, open_store
from chatgate.store.base import MAX_OPEN_TURNS
from chatgate.store.memory import MemoryStore
from chatgate.store.redis import PREFIX, RedisStore
from chatgate.store.sqlite import MIGRATIONS, SqliteStore
from chatgate.testing.servers import RedisServer
from chatgate.vocabulary import ToolCall, ToolResult

TTL = 100.0


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def user(content: str, **kwargs: Any) -> StoredMessage:
    return StoredMessage(role="user", content=content, **kwargs)


def assistant(content: str, **kwargs: Any) -> StoredMessage:
    return StoredMessage(role="assistant", content=content, **kwargs)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limits() -> StoreLimits:
    """Overridden per test with ``@pytest.mark.parametrize("limits", [...])``."""
    return StoreLimits(ttl_s=TTL)


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, limits: StoreLimits, clock: FakeClock
) -> AsyncIterator[ConversationStore]:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        url = f"{server.url}/0"
        flushing = redis.Redis.from_url(url)
        await flushing.flushdb()
        await flushing.aclose()
    else:
        url = "memory" if request.param == "memory" else f"sqlite:///{tmp_path}/db/chat.db"
    opened = open_store(url, limits, clock)
    await opened.open()
    yield opened
    await opened.close()


async def contents(store: ConversationStore, conversation_id: str, n: int = 100) -> list[str]:
    return [m.content for m in await store.window(conversation_id, n)]


async def test_store_is_registered_backend(store: ConversationStore) -> None:
    assert isinstance(store, ConversationStore)
    assert store.name in ("memory", "sqlite", "redis")
    await store.ping()


async def test_window_keeps_order_and_returns_last_n(store: ConversationStore) -> None:
    await store.append("c", [user("1"), assistant("2")])
    await store.append("c", [user("3"), assistant("4"), user("5")])

    assert await contents(store, "c") == ["1", "2", "3", "4", "5"]
    assert await contents(store, "c", 2) == ["4", "5"]
    assert await contents(store, "c", 5) == ["1", "2", "3", "4", "5"]
    assert await store.window("c", 0) == []
    assert await store.window("c", -3) == []


async def test_window_of_missing_conversation_is_empty(store: ConversationStore) -> None:
    assert await store.window("nope", 10) == []
    assert await store.get("nope") is None
    assert await store.info("nope") is None


async def test_messages_round_trip_with_partial_flag(store: ConversationStore) -> None:
    sent = [
        StoredMessage(role="system", content="be brief", created_at=1.5),
        user("héllo\nworld ✓", created_at=2.0),
        assistant("half an ans", partial=True, created_at=3.25),
    ]
    await store.append("c", sent)

    assert await store.window("c", 10) == sent
    conversation = await store.get("c")
    assert conversation is not None
    assert conversation.messages == sent
    assert [m.partial for m in conversation.messages] == [False, False, True]
    assert conversation.messages[0].as_prompt() == [{"role": "system", "content": "be brief"}]


async def test_owner_agent_and_title_are_recorded_at_creation(
    store: ConversationStore, clock: FakeClock
) -> None:
    created = clock.now
    long_question = "why " * 40
    await store.append("c", [assistant("hi"), user(long_question)], owner="alice", agent="coder")
    clock.advance(5)
    await store.append("c", [user("second question")], owner="mallory", agent="general")

    info = await store.info("c")
    assert info is not None
    assert (info.id, info.owner, info.agent) == ("c", "alice", "coder")
    assert info.title == long_question[:60]
    assert len(info.title) == 60
    assert info.created_at == created
    assert info.updated_at == created + 5
    assert info.message_count == 3


async def test_title_comes_from_first_user_message_even_if_later(
    store: ConversationStore,
) -> None:
    await store.append("c", [StoredMessage(role="system", content="setup")])
    assert (await store.info("c")).title == ""  # type: ignore[union-attr]
    await store.append("c", [user("what is up")])
    await store.append("c", [user("something else")])
    assert (await store.info("c")).title == "what is up"  # type: ignore[union-attr]


async def test_list_filters_by_owner_most_recent_first(
    store: ConversationStore, clock: FakeClock
) -> None:
    await store.append("a1", [user("x")], owner="alice")
    clock.advance(1)
    await store.append("b1", [user("x")], owner="bob")
    clock.advance(1)
    await store.append("a2", [user("x")], owner="alice")
    clock.advance(1)
    await store.append("anon", [user("x")])
    clock.advance(1)
    await store.append("a1", [assistant("y")], owner="alice")

    assert [i.id for i in await store.list("alice")] == ["a1", "a2"]
    assert [i.id for i in await store.list("alice", limit=1)] == ["a1"]
    assert await store.list("alice", limit=0) == []
    assert [i.id for i in await store.list("bob")] == ["b1"]
    assert [i.id for i in await store.list(None)] == ["anon"]
    assert await store.list("carol") == []
    infos = await store.list("alice")
    assert [i.message_count for i in infos] == [2, 1]


async def test_clear_keeps_conversation_without_messages(
    store: ConversationStore, clock: FakeClock
) -> None:
    await store.append("c", [user("question"), assistant("answer")], owner="alice")
    clock.advance(7)
    await store.clear("c")

    assert await store.window("c", 10) == []
    info = await store.info("c")
    assert info is not None
    assert (info.message_count, info.owner, info.updated_at) == (0, "alice", clock.now)
    assert [i.id for i in await store.list("alice")] == ["c"]
    await store.append("c", [user("again")])
    assert await contents(store, "c") == ["again"]


async def test_clear_of_missing_conversation_creates_nothing(store: ConversationStore) -> None:
    await store.clear("nope")
    assert await store.info("nope") is None
    assert await store.list(None) == []


async def test_delete(store: ConversationStore) -> None:
    await store.append("c", [user("x")])
    await store.append("keep", [user("y")])

    assert await store.delete("c") is True
    assert await store.delete("c") is False
    assert await store.delete("never") is False
    assert await store.get("c") is None
    assert await store.window("c", 10) == []
    assert await contents(store, "keep") == ["y"]


async def test_expiry_follows_the_clock(store: ConversationStore, clock: FakeClock) -> None:
    await store.append("old", [user("x")], owner="alice")
    clock.advance(50)
    await store.append("young", [user("y")], owner="alice")

    clock.advance(TTL - 50)  # "old" is exactly ttl_s idle: still alive
    assert await contents(store, "old") == ["x"]
    assert (await store.info("old")) is not None
    assert [i.id for i in await store.list("alice")] == ["young", "old"]

    clock.advance(0.01)
    assert await store.window("old", 10) == []
    assert await store.get("old") is None
    assert await store.info("old") is None
    assert [i.id for i in await store.list("alice")] == ["young"]
    assert await contents(store, "young") == ["y"]


async def test_reads_do_not_extend_life(store: ConversationStore, clock: FakeClock) -> None:
    await store.append("c", [user("x")])
    for _ in range(3):
        clock.advance(TTL / 2)
        await store.window("c", 10)
        await store.info("c")
    assert await store.get("c") is None


async def test_writes_extend_life(store: ConversationStore, clock: FakeClock) -> None:
    await store.append("appended", [user("x")])
    await store.append("cleared", [user("x")])
    for _ in range(3):
        clock.advance(TTL / 2)
        await store.append("appended", [user("more")])
        await store.clear("cleared")
    assert await store.info("appended") is not None
    assert await store.info("cleared") is not None


async def test_purge_expired_counts_deleted(store: ConversationStore, clock: FakeClock) -> None:
    await store.append("a", [user("x")])
    await store.append("b", [user("x"), assistant("y")])
    clock.advance(60)
    await store.append("c", [user("x")])
    assert await store.purge_expired() == 0

    clock.advance(TTL - 59)
    assert await store.purge_expired() == 2
    assert await store.purge_expired() == 0
    assert await contents(store, "c") == ["x"]


async def test_append_to_expired_id_starts_afresh(
    store: ConversationStore, clock: FakeClock
) -> None:
    await store.append("c", [user("old question")], owner="alice", agent="coder")
    clock.advance(TTL + 1)
    await store.append("c", [user("new question")], owner="bob", agent="general")

    conversation = await store.get("c")
    assert conversation is not None
    assert [m.content for m in conversation.messages] == ["new question"]
    info = conversation.info
    assert (info.owner, info.agent, info.title) == ("bob", "general", "new question")
    assert info.created_at == clock.now


@pytest.mark.parametrize("limits", [StoreLimits(ttl_s=TTL, max_conversations=3)], ids=["cap3"])
async def test_least_recently_written_is_evicted(
    store: ConversationStore, clock: FakeClock
) -> None:
    for cid in ["a", "b", "c"]:
        await store.append(cid, [user(cid)])
        clock.advance(1)
    await store.window("a", 10)  # a read does not count as use
    await store.append("d", [user("d")])
    clock.advance(1)
    assert await store.info("a") is None
    assert await contents(store, "b") == ["b"]

    await store.append("b", [assistant("touched")])  # now c is the oldest write
    clock.advance(1)
    await store.append("e", [user("e")])

    assert await store.info("c") is None
    assert sorted(i.id for i in await store.list(None)) == ["b", "d", "e"]
    assert await contents(store, "b") == ["b", "touched"]


@pytest.mark.parametrize("limits", [StoreLimits(ttl_s=TTL, max_conversations=3)], ids=["cap3"])
async def test_clear_counts_as_use_for_eviction(store: ConversationStore, clock: FakeClock) -> None:
    for cid in ["a", "b", "c"]:
        await store.append(cid, [user(cid)])
        clock.advance(1)
    await store.clear("a")
    clock.advance(1)
    await store.append("d", [user("d")])

    assert await store.info("a") is not None
    assert await store.info("b") is None


@pytest.mark.parametrize("limits", [StoreLimits(ttl_s=TTL, max_messages=3)], ids=["keep3"])
async def test_oldest_messages_are_dropped_over_max(store: ConversationStore) -> None:
    await store.append("c", [user("1"), assistant("2")])
    await store.append("c", [user("3"), assistant("4")])
    assert await contents(store, "c") == ["2", "3", "4"]

    await store.append("c", [user(str(n)) for n in range(5, 10)])
    assert await contents(store, "c") == ["7", "8", "9"]
    assert (await store.info("c")).message_count == 3  # type: ignore[union-attr]
    assert (await store.info("c")).title == "1"  # type: ignore[union-attr]


async def test_concurrent_writes_and_reads_do_not_interleave(store: ConversationStore) -> None:
    async def chat(cid: str) -> list[str]:
        for n in range(5):
            await store.append(cid, [user(f"{cid}{n}"), assistant(f"{cid}{n}!")])
        return await contents(store, cid)

    results = await asyncio.gather(*(chat(f"c{i}") for i in range(10)))

    for i, got in enumerate(results):
        assert got == [f"c{i}{n}{bang}" for n in range(5) for bang in ("", "!")]


async def test_cancelled_writes_leave_store_usable(store: ConversationStore) -> None:
    for yields in range(8):
        task = asyncio.create_task(store.append("c", [user(str(yields))]))
        for _ in range(yields):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    await store.append("c", [user("last")])
    got = await contents(store, "c")
    assert got[-1] == "last"
    assert got == sorted(got, key=lambda c: (c == "last", c))  # no reordering, no duplicates
    assert len(got) == len(set(got))


# Turns written as they happen -----------------------------------------------------------


async def open_turn_records(store: ConversationStore) -> int:
    """How many open-turn records the backend holds, wherever it keeps them: the contract
    says they do not pile up, which no public method can show."""
    if isinstance(store, MemoryStore):
        return len(store._turns)
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as db:
            (count,) = db.execute("SELECT COUNT(*) FROM open_turns").fetchone()
        db.close()
        return int(count)
    assert isinstance(store, RedisStore)
    client = redis.Redis.from_url(store.url)
    try:
        turns = await client.keys(f"{PREFIX}turn:*")
        per_conversation = await client.keys(f"{PREFIX}turns:*")
    finally:
        await client.aclose()
    return len(turns) + len(per_conversation)


async def test_begun_turn_shows_the_user_message(
    store: ConversationStore, clock: FakeClock
) -> None:
    await store.begin_turn("c", "t1", user("why is the sky blue?"), owner="alice", agent="coder")

    assert await store.window("c", 10) == [user("why is the sky blue?")]
    info = await store.info("c")
    assert info is not None
    assert (info.owner, info.agent, info.title, info.message_count) == (
        "alice",
        "coder",
        "why is the sky blue?",
        1,
    )
    assert info.created_at == info.updated_at == clock.now
    assert [i.id for i in await store.list("alice")] == ["c"]


async def test_checkpoints_keep_one_partial_answer_in_place(
    store: ConversationStore, clock: FakeClock
) -> None:
    await store.append("c", [user("earlier"), assistant("reply")])
    await store.begin_turn("c", "t1", user("question"))
    clock.advance(1)
    await store.checkpoint("c", "t1", "The sky")
    assert await store.window("c", 10) == [
        user("earlier"),
        assistant("reply"),
        user("question"),
        assistant("The sky", partial=True, created_at=clock.now),
    ]

    for text in ("The sky is", "The sky is blue because"):
        clock.advance(1)
        await store.checkpoint("c", "t1", text)
    window = await store.window("c", 10)
    assert window[-1] == assistant("The sky is blue because", partial=True, created_at=clock.now)
    assert [m.content for m in window[:-1]] == ["earlier", "reply", "question"]
    info = await store.info("c")
    assert info is not None
    assert (info.message_count, info.updated_at) == (4, clock.now)


@pytest.mark.parametrize("partial", [False, True])
async def test_end_writes_the_final_answer(store: ConversationStore, partial: bool) -> None:
    await store.begin_turn("c", "t1", user("question"))
    await store.checkpoint("c", "t1", "half")
    final = assistant("the whole answer", partial=partial, created_at=7.5)
    await store.end_turn("c", "t1", final)

    assert await store.window("c", 10) == [user("question"), final]
    assert (await store.info("c")).message_count == 2  # type: ignore[union-attr]
    await store.end_turn("c", "t1", assistant("again"))  # closed: nothing happens
    await store.checkpoint("c", "t1", "late")
    assert await store.window("c", 10) == [user("question"), final]


async def test_end_without_checkpoint_appends_the_answer(store: ConversationStore) -> None:
    await store.begin_turn("c", "t1", user("question"))
    await store.end_turn("c", "t1", assistant("answer"))
    assert await store.window("c", 10) == [user("question"), assistant("answer")]


async def test_end_with_nothing_answered_takes_the_turn_back(
    store: ConversationStore, clock: FakeClock
) -> None:
    await store.append("old", [user("earlier"), assistant("reply")], owner="alice")
    for checkpointed in (False, True):
        await store.begin_turn("old", f"t-{checkpointed}", user("question"), owner="alice")
        if checkpointed:
            await store.checkpoint("old", f"t-{checkpointed}", "half")
        clock.advance(1)
        await store.end_turn("old", f"t-{checkpointed}", None)
        assert await contents(store, "old") == ["earlier", "reply"]
        info = await store.info("old")
        assert info is not None
        assert (info.message_count, info.title, info.updated_at) == (2, "earlier", clock.now)

    await store.begin_turn("new", "t-new", user("first words"), owner="alice")
    await store.checkpoint("new", "t-new", "half")
    await store.end_turn("new", "t-new", None)
    assert await store.info("new") is None  # only this turn made it: nothing to keep
    assert [i.id for i in await store.list("alice")] == ["old"]
    assert await store.interrupted("t-new") is None
    assert await open_turn_records(store) == 0


async def test_a_conversation_the_turn_made_stays_when_another_writer_used_it(
    store: ConversationStore,
) -> None:
    await store.begin_turn("c", "t1", user("question"))
    await store.append("c", [user("from elsewhere")])
    await store.end_turn("c", "t1", None)
    assert await contents(store, "c") == ["from elsewhere"]


async def test_interrupted_names_the_conversation_of_an_unfinished_turn(
    store: ConversationStore,
) -> None:
    assert await store.interrupted("owner/never-begun") is None
    await store.begin_turn("alice:c", "alice/gen-1", user("question"), owner="alice")
    assert await store.interrupted("alice/gen-1") == "alice:c"
    await store.checkpoint("alice:c", "alice/gen-1", "half")
    assert await store.interrupted("alice/gen-1") == "alice:c"
    assert await store.interrupted("alice/gen-2") is None

    await store.end_turn("alice:c", "alice/gen-1", assistant("done"))
    assert await store.interrupted("alice/gen-1") is None
    assert await open_turn_records(store) == 0


async def test_a_turn_is_written_only_to_its_own_conversation(store: ConversationStore) -> None:
    await store.begin_turn("a", "t1", user("question"))
    await store.append("b", [user("other")])
    await store.checkpoint("b", "t1", "misdirected")
    await store.end_turn("b", "t1", assistant("misdirected"))
    assert await contents(store, "b") == ["other"]
    assert await store.interrupted("t1") == "a"


@pytest.mark.parametrize("erase", ["clear", "delete"])
async def test_erased_history_stays_erased(
    store: ConversationStore, clock: FakeClock, erase: str
) -> None:
    await store.append("c", [user("earlier"), assistant("reply")], owner="alice")
    await store.begin_turn("c", "t1", user("question"), owner="alice")
    await store.checkpoint("c", "t1", "half")
    clock.advance(1)
    await (store.clear("c") if erase == "clear" else store.delete("c"))
    erased = await store.info("c")

    clock.advance(1)
    await store.checkpoint("c", "t1", "more")
    await store.end_turn("c", "t1", assistant("all of it"))
    await store.end_turn("c", "t1", None)

    assert await store.info("c") == erased
    assert await store.window("c", 10) == []
    assert await store.interrupted("t1") is None
    assert await open_turn_records(store) == 0
    if erase == "clear":  # the conversation goes on with new turns
        await store.begin_turn("c", "t2", user("again"), owner="alice")
        await store.end_turn("c", "t2", assistant("yes"))
        assert await contents(store, "c") == ["again", "yes"]


async def test_interleaved_turns_in_two_conversations(store: ConversationStore) -> None:
    await store.begin_turn("a", "ta", user("a?"), owner="alice")
    await store.begin_turn("b", "tb", user("b?"), owner="bob")
    for n in range(1, 4):
        await store.checkpoint("a", "ta", "a" * n)
        await store.checkpoint("b", "tb", "b" * n)
    assert await store.interrupted("ta") == "a"
    assert await store.interrupted("tb") == "b"
    await store.end_turn("b", "tb", None)
    await store.end_turn("a", "ta", assistant("a!"))

    assert await store.window("a", 10) == [user("a?"), assistant("a!")]
    assert await store.info("b") is None
    assert await store.interrupted("ta") is None
    assert await store.interrupted("tb") is None


async def test_answer_follows_messages_another_writer_added(store: ConversationStore) -> None:
    await store.begin_turn("c", "t1", user("question"))
    await store.append("c", [user("meanwhile")])
    await store.checkpoint("c", "t1", "half")
    await store.append("c", [user("and"), user("more")])
    await store.checkpoint("c", "t1", "nearly")
    assert await contents(store, "c") == ["question", "meanwhile", "nearly", "and", "more"]
    await store.end_turn("c", "t1", None)
    assert await contents(store, "c") == ["meanwhile", "and", "more"]


async def test_windowed_read_of_a_long_conversation_mid_turn(store: ConversationStore) -> None:
    for n in range(20):
        await store.append("c", [user(f"q{n}"), assistant(f"a{n}")])
    await store.begin_turn("c", "t1", user("last question"))
    await store.checkpoint("c", "t1", "so far")

    assert [(m.content, m.partial) for m in await store.window("c", 1)] == [("so far", True)]
    assert await contents(store, "c", 3) == ["a19", "last question", "so far"]
    assert len(await store.window("c", 100)) == 42
    assert (await store.info("c")).message_count == 42  # type: ignore[union-attr]


@pytest.mark.parametrize("limits", [StoreLimits(ttl_s=TTL, max_messages=3)], ids=["keep3"])
async def test_turns_respect_the_message_cap(store: ConversationStore) -> None:
    await store.append("c", [user("1"), assistant("2"), user("3")])
    await store.begin_turn("c", "t1", user("4"))
    assert await contents(store, "c") == ["2", "3", "4"]
    await store.checkpoint("c", "t1", "5")
    await store.checkpoint("c", "t1", "5!")
    assert await contents(store, "c") == ["3", "4", "5!"]
    await store.end_turn("c", "t1", assistant("5!!"))
    assert await contents(store, "c") == ["3", "4", "5!!"]
    assert (await store.info("c")).message_count == 3  # type: ignore[union-attr]


async def test_expiry_closes_open_turns(store: ConversationStore, clock: FakeClock) -> None:
    await store.begin_turn("c", "t1", user("question"))
    await store.checkpoint("c", "t1", "half")
    clock.advance(TTL / 2)
    await store.checkpoint("c", "t1", "more")  # a checkpoint is a write: it extends life
    clock.advance(TTL / 2 + 1)
    assert await store.interrupted("t1") == "c"

    clock.advance(TTL / 2)
    assert await store.interrupted("t1") is None
    await store.checkpoint("c", "t1", "too late")
    await store.end_turn("c", "t1", assistant("too late"))
    assert await store.info("c") is None
    assert await store.purge_expired() == 1
    assert await open_turn_records(store) == 0


async def test_a_new_conversation_on_an_expired_id_forgets_its_turns(
    store: ConversationStore, clock: FakeClock
) -> None:
    await store.begin_turn("c", "t1", user("old"))
    clock.advance(TTL + 1)
    await store.begin_turn("c", "t2", user("new"))
    await store.checkpoint("c", "t1", "stale")
    assert await store.interrupted("t1") is None
    assert await store.interrupted("t2") == "c"
    assert await contents(store, "c") == ["new"]


@pytest.mark.parametrize("limits", [StoreLimits(ttl_s=TTL, max_conversations=2)], ids=["cap2"])
async def test_eviction_closes_open_turns(store: ConversationStore, clock: FakeClock) -> None:
    await store.begin_turn("a", "ta", user("a"))
    clock.advance(1)
    await store.begin_turn("b", "tb", user("b"))
    clock.advance(1)
    await store.checkpoint("a", "ta", "a is used again")  # now b is the oldest write
    clock.advance(1)
    await store.begin_turn("c", "tc", user("c"))

    assert await store.info("b") is None
    assert await store.interrupted("tb") is None
    assert (await store.interrupted("ta"), await store.interrupted("tc")) == ("a", "c")
    assert await open_turn_records(store) in (2, 4)  # Redis: a key per turn, a set per conversation


async def test_open_turns_per_conversation_are_bounded(store: ConversationStore) -> None:
    crashed = [f"gen-{n}" for n in range(MAX_OPEN_TURNS + 2)]
    for turn_id in crashed:  # every process died before the end
        await store.begin_turn("c", turn_id, user(turn_id))
        await store.checkpoint("c", turn_id, f"half of {turn_id}")

    assert [await store.interrupted(t) for t in crashed[:2]] == [None, None]
    assert all([await store.interrupted(t) == "c" for t in crashed[2:]])
    assert await contents(store, "c", 4) == [
        crashed[-2],
        f"half of {crashed[-2]}",
        crashed[-1],
        f"half of {crashed[-1]}",
    ]
    records = await open_turn_records(store)
    assert records in (MAX_OPEN_TURNS, MAX_OPEN_TURNS + 1)
    await store.delete("c")
    assert await open_turn_records(store) == 0


async def test_a_crashed_turn_stays_in_history_as_partial(store: ConversationStore) -> None:
    await store.begin_turn("c", "dead", user("first"))
    await store.checkpoint("c", "dead", "cut off")
    await store.begin_turn("c", "next", user("second"))
    await store.end_turn("c", "next", assistant("answered"))

    window = await store.window("c", 10)
    assert [(m.content, m.partial) for m in window] == [
        ("first", False),
        ("cut off", True),
        ("second", False),
        ("answered", False),
    ]
    assert await store.interrupted("dead") == "c"


async def test_cancelled_turn_writes_leave_store_usable(store: ConversationStore) -> None:
    await store.begin_turn("c", "t1", user("question"))
    for yields in range(8):
        task = asyncio.create_task(store.checkpoint("c", "t1", f"text {yields}"))
        for _ in range(yields):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await store.checkpoint("c", "t1", "last")
    assert await contents(store, "c") == ["question", "last"]


# Tool calls and tool results -------------------------------------------------------------

CALLS: tuple[ToolCall, ...] = (
    {"id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'},
    {"id": "call_2", "name": "time", "arguments": "{}"},
)
RESULTS: tuple[ToolResult, ...] = (
    {"tool_call_id": "call_1", "content": '{"sky": "blue ✓"}'},
    {"tool_call_id": "call_2", "content": "12:00", "name": "time"},
)


def tool_turn(**kwargs: Any) -> StoredMessage:
    return StoredMessage(role="tool", content="", tool_results=RESULTS, **kwargs)


@pytest.mark.parametrize("path", ["append", "end", "end after checkpoint"])
async def test_an_answer_keeps_its_tool_calls(store: ConversationStore, path: str) -> None:
    calling = assistant("", created_at=2.5, tool_calls=CALLS)
    if path == "append":
        await store.append("c", [user("weather?"), calling, assistant("later")])
        expected = [user("weather?"), calling, assistant("later")]
    else:
        await store.begin_turn("c", "t1", user("weather?"))
        if path == "end after checkpoint":
            await store.checkpoint("c", "t1", "thinking")
        await store.end_turn("c", "t1", calling)
        expected = [user("weather?"), calling]

    assert await store.window("c", 10) == expected
    conversation = await store.get("c")
    assert conversation is not None
    assert conversation.messages == expected
    assert conversation.messages[1].tool_calls == CALLS
    assert conversation.messages[1].as_prompt() == [
        {"role": "assistant", "content": "", "tool_calls": list(CALLS)}
    ]


async def test_a_tool_results_turn_round_trips(store: ConversationStore) -> None:
    calling = assistant("", tool_calls=CALLS)
    await store.begin_turn("c", "t1", user("weather?"), owner="alice")
    await store.end_turn("c", "t1", calling)
    await store.begin_turn("c", "t2", tool_turn(created_at=3.0), owner="alice")
    await store.end_turn("c", "t2", assistant("Blue skies at noon.", created_at=4.0))

    expected = [
        user("weather?"),
        calling,
        tool_turn(created_at=3.0),
        assistant("Blue skies at noon.", created_at=4.0),
    ]
    assert await store.window("c", 10) == expected
    assert await store.window("c", 2) == expected[2:]
    conversation = await store.get("c")
    assert conversation is not None
    assert conversation.messages == expected
    assert conversation.messages[2].tool_results == RESULTS
    assert (conversation.info.title, conversation.info.message_count) == ("weather?", 4)


async def test_a_stored_tool_message_prompts_one_message_per_result(
    store: ConversationStore,
) -> None:
    await store.begin_turn("c", "t1", tool_turn())
    await store.end_turn("c", "t1", assistant("done"))

    stored, _answer = await store.window("c", 10)
    assert stored.as_prompt() == [
        {"role": "tool", "content": '{"sky": "blue ✓"}', "tool_call_id": "call_1"},
        {"role": "tool", "content": "12:00", "tool_call_id": "call_2", "name": "time"},
    ]


async def test_checkpoints_of_a_tool_results_turn(
    store: ConversationStore, clock: FakeClock
) -> None:
    await store.append("c", [user("weather?"), assistant("", tool_calls=CALLS)])
    await store.begin_turn("c", "t1", tool_turn())
    for text in ("Blue", "Blue skies"):
        clock.advance(1)
        await store.checkpoint("c", "t1", text)
    half = assistant("Blue skies", partial=True, created_at=clock.now)
    assert (await store.window("c", 10))[2:] == [tool_turn(), half]
    assert await store.interrupted("t1") == "c"

    calling_again = assistant("", tool_calls=CALLS[1:])
    await store.end_turn("c", "t1", calling_again)
    assert (await store.window("c", 10))[2:] == [tool_turn(), calling_again]

    await store.begin_turn("c", "t2", tool_turn())  # a turn taken back leaves no results
    await store.checkpoint("c", "t2", "half")
    await store.end_turn("c", "t2", None)
    assert (await store.window("c", 10))[2:] == [tool_turn(), calling_again]
    assert await open_turn_records(store) == 0


async def test_a_stored_answer_does_not_share_the_callers_dicts(
    store: ConversationStore,
) -> None:
    calls = [{"id": "call_1", "name": "weather", "arguments": ""}]
    await store.begin_turn("c", "t1", user("weather?"))
    await store.end_turn("c", "t1", assistant("", tool_calls=tuple(calls)))  # type: ignore[arg-type]
    await store.append("c", [assistant("", tool_calls=tuple(calls))])  # type: ignore[arg-type]
    calls[0]["arguments"] = "changed after the write"

    _question, *answers = await store.window("c", 10)
    assert [m.tool_calls[0]["arguments"] for m in answers] == ["", ""]


async def test_redis_keeps_the_turn_id_last_and_reads_older_entries(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    url = f"{redis_server.url}/2"
    client = redis.Redis.from_url(url)
    await client.flushdb()
    store = open_store(url, StoreLimits(ttl_s=TTL), clock)
    await store.open()
    try:
        await store.begin_turn("c", "t1", tool_turn())
        await store.end_turn("c", "t1", assistant("", tool_calls=CALLS))
        await store.append("c", [assistant("", tool_calls=CALLS)])
        entries = [orjson.loads(raw) for raw in await client.lrange(f"{PREFIX}m:c", 0, -1)]
        assert [entry[4:] for entry in entries] == [
            [{"tool_results": list(RESULTS)}, "t1"],
            [{"tool_calls": list(CALLS)}, "t1"],
            [{"tool_calls": list(CALLS)}],
        ]

        # Entries as chatgate wrote them before messages had tool fields, one an open turn's.
        await store.delete("c")
        await store.begin_turn("c", "old", user("placeholder"))
        await client.delete(f"{PREFIX}m:c")
        await client.rpush(
            f"{PREFIX}m:c",
            orjson.dumps(["user", "hi", False, 1.0]),
            orjson.dumps(["user", "question", False, 2.0, "old"]),
            orjson.dumps(["assistant", "half", True, 3.0, "old"]),
        )
        await store.end_turn("c", "old", assistant("whole", tool_calls=CALLS[:1]))
        assert await store.window("c", 10) == [
            user("hi", created_at=1.0),
            user("question", created_at=2.0),
            assistant("whole", tool_calls=CALLS[:1]),
        ]
    finally:
        await store.close()
        await client.aclose()


async def test_redis_turn_keys_expire_with_their_conversation(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    url = f"{redis_server.url}/1"
    client = redis.Redis.from_url(url)
    await client.flushdb()
    store = open_store(url, StoreLimits(ttl_s=TTL), clock)
    await store.open()
    try:
        expiring = [f"{PREFIX}{key}" for key in ("c:c", "m:c", "turn:ns/gen", "turns:c")]
        await store.begin_turn("c", "ns/gen", user("question"))
        ttls = [await client.ttl(key) for key in expiring]
        assert all(0 < ttl <= TTL + 60 for ttl in ttls), ttls
        await store.checkpoint("c", "ns/gen", "half")
        ttls = [await client.ttl(key) for key in expiring]
        assert all(0 < ttl <= TTL + 60 for ttl in ttls), ttls
        entries = [orjson.loads(raw) for raw in await client.lrange(f"{PREFIX}m:c", 0, -1)]
        assert [len(entry) for entry in entries] == [5, 5]
        await store.append("c", [user("plain")])
        assert len(orjson.loads(await client.lindex(f"{PREFIX}m:c", -1))) == 4
    finally:
        await store.close()
        await client.aclose()


async def test_sqlite_persists_across_reopen(tmp_path: Path, clock: FakeClock) -> None:
    url = f"sqlite:///{tmp_path}/nested/dir/chat.db"
    first = open_store(url, StoreLimits(ttl_s=TTL), clock)
    await first.open()
    await first.append("c", [user("q"), assistant("a", partial=True)], owner="alice")
    await first.close()

    second = open_store(url, StoreLimits(ttl_s=TTL), clock)
    await second.open()
    try:
        conversation = await second.get("c")
        assert conversation is not None
        assert conversation.info.owner == "alice"
        assert conversation.messages == [user("q"), assistant("a", partial=True)]
    finally:
        await second.close()


async def test_sqlite_migrations_are_idempotent(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "chat.db"
    for round_ in range(2):
        store = open_store(f"sqlite:///{path}", StoreLimits(ttl_s=TTL), clock)
        await store.open()
        await store.append("c", [user(str(round_))])
        await store.close()

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT content FROM messages ORDER BY id").fetchall() == [
            ("0",),
            ("1",),
        ]
    db.close()


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "chat.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    store = open_store(f"sqlite:///{path}", StoreLimits(), clock)
    with pytest.raises(RuntimeError, match="newer"):
        await store.open()


async def test_sqlite_in_memory_url(clock: FakeClock) -> None:
    store = open_store("sqlite:///:memory:", StoreLimits(), clock)
    await store.open()
    try:
        await store.append("c", [user("x")])
        assert await contents(store, "c") == ["x"]
    finally:
        await store.close()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite://host/x.db", "nosuch://x"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(url, StoreLimits())


# One step of a random history: (conversation, action, payload, seconds to advance).
steps = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(
            ["append", "append", "append", "clear", "delete", "begin", "checkpoint", "end", "end"]
        ),
        st.lists(
            st.tuples(st.sampled_from(["user", "assistant"]), st.text(max_size=8), st.booleans()),
            max_size=4,
        ),
        st.floats(min_value=0.5, max_value=40),
    ),
    max_size=25,
)


async def replay(history: list[Any]) -> None:
    clock = FakeClock()
    limits = StoreLimits(ttl_s=TTL, max_conversations=3, max_messages=5)
    stores = [open_store(url, limits, clock) for url in ["memory", "sqlite:///:memory:"]]
    for store in stores:
        await store.open()
    # A checkpoint or end names the conversation's latest turn, open or not; in one that
    # never began a turn it names conversation a's, which must write nothing there.
    latest: dict[str, str] = {}
    begun: list[str] = []
    try:
        for step, (cid, action, payload, seconds) in enumerate(history):
            messages = [StoredMessage(role=r, content=c, partial=p) for r, c, p in payload]
            text = "".join(m.content for m in messages)
            if action == "begin":
                latest[cid] = f"{cid}/{step}"
                begun.append(latest[cid])
            turn_id = latest.get(cid) or latest.get("a", "a/none")
            for store in stores:
                owner = "o" if cid < "c" else None
                if action == "append":
                    await store.append(cid, messages, owner=owner)
                elif action == "clear":
                    await store.clear(cid)
                elif action == "delete":
                    await store.delete(cid)
                elif action == "begin":
                    await store.begin_turn(cid, turn_id, user(text), owner=owner)
                elif action == "checkpoint":
                    await store.checkpoint(cid, turn_id, text)
                else:
                    answer = assistant(text, partial=len(messages) == 1) if messages else None
                    await store.end_turn(cid, turn_id, answer)
            clock.advance(seconds)
            memory, sqlite = stores
            for other in "abcd":
                assert await memory.window(other, 4) == await sqlite.window(other, 4)
                assert await memory.info(other) == await sqlite.info(other)
            for owner in ("o", None):
                assert await memory.list(owner) == await sqlite.list(owner)
            for turn_id in begun:
                assert await memory.interrupted(turn_id) == await sqlite.interrupted(turn_id)
        assert await stores[0].purge_expired() == await stores[1].purge_expired()
    finally:
        for store in stores:
            await store.close()


@settings(max_examples=50, deadline=None)
@given(steps)
def test_memory_and_sqlite_agree_on_random_histories(history: list[Any]) -> None:
    asyncio.run(replay(history))
