"""The SQLite store: one aiosqlite connection in WAL mode, schema versioned by
``PRAGMA user_version``.

Expiry compares ``? - updated_at > ?`` in SQL, the same float arithmetic as the memory
store, so both agree at the boundary. Operations share one connection, so each one
holds a lock for its whole transaction: otherwise a second coroutine's statements
would land inside the first one's ``BEGIN``.

An open turn is a row of ``open_turns`` naming the rows of its user message and answer,
so a checkpoint rewrites its answer by primary key. The row goes with its conversation
(``ON DELETE CASCADE``) and when the turn ends or the conversation is cleared. Message
ids are never reused (``AUTOINCREMENT``), so an id whose message was trimmed away
matches nothing rather than another message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, cast

import aiosqlite

from chatgate.store.base import (
    MAX_OPEN_TURNS,
    Clock,
    Conversation,
    ConversationInfo,
    StoredMessage,
    StoreLimits,
    register_store,
)
from chatgate.store.memory import title_of
from chatgate.vocabulary import Role

URL_PREFIX = "sqlite:///"
MEMORY_PATH = ":memory:"

Migration = Callable[[aiosqlite.Connection], Awaitable[None]]


async def _create_tables(db: aiosqlite.Connection) -> None:
    await db.execute(
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            owner TEXT NULL,
            agent TEXT NOT NULL,
            title TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )"""
    )
    await db.execute(
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            partial INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        )"""
    )
    await db.execute("CREATE INDEX messages_by_conversation ON messages(conversation_id, id)")
    await db.execute("CREATE INDEX conversations_by_updated ON conversations(updated_at)")


async def _scope_ids_to_owners(db: aiosqlite.Connection) -> None:
    """Conversation ids became scoped to their owner: an owned conversation is stored
    under ``owner:id`` (see ``chatgate.chat.service.conversation_key``)."""
    await db.execute("PRAGMA defer_foreign_keys = ON")
    await db.execute(
        """UPDATE messages SET conversation_id = (
            SELECT c.owner || ':' || c.id FROM conversations c WHERE c.id = messages.conversation_id)
        WHERE conversation_id IN (SELECT id FROM conversations WHERE owner IS NOT NULL)"""
    )
    await db.execute("UPDATE conversations SET id = owner || ':' || id WHERE owner IS NOT NULL")


async def _add_open_turns(db: aiosqlite.Connection) -> None:
    """Turns are written as they happen: the turns begun and not yet ended."""
    await db.execute(
        """CREATE TABLE open_turns (
            turn_id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            user_message_id INTEGER NOT NULL,
            answer_message_id INTEGER NULL,
            created_conversation INTEGER NOT NULL
        )"""
    )
    await db.execute("CREATE INDEX open_turns_by_conversation ON open_turns(conversation_id)")


#: Applied in order; ``PRAGMA user_version`` counts those already applied. Append only.
MIGRATIONS: list[Migration] = [_create_tables, _scope_ids_to_owners, _add_open_turns]

_INFO_COLUMNS = """c.id, c.owner, c.agent, c.created_at, c.updated_at,
    (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id), c.title"""


def _info(row: Iterable[Any]) -> ConversationInfo:
    cid, owner, agent, created_at, updated_at, count, title = row
    return ConversationInfo(
        id=cid,
        owner=owner,
        agent=agent,
        created_at=created_at,
        updated_at=updated_at,
        message_count=count,
        title=title,
    )


def _message(row: Iterable[Any]) -> StoredMessage:
    role, content, partial, created_at = row
    return StoredMessage(
        role=cast(Role, role), content=content, partial=bool(partial), created_at=created_at
    )


async def _rows(db: aiosqlite.Connection, sql: str, params: tuple[Any, ...]) -> list[Any]:
    async with db.execute(sql, params) as cursor:
        return list(await cursor.fetchall())


async def _row(db: aiosqlite.Connection, sql: str, params: tuple[Any, ...]) -> Any:
    async with db.execute(sql, params) as cursor:
        return await cursor.fetchone()


@asynccontextmanager
async def _transaction(db: aiosqlite.Connection, begin: str) -> AsyncIterator[aiosqlite.Connection]:
    try:
        await db.execute(begin)
        yield db
        await db.execute("COMMIT")
    except BaseException:
        # Also after a cancelled BEGIN, which may still run: ROLLBACK is queued behind it.
        with suppress(aiosqlite.OperationalError):
            await db.execute("ROLLBACK")
        raise


def sqlite_path(url: str) -> str:
    """``sqlite:///rel/path.db`` -> ``rel/path.db``; ``sqlite:////abs.db`` -> ``/abs.db``."""
    if not url.startswith(URL_PREFIX) or len(url) == len(URL_PREFIX):
        raise ValueError(f"expected sqlite:///path.db or sqlite:///:memory:, got {url!r}")
    return url[len(URL_PREFIX) :]


class SqliteStore:
    name = "sqlite"

    def __init__(self, path: str, limits: StoreLimits, clock: Clock) -> None:
        self.path = path
        self._limits = limits
        self._clock = clock
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        if self.path != MEMORY_PATH:
            await asyncio.to_thread(Path(self.path).parent.mkdir, parents=True, exist_ok=True)
        # Autocommit mode: transactions are the explicit BEGIN in _transaction().
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA synchronous=NORMAL")
            await self._migrate(db)
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def append(
        self,
        conversation_id: str,
        messages: list[StoredMessage],
        *,
        owner: str | None = None,
        agent: str = "general",
    ) -> None:
        async with self._transaction() as db:
            await self._open_conversation(db, conversation_id, owner, agent, title_of(messages))
            await db.executemany(
                """INSERT INTO messages (conversation_id, role, content, partial, created_at)
                VALUES (?, ?, ?, ?, ?)""",
                [(conversation_id, m.role, m.content, m.partial, m.created_at) for m in messages],
            )
            await self._trim(db, conversation_id)
            await self._evict(db, conversation_id)

    async def begin_turn(
        self,
        conversation_id: str,
        turn_id: str,
        user: StoredMessage,
        *,
        owner: str | None = None,
        agent: str = "general",
    ) -> None:
        async with self._transaction() as db:
            created = await self._open_conversation(
                db, conversation_id, owner, agent, title_of([user])
            )
            user_message_id = await self._insert_message(db, conversation_id, user)
            await db.execute(
                """INSERT OR REPLACE INTO open_turns
                (turn_id, conversation_id, user_message_id, answer_message_id, created_conversation)
                VALUES (?, ?, ?, NULL, ?)""",
                (turn_id, conversation_id, user_message_id, created),
            )
            await db.execute(
                """DELETE FROM open_turns WHERE conversation_id = ? AND rowid NOT IN (
                    SELECT rowid FROM open_turns WHERE conversation_id = ?
                    ORDER BY rowid DESC LIMIT ?)""",
                (conversation_id, conversation_id, MAX_OPEN_TURNS),
            )
            await self._trim(db, conversation_id)
            await self._evict(db, conversation_id)

    async def checkpoint(self, conversation_id: str, turn_id: str, text: str) -> None:
        async with self._transaction() as db:
            now = self._clock()
            turn = await self._open_turn(db, conversation_id, turn_id, now)
            if turn is not None:
                answer = StoredMessage("assistant", text, partial=True, created_at=now)
                await self._put_answer(db, conversation_id, turn_id, turn[1], answer)
                await self._touch(db, conversation_id, now)

    async def end_turn(
        self, conversation_id: str, turn_id: str, answer: StoredMessage | None
    ) -> None:
        async with self._transaction() as db:
            now = self._clock()
            turn = await self._open_turn(db, conversation_id, turn_id, now)
            if turn is None:
                return
            user_message_id, answer_message_id, created = turn
            if answer is not None:
                await self._put_answer(db, conversation_id, turn_id, answer_message_id, answer)
            await db.execute("DELETE FROM open_turns WHERE turn_id = ?", (turn_id,))
            if answer is None:
                await db.execute(
                    "DELETE FROM messages WHERE id IN (?, ?)", (user_message_id, answer_message_id)
                )
                if created:
                    await db.execute(
                        """DELETE FROM conversations WHERE id = ? AND NOT EXISTS (
                            SELECT 1 FROM messages WHERE conversation_id = ?)""",
                        (conversation_id, conversation_id),
                    )
            await self._touch(db, conversation_id, now)

    async def interrupted(self, turn_id: str) -> str | None:
        async with self._transaction() as db:
            row = await _row(
                db,
                """SELECT t.conversation_id FROM open_turns t
                JOIN conversations c ON c.id = t.conversation_id
                WHERE t.turn_id = ? AND ? - c.updated_at <= ?""",
                (turn_id, self._clock(), self._limits.ttl_s),
            )
        return None if row is None else str(row[0])

    async def window(self, conversation_id: str, max_messages: int) -> list[StoredMessage]:
        if max_messages <= 0:
            return []
        async with self._transaction() as db:
            if not await self._is_live(db, conversation_id):
                return []
            newest_first = await _rows(
                db,
                """SELECT role, content, partial, created_at FROM messages
                WHERE conversation_id = ? ORDER BY id DESC LIMIT ?""",
                (conversation_id, max_messages),
            )
        return [_message(row) for row in reversed(newest_first)]

    async def get(self, conversation_id: str) -> Conversation | None:
        async with self._transaction() as db:
            info = await self._fetch_info(db, conversation_id)
            if info is None:
                return None
            rows = await _rows(
                db,
                """SELECT role, content, partial, created_at FROM messages
                WHERE conversation_id = ? ORDER BY id""",
                (conversation_id,),
            )
        return Conversation(info=info, messages=[_message(row) for row in rows])

    async def info(self, conversation_id: str) -> ConversationInfo | None:
        async with self._transaction() as db:
            return await self._fetch_info(db, conversation_id)

    async def list(self, owner: str | None, *, limit: int = 100) -> list[ConversationInfo]:
        if limit <= 0:
            return []
        async with self._transaction() as db:
            rows = await _rows(
                db,
                f"""SELECT {_INFO_COLUMNS} FROM conversations c
                WHERE c.owner IS ? AND ? - c.updated_at <= ?
                ORDER BY c.updated_at DESC, c.rowid DESC LIMIT ?""",
                (owner, self._clock(), self._limits.ttl_s, limit),
            )
        return [_info(row) for row in rows]

    async def clear(self, conversation_id: str) -> None:
        async with self._transaction() as db:
            if await self._is_live(db, conversation_id):
                await db.execute(
                    "DELETE FROM messages WHERE conversation_id = ?", (conversation_id,)
                )
                await db.execute(
                    "DELETE FROM open_turns WHERE conversation_id = ?", (conversation_id,)
                )
                await self._touch(db, conversation_id, self._clock())

    async def delete(self, conversation_id: str) -> bool:
        async with self._transaction() as db:
            existed = await self._is_live(db, conversation_id)
            await db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        return existed

    async def purge_expired(self) -> int:
        async with self._transaction() as db:
            async with db.execute(
                "DELETE FROM conversations WHERE ? - updated_at > ?",
                (self._clock(), self._limits.ttl_s),
            ) as cursor:
                return cursor.rowcount

    async def ping(self) -> None:
        async with self._transaction() as db:
            await db.execute("SELECT 1")

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        if self._db is None:
            raise RuntimeError("SqliteStore used before open() or after close()")
        async with self._lock, _transaction(self._db, "BEGIN") as db:
            yield db

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        """Apply the pending migrations, one transaction each. The version is read
        under the write lock, so two processes opening a new file cannot both apply
        the same step."""
        while True:
            async with _transaction(db, "BEGIN IMMEDIATE"):
                version = int((await _row(db, "PRAGMA user_version", ()))[0])
                if version > len(MIGRATIONS):
                    raise RuntimeError(
                        f"{self.path} has schema version {version}, newer than this "
                        f"chatgate ({len(MIGRATIONS)})"
                    )
                if version == len(MIGRATIONS):
                    return
                await MIGRATIONS[version](db)
                await db.execute(f"PRAGMA user_version = {version + 1}")

    async def _is_live(self, db: aiosqlite.Connection, conversation_id: str) -> bool:
        row = await _row(
            db,
            "SELECT 1 FROM conversations WHERE id = ? AND ? - updated_at <= ?",
            (conversation_id, self._clock(), self._limits.ttl_s),
        )
        return row is not None

    async def _fetch_info(
        self, db: aiosqlite.Connection, conversation_id: str
    ) -> ConversationInfo | None:
        row = await _row(
            db,
            f"""SELECT {_INFO_COLUMNS} FROM conversations c
            WHERE c.id = ? AND ? - c.updated_at <= ?""",
            (conversation_id, self._clock(), self._limits.ttl_s),
        )
        return None if row is None else _info(row)

    async def _open_conversation(
        self,
        db: aiosqlite.Connection,
        conversation_id: str,
        owner: str | None,
        agent: str,
        title: str,
    ) -> bool:
        """Create the conversation when missing or expired (then return True), else
        touch it and give it ``title`` if it has none."""
        now = self._clock()
        await self._drop_if_expired(db, conversation_id, now)
        existed = await _row(db, "SELECT 1 FROM conversations WHERE id = ?", (conversation_id,))
        await db.execute(
            """INSERT INTO conversations (id, owner, agent, title, created_at, updated_at)
            VALUES (?, ?, ?, ?, ?, ?)
            ON CONFLICT (id) DO UPDATE SET
                updated_at = excluded.updated_at,
                title = CASE WHEN title = '' THEN excluded.title ELSE title END""",
            (conversation_id, owner, agent, title, now, now),
        )
        return existed is None

    async def _touch(self, db: aiosqlite.Connection, conversation_id: str, now: float) -> None:
        await db.execute(
            "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id)
        )

    async def _insert_message(
        self, db: aiosqlite.Connection, conversation_id: str, message: StoredMessage
    ) -> int:
        async with db.execute(
            """INSERT INTO messages (conversation_id, role, content, partial, created_at)
            VALUES (?, ?, ?, ?, ?)""",
            (conversation_id, message.role, message.content, message.partial, message.created_at),
        ) as cursor:
            return int(cast(int, cursor.lastrowid))

    async def _open_turn(
        self, db: aiosqlite.Connection, conversation_id: str, turn_id: str, now: float
    ) -> tuple[int, int | None, bool] | None:
        """The turn's user message id, answer message id and whether it created the
        conversation, when it is open in this conversation and the conversation lives."""
        row = await _row(
            db,
            """SELECT t.user_message_id, t.answer_message_id, t.created_conversation
            FROM open_turns t JOIN conversations c ON c.id = t.conversation_id
            WHERE t.turn_id = ? AND t.conversation_id = ? AND ? - c.updated_at <= ?""",
            (turn_id, conversation_id, now, self._limits.ttl_s),
        )
        return None if row is None else (row[0], row[1], bool(row[2]))

    async def _put_answer(
        self,
        db: aiosqlite.Connection,
        conversation_id: str,
        turn_id: str,
        answer_message_id: int | None,
        answer: StoredMessage,
    ) -> None:
        """Rewrite the turn's answer where it is, or append it when it has none (or
        it was trimmed away)."""
        if answer_message_id is not None:
            async with db.execute(
                """UPDATE messages SET role = ?, content = ?, partial = ?, created_at = ?
                WHERE id = ?""",
                (answer.role, answer.content, answer.partial, answer.created_at, answer_message_id),
            ) as cursor:
                if cursor.rowcount > 0:
                    return
        answer_message_id = await self._insert_message(db, conversation_id, answer)
        await db.execute(
            "UPDATE open_turns SET answer_message_id = ? WHERE turn_id = ?",
            (answer_message_id, turn_id),
        )
        await self._trim(db, conversation_id)

    async def _drop_if_expired(
        self, db: aiosqlite.Connection, conversation_id: str, now: float
    ) -> None:
        """An expired conversation is gone: writing to its id starts a new one."""
        await db.execute(
            "DELETE FROM conversations WHERE id = ? AND ? - updated_at > ?",
            (conversation_id, now, self._limits.ttl_s),
        )

    async def _trim(self, db: aiosqlite.Connection, conversation_id: str) -> None:
        row = await _row(
            db,
            """SELECT id FROM messages WHERE conversation_id = ?
            ORDER BY id DESC LIMIT 1 OFFSET ?""",
            (conversation_id, max(self._limits.max_messages, 0)),
        )
        if row is not None:
            await db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND id <= ?",
                (conversation_id, row[0]),
            )

    async def _evict(self, db: aiosqlite.Connection, conversation_id: str) -> None:
        """Drop the least recently written conversations over the cap, never the one
        just written (ties in ``updated_at`` go to the older row)."""
        (count,) = await _row(db, "SELECT COUNT(*) FROM conversations", ())
        excess = count - self._limits.max_conversations
        if excess > 0:
            await db.execute(
                """DELETE FROM conversations WHERE id IN (
                    SELECT id FROM conversations WHERE id != ?
                    ORDER BY updated_at, rowid LIMIT ?)""",
                (conversation_id, excess),
            )


@register_store("sqlite")
def open_sqlite_store(url: str, limits: StoreLimits, clock: Clock) -> SqliteStore:
    return SqliteStore(sqlite_path(url), limits, clock)
