"""A database written by an earlier chatgate opens with its conversations where the
current one looks for them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from chatgate.chat.service import conversation_key
from chatgate.store import StoredMessage, StoreLimits, open_store
from chatgate.store.sqlite import MIGRATIONS
from chatgate.vocabulary import ToolCall, ToolResult

#: The tables of the first schema (version 1), which later versions changed.
FIRST_TABLES = """
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
"""


def _version_one_database(path: Path) -> None:
    """The schema and rows of a version-1 database: conversation ids not yet scoped."""
    db = sqlite3.connect(path)
    db.executescript(
        FIRST_TABLES
        + """
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


def _version_three_database(path: Path) -> None:
    """The schema and rows of a version-3 database: open turns, no tool fields on messages,
    and a turn still open with its answer checkpointed."""
    db = sqlite3.connect(path)
    db.executescript(
        FIRST_TABLES
        + """
        CREATE TABLE open_turns (
            turn_id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            user_message_id INTEGER NOT NULL, answer_message_id INTEGER NULL,
            created_conversation INTEGER NOT NULL);
        CREATE INDEX open_turns_by_conversation ON open_turns(conversation_id);
        INSERT INTO conversations VALUES ('alice:c', 'alice', 'general', 'weather?', 100, 100);
        INSERT INTO messages (conversation_id, role, content, partial, created_at)
            VALUES ('alice:c', 'user', 'weather?', 0, 100), ('alice:c', 'assistant', 'let me', 1, 101);
        INSERT INTO open_turns VALUES ('alice/g1', 'alice:c', 1, 2, 1);
        PRAGMA user_version = 3;
        """
    )
    db.commit()
    db.close()


async def test_messages_gain_tool_fields_and_an_open_turn_ends_with_tool_calls(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v3.db"
    _version_three_database(path)
    calls: tuple[ToolCall, ...] = ({"id": "call_1", "name": "weather", "arguments": "{}"},)
    results: tuple[ToolResult, ...] = ({"tool_call_id": "call_1", "content": "sunny"},)
    store = open_store(f"sqlite:///{path}", StoreLimits(ttl_s=1e9), clock=lambda: 200.0)
    await store.open()
    try:
        question = StoredMessage("user", "weather?", created_at=100.0)
        assert await store.window("alice:c", 10) == [
            question,
            StoredMessage("assistant", "let me", partial=True, created_at=101.0),
        ]
        assert await store.interrupted("alice/g1") == "alice:c"
        calling = StoredMessage("assistant", "", created_at=102.0, tool_calls=calls)
        await store.end_turn("alice:c", "alice/g1", calling)  # rewrites the old row
        answered = StoredMessage("tool", "", created_at=103.0, tool_results=results)
        await store.begin_turn("alice:c", "alice/g2", answered, owner="alice")
        await store.end_turn("alice:c", "alice/g2", StoredMessage("assistant", "Sunny."))

        conversation = await store.get("alice:c")
        assert conversation is not None
        assert conversation.messages == [
            question,
            calling,
            answered,
            StoredMessage("assistant", "Sunny."),
        ]
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert db.execute("SELECT tools FROM messages ORDER BY id").fetchall() == [
            (None,),
            ('{"tool_calls":[{"id":"call_1","name":"weather","arguments":"{}"}]}',),
            ('{"tool_results":[{"tool_call_id":"call_1","content":"sunny"}]}',),
            (None,),
        ]
    db.close()


async def test_sqlite_migrates_a_version_two_database(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    db = sqlite3.connect(path)
    db.executescript(
        FIRST_TABLES
        + """
        INSERT INTO conversations VALUES ('alice:c', 'alice', 'coder', 'hi', 1, 1);
        INSERT INTO messages (conversation_id, role, content, partial, created_at)
            VALUES ('alice:c', 'user', 'hi', 0, 1), ('alice:c', 'assistant', 'hel', 1, 2);
        PRAGMA user_version = 2;
        """
    )
    db.commit()
    db.close()

    store = open_store(f"sqlite:///{path}", StoreLimits(ttl_s=1e9), clock=lambda: 10.0)
    await store.open()
    try:
        before = [StoredMessage("user", "hi", created_at=1.0), StoredMessage("assistant", "hel", partial=True, created_at=2.0)]
        conversation = await store.get("alice:c")
        assert conversation is not None
        assert conversation.messages == before
        assert (conversation.info.owner, conversation.info.agent) == ("alice", "coder")
        await store.begin_turn("alice:c", "alice/g", StoredMessage("user", "more"), owner="alice")
        assert await store.interrupted("alice/g") == "alice:c"
        await store.end_turn("alice:c", "alice/g", StoredMessage("assistant", "sure"))
        assert await store.window("alice:c", 10) == [*before, StoredMessage("user", "more"), StoredMessage("assistant", "sure")]
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    db.close()
