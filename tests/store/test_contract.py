"""The ConversationStore contract, run against every backend."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from hypothesis import given, settings
from hypothesis import strategies as st

from chatgate.store import ConversationStore, StoredMessage, StoreLimits, open_store
from chatgate.store.sqlite import MIGRATIONS
from chatgate.testing.servers import RedisServer

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
    assert conversation.messages[0].as_prompt() == {"role": "system", "content": "be brief"}


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
        st.sampled_from(["append", "append", "append", "clear", "delete"]),
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
    try:
        for cid, action, payload, seconds in history:
            messages = [StoredMessage(role=r, content=c, partial=p) for r, c, p in payload]
            for store in stores:
                if action == "append":
                    await store.append(cid, messages, owner="o" if cid < "c" else None)
                elif action == "clear":
                    await store.clear(cid)
                else:
                    await store.delete(cid)
            clock.advance(seconds)
            memory, sqlite = stores
            for other in "abcd":
                assert await memory.window(other, 4) == await sqlite.window(other, 4)
                assert await memory.info(other) == await sqlite.info(other)
            for owner in ("o", None):
                assert await memory.list(owner) == await sqlite.list(owner)
        assert await stores[0].purge_expired() == await stores[1].purge_expired()
    finally:
        for store in stores:
            await store.close()


@settings(max_examples=50, deadline=None)
@given(steps)
def test_memory_and_sqlite_agree_on_random_histories(history: list[Any]) -> None:
    asyncio.run(replay(history))
