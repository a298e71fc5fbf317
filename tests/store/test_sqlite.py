"""The SQLite store's thread: one per open store, gone after close() or a failed open()."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from chatgate.store import StoredMessage, StoreLimits, open_store
from chatgate.store.sqlite import MIGRATIONS


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
