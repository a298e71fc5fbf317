"""The SQLite store: one aiosqlite connection in WAL mode, schema versioned by
``PRAGMA user_version``.

Expiry compares ``? - updated_at > ?`` in SQL, the same float arithmetic as the memory
store, so both agree at the boundary. Operations share one connection, so each one
holds a lock for its whole transaction: otherwise a second coroutine's statements
would land inside the first one's ``BEGIN``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, cast

import aiosqlite

from chatgate.store.base import (
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


#: Applied in order; ``PRAGMA user_version`` counts those already applied. Append only.
MIGRATIONS: list[Migration] = [_create_tables, _scope_ids_to_owners]

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
            now = self._clock()
            await self._drop_if_expired(db, conversation_id, now)
            await db.execute(
                """INSERT INTO conversations (id, owner, agent, title, created_at, updated_at)
                VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT (id) DO UPDATE SET
                    updated_at = excluded.updated_at,
                    title = CASE WHEN title = '' THEN excluded.title ELSE title END""",
                (conversation_id, owner, agent, title_of(messages), now, now),
            )
            await db.executemany(
                """INSERT INTO messages (conversation_id, role, content, partial, created_at)
                VALUES (?, ?, ?, ?, ?)""",
                [(conversation_id, m.role, m.content, m.partial, m.created_at) for m in messages],
            )
            await self._trim(db, conversation_id)
            await self._evict(db, conversation_id)

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
                    "UPDATE conversations SET updated_at = ? WHERE id = ?",
                    (self._clock(), conversation_id),
                )

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
