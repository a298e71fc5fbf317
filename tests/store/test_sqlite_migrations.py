"""A database written by an earlier chatgate opens with its conversations where the
current one looks for them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from chatgate.chat.service import conversation_key
from chatgate.store import StoreLimits, open_store
from chatgate.store.sqlite import MIGRATIONS


def _version_one_database(path: Path) -> None:
    """The schema and rows of a version-1 database: conversation ids not yet scoped."""
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY, owner TEXT NULL, agent TEXT NOT NULL,
            title TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, updated_at REAL NOT NULL);
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL, content TEXT NOT NULL, partial INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL);
        CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
        CREATE INDEX conversations_by_updated ON conversations(updated_at);
        INSERT INTO conversations VALUES ('c1', 'owner1', 'general', 'hi', 100, 100);
        INSERT INTO conversations VALUES ('c2', NULL, 'general', 'anon', 100, 100);
        INSERT INTO messages (conversation_id, role, content, created_at) VALUES ('c1', 'user', 'hi', 100);
        INSERT INTO messages (conversation_id, role, content, created_at) VALUES ('c1', 'assistant', 'hello', 100);
        INSERT INTO messages (conversation_id, role, content, created_at) VALUES ('c2', 'user', 'anon', 100);
        PRAGMA user_version = 1;
        """
    )
    db.commit()
    db.close()


async def test_owned_conversations_move_into_their_owners_namespace(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _version_one_database(path)
    store = open_store(f"sqlite:///{path}", StoreLimits(ttl_s=1e9), clock=lambda: 200.0)
    await store.open()
    try:
        owned = await store.get(conversation_key("owner1", "c1"))
        assert owned is not None
        assert owned.info.owner == "owner1"
        assert [m.content for m in owned.messages] == ["hi", "hello"]
        assert await store.get("c1") is None
        anonymous = await store.get(conversation_key(None, "c2"))
        assert anonymous is not None
        assert [m.content for m in anonymous.messages] == ["anon"]
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
