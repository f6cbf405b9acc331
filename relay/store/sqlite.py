"""The SQLite backend of the store (aiosqlite: the database work runs on
aiosqlite's thread, never on the event loop): what is SQLite's own. Every
query is in queries.py, shared with PostgreSQL; this module opens the file,
says how a transaction and its locks are taken, and reads a store out for
`relay db migrate-to`.

One connection per process in WAL mode with ``synchronous=FULL``: a committed
archive row survives a power cut. aiosqlite serialises statements but not
transactions, so every write transaction holds `_write_lock`; otherwise two
messages' statements could interleave inside one BEGIN…COMMIT and the
archive chain would fork. A write transaction starts with ``BEGIN
IMMEDIATE``, which takes SQLite's one write lock for the file at once (other
processes wait up to the busy timeout): it is the chain lock, the purge
lock, the upgrade lock and every seller's lock of queries.py at the same
time, so `Transaction.lock()` takes nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
from pathlib import Path

import aiosqlite

from relay import private
from relay.store import StoreDataError, StoreUnavailable, common
from relay.store.common import prepare_bodies as _prepare_bodies  # noqa: F401 - scripts/bench_profile.py
from relay.store.queries import ALIASES, BATCH_BYTES, SqlStore

# How long a statement waits for another process's lock (the CLI beside a
# running server) before the store reports itself unavailable.
BUSY_TIMEOUT_MS = 5000


def migrations() -> list[tuple[int, str]]:
    """The numbered migrations as SQLite runs them (relay/store/schema.py)."""
    return common.migrations("sqlite")


# Result codes (the primary code: the low byte of an extended one) that say
# the value was the problem: the same value fails again.
_DATA_CODES = frozenset({sqlite3.SQLITE_TOOBIG, sqlite3.SQLITE_MISMATCH})


def classify(exc: BaseException) -> type[Exception] | None:
    """What a failure of a statement is (relay/store/__init__.py):
    StoreDataError for a value SQLite cannot take (text that is no Unicode:
    Python's UTF-8 encoder refuses lone surrogates before SQLite sees it; a
    value over SQLite's length limit); StoreUnavailable for the database's
    own state (locked, full, I/O, read-only, damaged schema or file, closed
    connection: it passes or an operator mends it, and the message then goes
    through); None for what is neither (a constraint the caller handles, or
    a bug of the relay: bad SQL, an unsupported parameter type), which goes
    up as it is."""
    if isinstance(exc, sqlite3.IntegrityError):
        return None
    if isinstance(exc, (UnicodeError, sqlite3.DataError)):
        return StoreDataError
    if isinstance(exc, sqlite3.ProgrammingError):
        # The one ProgrammingError that is no bug: a statement on the way
        # out while the store closes.
        return StoreUnavailable if "closed database" in str(exc) else None
    if isinstance(exc, (sqlite3.InterfaceError, sqlite3.NotSupportedError)):
        return None
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return StoreDataError if code is not None and code & 0xFF in _DATA_CODES else StoreUnavailable
    if isinstance(exc, (OSError, ValueError)):
        # ValueError: aiosqlite's "no active connection" after close.
        return StoreUnavailable
    return None


_errors = functools.partial(common.store_errors, classify)


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


class Transaction:
    """A BEGIN IMMEDIATE … COMMIT of the connection (queries.py's seam)."""

    def __init__(self, db: aiosqlite.Connection):
        self._db = db

    async def fetchall(self, sql: str, params=()) -> list:
        with _errors():
            return await self._db.execute_fetchall(sql, params)

    async def fetchone(self, sql: str, params=()):
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def execute(self, sql: str, params=()) -> int:
        with _errors():
            return (await self._db.execute(sql, params)).rowcount

    async def executemany(self, sql: str, rows) -> None:
        with _errors():
            await self._db.executemany(sql, rows)

    async def insert(self, sql: str, params) -> int | None:
        """The new row's id; None when ON CONFLICT DO NOTHING inserted none."""
        with _errors():
            cursor = await self._db.execute(sql, params)
        return cursor.lastrowid if cursor.rowcount == 1 else None

    async def script(self, sql: str) -> None:
        # executescript() would COMMIT our transaction; run the statements
        # one by one so a migration applies whole or not at all.
        for statement in _statements(sql):
            await self.execute(statement)

    async def lock(self, name: str, key: int = 0) -> None:
        """Held already: BEGIN IMMEDIATE took the file's write lock."""


class SqliteStore(SqlStore):
    ENGINE = "sqlite"

    def __init__(self, db: aiosqlite.Connection, path: str):
        self._db = db
        self.path = path
        self._write_lock = asyncio.Lock()
        self._file = _file_identity(path)  # for ping(): is the path still this file?
        self._archive_columns: list[str] | None = None

    @classmethod
    async def open(cls, path: str) -> "SqliteStore":
        with _errors():
            # 0600 before SQLite opens it: it gives -wal and -shm this mode.
            private.create_empty(Path(path))
            db = await aiosqlite.connect(path, isolation_level=None)
            try:
                await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                await db.execute("PRAGMA journal_mode = WAL")
                await db.execute("PRAGMA synchronous = FULL")
                await db.execute("PRAGMA foreign_keys = ON")
            except BaseException:
                await db.close()
                raise
        return cls(db, path)

    async def close(self) -> None:
        await self._db.close()

    @contextlib.asynccontextmanager
    async def _transaction(self):
        async with self._write_lock:
            with _errors():
                await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._db)
            except BaseException:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await self._db.execute("ROLLBACK")
                raise
            with _errors():
                await self._db.execute("COMMIT")

    # Reads run the statement and fetch its rows in one step on aiosqlite's
    # thread. A cursor left open between two steps is a read transaction of
    # the connection, and a BEGIN IMMEDIATE of another coroutine issued
    # meanwhile would then get "database is locked" at once, without
    # waiting the busy timeout, whenever another process or node holds the
    # write lock (SQLite declines to wait while the connection itself holds
    # a read lock).

    async def _fetchall(self, sql: str, params=()) -> list:
        with _errors():
            return list(await self._db.execute_fetchall(sql, params))

    async def _fetchone(self, sql: str, params=()):
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    async def _execute(self, sql: str, params=()) -> int:
        """One statement in a write transaction of its own; its row count."""
        async with self._transaction() as tx:
            return await tx.execute(sql, params)

    @staticmethod
    def _among(column: str, values: list, sql_type: str) -> tuple[str, list]:
        return f"{column} IN ({','.join('?' * len(values))})", list(values)

    @staticmethod
    def _unindexed(expression: str) -> str:
        return "+" + expression  # SQLite's way to keep an index from driving the plan

    @staticmethod
    def _unique_violation(exc: BaseException, table: str | None = None, column: str | None = None) -> bool:
        text = str(exc)
        if not isinstance(exc, sqlite3.IntegrityError) or not text.startswith("UNIQUE constraint failed: "):
            return False
        names = text.split(": ", 1)[1].split(", ")  # "orders.order_ref" or "parties.role, parties.address"
        return table is None or any(name == f"{table}.{column}" if column else name.startswith(f"{table}.")
                                    for name in names)

    async def upgrade(self) -> list[int]:
        applied = await super().upgrade()
        self._archive_columns = None  # the migrations may have added some
        return applied

    async def _archive_dicts(self, rows: list) -> list[dict]:
        # Rows are plain tuples (sqlite3.Row would cost every query); the
        # archive's column names are read once. A migration only ever adds
        # columns at the end, after the names known here, and the extras come
        # first, so a name list older than the file still pairs up.
        if self._archive_columns is None:
            columns = [row[1] for row in await self._fetchall("PRAGMA table_info(archive)")]
            self._archive_columns = ["inline_raw_size", "body_raw", "body_delivered", *columns]
        names = self._archive_columns
        return [dict(zip(names, row)) for row in rows]

    async def _has_table(self, name: str) -> bool:
        row = await self._fetchone("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return row is not None

    # --- health ---------------------------------------------------------------

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers a query and its
        path still names the file the relay has open. An open file keeps
        answering after it was removed, moved or replaced, but SQLite
        refuses to write to it (and a restart would open another): every
        message would get 451 while a query alone looks healthy."""
        await super().ping()
        if self._file is not None and _file_identity(self.path) != self._file:
            raise StoreUnavailable(f"{self.path} is no longer the database file the relay has open "
                                   "(removed, moved or replaced)")

    async def database_bytes(self) -> int:
        """The database's size on disk: the file and its write-ahead log."""
        return sum(os.path.getsize(self.path + suffix) for suffix in ("", "-wal")
                   if os.path.exists(self.path + suffix))

    # --- the source of relay db migrate-to ------------------------------------

    async def tables(self) -> list[str]:
        """The database's own tables (SQLite's internal ones left out)."""
        rows = await self._fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        return [row[0] for row in rows]

    async def table_columns(self, table: str) -> list[str]:
        assert table in await self.tables()  # never from input
        return [row[1] for row in await self._fetchall(f"PRAGMA table_info({table})")]

    @contextlib.asynccontextmanager
    async def snapshot(self):
        """One read transaction around the reads inside: in WAL mode they all
        see the database as of one commit, whatever a running relay writes
        meanwhile (for `relay db migrate-to`)."""
        async with self._write_lock:
            with _errors():
                await self._db.execute("BEGIN")
            try:
                yield self
            finally:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await self._db.execute("COMMIT")

    async def table_rows(self, table: str, columns: list[str], batch: int = 1000):
        """Every row of `table` (those `columns`, as tuples) in rowid order,
        in lists of at most `batch` rows and about BATCH_BYTES."""
        assert set(columns) <= set(await self.table_columns(table))  # never from input
        size = " + ".join(f"COALESCE(length({column}), 0)" for column in columns)
        names = ", ".join(columns)
        after = -(2 ** 63)
        while True:
            sizes = await self._fetchall(
                f"SELECT rowid, {size} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?", (after, batch))
            if not sizes:
                return
            last, total = sizes[0][0], 0
            for rowid, nbytes in sizes:
                if total and total + nbytes > BATCH_BYTES:
                    break
                last, total = rowid, total + nbytes
            yield await self._fetchall(
                f"SELECT {names} FROM {table} WHERE rowid > ? AND rowid <= ? ORDER BY rowid", (after, last))
            after = last


def all_aliases(path) -> list[str]:
    """Every alias of every relationship, from the SQLite file at `path`
    opened read-only: for tools beside a running relay (the postfix
    recipient table), without an event loop."""
    connection = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        return [row[0] for row in connection.execute(ALIASES)]
    finally:
        connection.close()


def _statements(script: str) -> list[str]:
    """Split a migration into statements, using sqlite3's own completeness
    test rather than guessing at semicolons inside strings or triggers."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        if not current and (not line.strip() or line.lstrip().startswith("--")):
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements
