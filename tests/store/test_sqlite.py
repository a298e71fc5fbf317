"""The SQLite store's thread: one per open store, gone after close() or a failed open();
what runs on it rather than on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from pathlib import Path

import pytest

from chatgate.store import StoredMessage, StoreLimits, open_store
from chatgate.store.sqlite import MIGRATIONS, WRITES_PER_CHECKPOINT


def store_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("chatgate-sqlite")}


async def test_close_ends_the_thread_after_the_calls_queued_before_it(tmp_path: Path) -> None:
    before = store_threads()
    store = open_store(f"sqlite:///{tmp_path}/chat.db", StoreLimits())
    await store.open()
    assert len(store_threads() - before) == 1

    writes = [
        asyncio.ensure_future(store.append("c", [StoredMessage("user", str(n))])) for n in range(20)
    ]
    await asyncio.sleep(0)  # each write is on the thread's queue
    await store.close()

    assert store_threads() - before == set()
    await asyncio.gather(*writes)
    with sqlite3.connect(tmp_path / "chat.db") as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone() == (20,)
    db.close()
    with pytest.raises(RuntimeError, match="after close"):
        await store.window("c", 10)
    await store.close()


async def test_a_failed_open_ends_its_thread(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    before = store_threads()
    store = open_store(f"sqlite:///{path}", StoreLimits())

    with pytest.raises(RuntimeError, match="newer"):
        await store.open()

    for thread in store_threads() - before:
        thread.join(timeout=5)
    assert store_threads() - before == set()


async def test_while_another_process_writes_calls_wait_on_the_thread_in_order(tmp_path: Path) -> None:
    """The loop's connection never waits for a lock: the calls made while another process
    (a second worker) holds the write lock queue for the thread and run, in the order they
    were made, once it lets go; the loop runs meanwhile."""
    path = tmp_path / "chat.db"
    store = open_store(f"sqlite:///{path}", StoreLimits())
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        calls = [
            asyncio.ensure_future(store.begin_turn("c", "t1", StoredMessage("user", "hi"))),
            asyncio.ensure_future(store.checkpoint("c", "t1", "hel")),
            asyncio.ensure_future(store.end_turn("c", "t1", StoredMessage("assistant", "hello"))),
        ]
        for _ in range(20):  # the loop is free: these tasks and this one keep taking turns
            await asyncio.sleep(0)
        assert not any(call.done() for call in calls)
        other.execute("COMMIT")
        await asyncio.wait_for(asyncio.gather(*calls), 10)
        assert [(m.content, m.partial) for m in await store.window("c", 10)] == [("hi", False), ("hello", False)]
    finally:
        other.close()
        await store.close()


async def test_the_thread_copies_the_log_into_the_database_file(tmp_path: Path) -> None:
    """The loop's connection never checkpoints (that syncs to disk); the thread does, every
    ``WRITES_PER_CHECKPOINT`` writes: the database file alone, without its log, has them."""
    path = tmp_path / "chat.db"
    store = open_store(f"sqlite:///{path}", StoreLimits())
    await store.open()
    try:
        for n in range(WRITES_PER_CHECKPOINT):
            await store.append(f"c{n}", [StoredMessage("user", str(n))])
        file_only = f"file:{path}?immutable=1"  # reads the database file, ignoring the log

        def in_file() -> int:
            with contextlib.closing(sqlite3.connect(file_only, uri=True)) as db:
                if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages'").fetchone() is None:
                    return 0  # not even the schema yet: it was written to the log too
                return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

        for _ in range(500):  # the checkpoint runs beside the calls; bounded wait for it
            if in_file() == WRITES_PER_CHECKPOINT:
                break
            await asyncio.to_thread(threading.Event().wait, 0.01)
        assert in_file() == WRITES_PER_CHECKPOINT
    finally:
        await store.close()
