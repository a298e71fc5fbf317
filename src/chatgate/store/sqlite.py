"""The SQLite store: ``sqlite3`` in WAL mode, schema versioned by ``PRAGMA user_version``.

Each store call is one transaction (BEGIN, all its statements, COMMIT), one synchronous
function of :class:`_Database`, run in one of two places:

- **on the event loop, at once**, on a connection that never waits: in WAL mode with
  ``synchronous=NORMAL`` a commit appends to the log in the page cache and syncs nothing,
  so a call costs tens of microseconds, less than a hop to a thread and back (measured:
  about 1 ms of a turn's CPU went to its three hops, not to SQLite; bench/CHANGES.md);
- **on the store's thread** (``ThreadPoolExecutor(max_workers=1)``), whose connection
  waits out locks: when another process holds the write lock (a second worker on the
  same file; the loop's connection gets ``SQLITE_BUSY`` at once, rolls back and the call
  is queued here instead), while earlier calls still wait here (so calls run in the order
  they were made), for the purge, which may delete many rows, and for the file's opening
  and migrations. The thread also copies the log into the database file every
  ``WRITES_PER_CHECKPOINT`` writes (a passive checkpoint, the only step that syncs to
  disk), which the loop's connection never does itself.

A queued call that is cancelled either never started (it leaves the queue) or runs to its
COMMIT, never halfway. ``sqlite3`` keeps each connection's prepared statements (128, more
than the store has), so the SQL strings are compiled once. ``sqlite:///:memory:`` is one
connection, on the thread: a second would be another database.

Writers begin with ``BEGIN IMMEDIATE``: most read before they write, and a deferred
transaction whose read snapshot is stale fails at its first write instead of waiting
out the busy timeout while another process (a second worker on the same file) writes.
The clock is read on the event loop, once per call, in the order calls run.

Expiry compares ``? - updated_at > ?`` in SQL, the same float arithmetic as the memory
store, so both agree at the boundary.

An open turn is a row of ``open_turns`` naming the rows of its user message and answer,
so a checkpoint rewrites its answer by primary key. The row goes with its conversation
(``ON DELETE CASCADE``) and when the turn ends or the conversation is cleared. Message
ids are never reused (``AUTOINCREMENT``), so an id whose message was trimmed away
matches nothing rather than another message.

A message's tool calls and results are one JSON object in ``messages.tools``
(:meth:`StoredMessage.tools_json`), NULL when it has none.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import orjson

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

URL_PREFIX = "sqlite:///"
MEMORY_PATH = ":memory:"
#: The thread checkpoints the write-ahead log after this many writes (a write is a few
#: pages; SQLite's own default is every 1,000 pages).
WRITES_PER_CHECKPOINT = 250
log = logging.getLogger("chatgate.store")

P = ParamSpec("P")
T = TypeVar("T")

Migration = Callable[[sqlite3.Connection], None]


def _create_tables(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            owner TEXT NULL,
            agent TEXT NOT NULL,
            title TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            partial INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        )"""
    )
    db.execute("CREATE INDEX messages_by_conversation ON messages(conversation_id, id)")
    db.execute("CREATE INDEX conversations_by_updated ON conversations(updated_at)")


def _scope_ids_to_owners(db: sqlite3.Connection) -> None:
    """Conversation ids became scoped to their owner: an owned conversation is stored
    under ``owner:id`` (see ``chatgate.chat.service.conversation_key``)."""
    db.execute("PRAGMA defer_foreign_keys = ON")
    db.execute(
        """UPDATE messages SET conversation_id = (
            SELECT c.owner || ':' || c.id FROM conversations c WHERE c.id = messages.conversation_id)
        WHERE conversation_id IN (SELECT id FROM conversations WHERE owner IS NOT NULL)"""
    )
    db.execute("UPDATE conversations SET id = owner || ':' || id WHERE owner IS NOT NULL")


def _add_open_turns(db: sqlite3.Connection) -> None:
    """Turns are written as they happen: the turns begun and not yet ended."""
    db.execute(
        """CREATE TABLE open_turns (
            turn_id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            user_message_id INTEGER NOT NULL,
            answer_message_id INTEGER NULL,
            created_conversation INTEGER NOT NULL
        )"""
    )
    db.execute("CREATE INDEX open_turns_by_conversation ON open_turns(conversation_id)")


def _add_message_tools(db: sqlite3.Connection) -> None:
    """Messages keep tool calls and results: JSON of ``StoredMessage.tools_json()``."""
    db.execute("ALTER TABLE messages ADD COLUMN tools TEXT NULL")


#: Applied in order; ``PRAGMA user_version`` counts those already applied. Append only.
MIGRATIONS: list[Migration] = [
    _create_tables,
    _scope_ids_to_owners,
    _add_open_turns,
    _add_message_tools,
]

_INFO = """SELECT c.id, c.owner, c.agent, c.created_at, c.updated_at,
    (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id), c.title
    FROM conversations c"""

_INSERT_MESSAGE = """INSERT INTO messages
    (conversation_id, role, content, partial, created_at, tools) VALUES (?, ?, ?, ?, ?, ?)"""

#: The columns :func:`_message` reads, in its order.
_MESSAGE_COLUMNS = "role, content, partial, created_at, tools"


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
    role, content, partial, created_at, tools = row
    return StoredMessage.from_tools_json(
        role, content, bool(partial), created_at, None if tools is None else orjson.loads(tools)
    )


def _tools(message: StoredMessage) -> str | None:
    """The ``tools`` column of ``message``."""
    tools = message.tools_json()
    return None if tools is None else orjson.dumps(tools).decode()


def _message_values(conversation_id: str, message: StoredMessage) -> tuple[Any, ...]:
    """The values :data:`_INSERT_MESSAGE` takes."""
    return (
        conversation_id,
        message.role,
        message.content,
        message.partial,
        message.created_at,
        _tools(message),
    )


def sqlite_path(url: str) -> str:
    """``sqlite:///rel/path.db`` -> ``rel/path.db``; ``sqlite:////abs.db`` -> ``/abs.db``."""
    if not url.startswith(URL_PREFIX) or len(url) == len(URL_PREFIX):
        raise ValueError(f"expected sqlite:///path.db or sqlite:///:memory:, got {url!r}")
    return url[len(URL_PREFIX) :]


class _Database:
    """The store's calls, synchronous. Made, used and closed on the store's thread only
    (``sqlite3`` checks); each method runs inside the transaction :meth:`transaction`
    opens for it, and ``now`` is the caller's clock reading."""

    def __init__(self, db: sqlite3.Connection, limits: StoreLimits) -> None:
        self._db = db
        self._ttl_s = limits.ttl_s
        self._max_messages = max(limits.max_messages, 0)
        self._max_conversations = limits.max_conversations

    @classmethod
    def connect(cls, path: str, limits: StoreLimits) -> _Database:
        """The connection of the store's thread: it waits out another process's write
        lock (``sqlite3``'s default busy timeout, 5 s), applies the migrations, and
        checkpoints the write-ahead log into the database file as SQLite does by default."""
        if path != MEMORY_PATH:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are the explicit BEGIN in transaction().
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA synchronous=NORMAL")
            database = cls(db, limits)
            while database.transaction("BEGIN IMMEDIATE", _Database.migrate_one, path):
                pass
        except BaseException:
            db.close()
            raise
        return database

    @classmethod
    def connect_inline(cls, path: str, limits: StoreLimits) -> _Database:
        """The connection the event loop uses itself, once the thread's has migrated the
        file: it never waits (no busy timeout; a locked database is an error the store
        answers by queueing the call for the thread) and never checkpoints, which writes
        the database file and syncs it to disk; the thread does that (``checkpoint_log``).
        A commit then only appends to the log, in the page cache (``synchronous=NORMAL``)."""
        db = sqlite3.connect(path, isolation_level=None, timeout=0)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException:
            db.close()
            raise
        return cls(db, limits)

    def checkpoint_log(self) -> None:
        """Copy the write-ahead log into the database file, without waiting for readers
        or writers (a passive checkpoint): what SQLite does after every 1,000 pages
        written by a connection that checkpoints automatically."""
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def close(self) -> None:
        self._db.close()

    def transaction(
        self,
        begin: str,
        work: Callable[Concatenate[_Database, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        self._db.execute(begin)
        try:
            result = work(self, *args, **kwargs)
            self._db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (the disk is full) leaves the transaction open.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return result

    def migrate_one(self, path: str) -> bool:
        """Apply the next pending migration; False when there is none. The version is
        read under the write lock (``BEGIN IMMEDIATE``), so two processes opening a new
        file cannot both apply the same step."""
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"{path} has schema version {version}, newer than this chatgate ({len(MIGRATIONS)})"
            )
        if version == len(MIGRATIONS):
            return False
        MIGRATIONS[version](self._db)
        self._db.execute(f"PRAGMA user_version = {version + 1}")
        return True

    def append(
        self,
        conversation_id: str,
        messages: list[StoredMessage],
        owner: str | None,
        agent: str,
        now: float,
    ) -> None:
        created = self._open_conversation(conversation_id, owner, agent, title_of(messages), now)
        self._db.executemany(_INSERT_MESSAGE, [_message_values(conversation_id, m) for m in messages])
        self._trim(conversation_id)
        if created:  # only a new conversation can take the count over the cap
            self._evict(conversation_id)

    def begin_turn(
        self,
        conversation_id: str,
        turn_id: str,
        user: StoredMessage,
        owner: str | None,
        agent: str,
        now: float,
    ) -> None:
        created = self._open_conversation(conversation_id, owner, agent, title_of([user]), now)
        user_message_id = self._insert_message(conversation_id, user)
        self._db.execute(
            """INSERT OR REPLACE INTO open_turns
            (turn_id, conversation_id, user_message_id, answer_message_id, created_conversation)
            VALUES (?, ?, ?, NULL, ?)""",
            (turn_id, conversation_id, user_message_id, created),
        )
        self._db.execute(
            """DELETE FROM open_turns WHERE conversation_id = ? AND rowid NOT IN (
                SELECT rowid FROM open_turns WHERE conversation_id = ?
                ORDER BY rowid DESC LIMIT ?)""",
            (conversation_id, conversation_id, MAX_OPEN_TURNS),
        )
        self._trim(conversation_id)
        if created:
            self._evict(conversation_id)

    def checkpoint(self, conversation_id: str, turn_id: str, text: str, now: float) -> None:
        turn = self._open_turn(conversation_id, turn_id, now)
        if turn is not None:
            answer = StoredMessage("assistant", text, partial=True, created_at=now)
            self._put_answer(conversation_id, turn_id, turn[1], answer)
            self._touch(conversation_id, now)

    def end_turn(
        self, conversation_id: str, turn_id: str, answer: StoredMessage | None, now: float
    ) -> None:
        turn = self._open_turn(conversation_id, turn_id, now)
        if turn is None:
            return
        user_message_id, answer_message_id, created = turn
        if answer is not None:
            self._put_answer(conversation_id, turn_id, answer_message_id, answer)
        self._db.execute("DELETE FROM open_turns WHERE turn_id = ?", (turn_id,))
        if answer is None:
            self._db.execute(
                "DELETE FROM messages WHERE id IN (?, ?)", (user_message_id, answer_message_id)
            )
            if created:
                self._db.execute(
                    """DELETE FROM conversations WHERE id = ? AND NOT EXISTS (
                        SELECT 1 FROM messages WHERE conversation_id = ?)""",
                    (conversation_id, conversation_id),
                )
        self._touch(conversation_id, now)

    def interrupted(self, turn_id: str, now: float) -> str | None:
        row = self._db.execute(
            """SELECT t.conversation_id FROM open_turns t
            JOIN conversations c ON c.id = t.conversation_id
            WHERE t.turn_id = ? AND ? - c.updated_at <= ?""",
            (turn_id, now, self._ttl_s),
        ).fetchone()
        return None if row is None else str(row[0])

    def window(self, conversation_id: str, max_messages: int, now: float) -> list[StoredMessage]:
        newest_first = self._db.execute(
            f"""SELECT {_MESSAGE_COLUMNS} FROM messages
            WHERE conversation_id = ? AND EXISTS (
                SELECT 1 FROM conversations WHERE id = ? AND ? - updated_at <= ?)
            ORDER BY id DESC LIMIT ?""",
            (conversation_id, conversation_id, now, self._ttl_s, max_messages),
        ).fetchall()
        return [_message(row) for row in reversed(newest_first)]

    def get(self, conversation_id: str, now: float) -> Conversation | None:
        info = self.info(conversation_id, now)
        if info is None:
            return None
        rows = self._db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY id",
            (conversation_id,),
        )
        return Conversation(info=info, messages=[_message(row) for row in rows])

    def info(self, conversation_id: str, now: float) -> ConversationInfo | None:
        row = self._db.execute(
            f"{_INFO} WHERE c.id = ? AND ? - c.updated_at <= ?",
            (conversation_id, now, self._ttl_s),
        ).fetchone()
        return None if row is None else _info(row)

    def conversations_of(self, owner: str | None, limit: int, now: float) -> list[ConversationInfo]:
        rows = self._db.execute(
            f"""{_INFO} WHERE c.owner IS ? AND ? - c.updated_at <= ?
            ORDER BY c.updated_at DESC, c.rowid DESC LIMIT ?""",
            (owner, now, self._ttl_s, limit),
        )
        return [_info(row) for row in rows]

    def clear(self, conversation_id: str, now: float) -> None:
        touched = self._db.execute(
            "UPDATE conversations SET updated_at = ? WHERE id = ? AND ? - updated_at <= ?",
            (now, conversation_id, now, self._ttl_s),
        ).rowcount
        if touched:
            self._db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            self._db.execute("DELETE FROM open_turns WHERE conversation_id = ?", (conversation_id,))

    def delete(self, conversation_id: str, now: float) -> bool:
        existed = self._db.execute(
            "SELECT 1 FROM conversations WHERE id = ? AND ? - updated_at <= ?",
            (conversation_id, now, self._ttl_s),
        ).fetchone()
        self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        return existed is not None

    def purge_expired(self, now: float) -> int:
        return self._db.execute(
            "DELETE FROM conversations WHERE ? - updated_at > ?", (now, self._ttl_s)
        ).rowcount

    def ping(self) -> None:
        self._db.execute("SELECT 1").fetchone()

    def _open_conversation(
        self, conversation_id: str, owner: str | None, agent: str, title: str, now: float
    ) -> bool:
        """Create the conversation when missing or expired (an expired one is gone:
        writing to its id starts a new one) and return True; else touch it and give it
        ``title`` if it has none. Whether the INSERT inserted tells which, so no SELECT."""
        self._db.execute(
            "DELETE FROM conversations WHERE id = ? AND ? - updated_at > ?",
            (conversation_id, now, self._ttl_s),
        )
        inserted = self._db.execute(
            """INSERT INTO conversations (id, owner, agent, title, created_at, updated_at)
            VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING""",
            (conversation_id, owner, agent, title, now, now),
        ).rowcount
        if inserted:
            return True
        self._db.execute(
            """UPDATE conversations SET updated_at = ?,
                title = CASE WHEN title = '' THEN ? ELSE title END
            WHERE id = ?""",
            (now, title, conversation_id),
        )
        return False

    def _touch(self, conversation_id: str, now: float) -> None:
        self._db.execute(
            "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id)
        )

    def _insert_message(self, conversation_id: str, message: StoredMessage) -> int:
        cursor = self._db.execute(_INSERT_MESSAGE, _message_values(conversation_id, message))
        return int(cast(int, cursor.lastrowid))

    def _open_turn(
        self, conversation_id: str, turn_id: str, now: float
    ) -> tuple[int, int | None, bool] | None:
        """The turn's user message id, answer message id and whether it created the
        conversation, when it is open in this conversation and the conversation lives."""
        row = self._db.execute(
            """SELECT t.user_message_id, t.answer_message_id, t.created_conversation
            FROM open_turns t JOIN conversations c ON c.id = t.conversation_id
            WHERE t.turn_id = ? AND t.conversation_id = ? AND ? - c.updated_at <= ?""",
            (turn_id, conversation_id, now, self._ttl_s),
        ).fetchone()
        return None if row is None else (row[0], row[1], bool(row[2]))

    def _put_answer(
        self,
        conversation_id: str,
        turn_id: str,
        answer_message_id: int | None,
        answer: StoredMessage,
    ) -> None:
        """Rewrite the turn's answer where it is, or append it when it has none (or
        it was trimmed away)."""
        if answer_message_id is not None:
            rewritten = self._db.execute(
                """UPDATE messages SET role = ?, content = ?, partial = ?, created_at = ?,
                    tools = ? WHERE id = ?""",
                (
                    answer.role,
                    answer.content,
                    answer.partial,
                    answer.created_at,
                    _tools(answer),
                    answer_message_id,
                ),
            ).rowcount
            if rewritten:
                return
        answer_message_id = self._insert_message(conversation_id, answer)
        self._db.execute(
            "UPDATE open_turns SET answer_message_id = ? WHERE turn_id = ?",
            (answer_message_id, turn_id),
        )
        self._trim(conversation_id)

    def _trim(self, conversation_id: str) -> None:
        """Keep the newest ``max_messages``: the subquery finds the newest one to drop,
        or NULL, which matches nothing."""
        self._db.execute(
            """DELETE FROM messages WHERE conversation_id = ? AND id <= (
                SELECT id FROM messages WHERE conversation_id = ?
                ORDER BY id DESC LIMIT 1 OFFSET ?)""",
            (conversation_id, conversation_id, self._max_messages),
        )

    def _evict(self, conversation_id: str) -> None:
        """Drop the least recently written conversations over the cap, never the one
        just written (ties in ``updated_at`` go to the older row)."""
        self._db.execute(
            """DELETE FROM conversations WHERE id IN (
                SELECT id FROM conversations WHERE id != ?
                ORDER BY updated_at, rowid
                LIMIT max((SELECT COUNT(*) FROM conversations) - ?, 0))""",
            (conversation_id, self._max_conversations),
        )


def _close_if_opened(opening: Future[_Database]) -> None:
    """Close what an abandoned open() connected (queued behind it on its thread)."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


class SqliteStore:
    name = "sqlite"

    def __init__(self, path: str, limits: StoreLimits, clock: Clock) -> None:
        self.path = path
        self._limits = limits
        self._clock = clock
        self._thread: ThreadPoolExecutor | None = None
        self._database: _Database | None = None
        self._inline: _Database | None = None
        #: Calls queued for the thread and not yet done: while there are any, later calls
        #: queue behind them, so that calls run in the order they were made.
        self._queued = 0
        self._writes_since_checkpoint = 0
        self._checkpointing = False

    async def open(self) -> None:
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatgate-sqlite")
        opening = thread.submit(_Database.connect, self.path, self._limits)
        try:
            self._database = await asyncio.wrap_future(opening)
        except BaseException:
            thread.submit(_close_if_opened, opening)
            thread.shutdown(wait=False)
            raise
        self._thread = thread
        if self.path != MEMORY_PATH:  # another connection to ":memory:" is another database
            self._inline = _Database.connect_inline(self.path, self._limits)

    async def close(self) -> None:
        """Close the connection after the calls already queued, then end the thread."""
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._thread is None or self._database is None:
            return
        thread, self._thread = self._thread, None
        database, self._database = self._database, None
        closing = thread.submit(database.close)
        # The thread ends once the close has run, even if this await is cancelled.
        thread.shutdown(wait=False)
        await asyncio.shield(asyncio.wrap_future(closing))
        await asyncio.to_thread(thread.shutdown, wait=True)

    async def append(
        self,
        conversation_id: str,
        messages: list[StoredMessage],
        *,
        owner: str | None = None,
        agent: str = "general",
    ) -> None:
        await self._write(_Database.append, conversation_id, messages, owner, agent, self._clock())

    async def begin_turn(
        self,
        conversation_id: str,
        turn_id: str,
        user: StoredMessage,
        *,
        owner: str | None = None,
        agent: str = "general",
    ) -> None:
        await self._write(
            _Database.begin_turn, conversation_id, turn_id, user, owner, agent, self._clock()
        )

    async def checkpoint(self, conversation_id: str, turn_id: str, text: str) -> None:
        await self._write(_Database.checkpoint, conversation_id, turn_id, text, self._clock())

    async def end_turn(
        self, conversation_id: str, turn_id: str, answer: StoredMessage | None
    ) -> None:
        await self._write(_Database.end_turn, conversation_id, turn_id, answer, self._clock())

    async def interrupted(self, turn_id: str) -> str | None:
        return await self._read(_Database.interrupted, turn_id, self._clock())

    async def window(self, conversation_id: str, max_messages: int) -> list[StoredMessage]:
        if max_messages <= 0:
            return []
        return await self._read(_Database.window, conversation_id, max_messages, self._clock())

    async def get(self, conversation_id: str) -> Conversation | None:
        return await self._read(_Database.get, conversation_id, self._clock())

    async def info(self, conversation_id: str) -> ConversationInfo | None:
        return await self._read(_Database.info, conversation_id, self._clock())

    async def list(self, owner: str | None, *, limit: int = 100) -> list[ConversationInfo]:
        if limit <= 0:
            return []
        return await self._read(_Database.conversations_of, owner, limit, self._clock())

    async def clear(self, conversation_id: str) -> None:
        await self._write(_Database.clear, conversation_id, self._clock())

    async def delete(self, conversation_id: str) -> bool:
        return await self._write(_Database.delete, conversation_id, self._clock())

    async def purge_expired(self) -> int:
        # Maintenance that may delete many rows: on the thread, never holding up the loop.
        return await self._on_thread("BEGIN IMMEDIATE", _Database.purge_expired, self._clock())

    async def ping(self) -> None:
        await self._read(_Database.ping)

    async def _write(
        self, work: Callable[Concatenate[_Database, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        result = await self._run("BEGIN IMMEDIATE", work, *args, **kwargs)
        self._writes_since_checkpoint += 1
        if self._writes_since_checkpoint >= WRITES_PER_CHECKPOINT and not self._checkpointing:
            self._checkpoint_log()
        return result

    async def _read(
        self, work: Callable[Concatenate[_Database, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        return await self._run("BEGIN", work, *args, **kwargs)

    async def _run(
        self,
        begin: str,
        work: Callable[Concatenate[_Database, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``work`` in one transaction: here, at once, when nothing waits on the thread
        and no other process holds the write lock; else queued for the thread."""
        if self._inline is not None and not self._queued:
            try:
                return self._inline.transaction(begin, work, *args, **kwargs)
            except sqlite3.OperationalError as exc:
                # Another process writes (a second worker on this file): wait for it on the
                # thread, not here. Whatever the call did was rolled back; it runs again there.
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
        return await self._on_thread(begin, work, *args, **kwargs)

    async def _on_thread(
        self,
        begin: str,
        work: Callable[Concatenate[_Database, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``work`` in one transaction on the store's thread: the call's only hop."""
        database = self._database
        if self._thread is None or database is None:
            raise RuntimeError("SqliteStore used before open() or after close()")

        def run() -> T:
            return database.transaction(begin, work, *args, **kwargs)

        loop = asyncio.get_running_loop()
        self._queued += 1
        queued = self._thread.submit(run)
        queued.add_done_callback(lambda _: loop.call_soon_threadsafe(self._dequeued))
        return await asyncio.wrap_future(queued)

    def _dequeued(self) -> None:
        self._queued -= 1

    def _checkpoint_log(self) -> None:
        """Have the thread copy the log into the database file, beside the calls."""
        database = self._database
        if self._thread is None or database is None:
            return
        self._writes_since_checkpoint = 0
        self._checkpointing = True
        loop = asyncio.get_running_loop()
        done = self._thread.submit(database.checkpoint_log)
        done.add_done_callback(lambda _: loop.call_soon_threadsafe(self._checkpointed, done))

    def _checkpointed(self, done: Future[None]) -> None:
        self._checkpointing = False
        if not done.cancelled() and done.exception() is not None:
            log.warning("could not checkpoint the SQLite log: %s", done.exception())


@register_store("sqlite")
def open_sqlite_store(url: str, limits: StoreLimits, clock: Clock) -> SqliteStore:
    return SqliteStore(sqlite_path(url), limits, clock)
