"""The PostgreSQL backend of the store (asyncpg), for several relay nodes on
one database: what is PostgreSQL's own. Every query is in queries.py,
shared with SQLite (same rows, same meaning, the schema of schema.py); this
module opens the pool, says how a transaction and its locks are taken, and
copies a store in for `relay db migrate-to` (COPY).

Connections: a pool per process (``pool_size`` in the URL, default 10),
each connection opened with ``statement_timeout`` (default 5 s: a statement,
or a wait for a lock, that takes longer fails) and an idle-in-transaction
timeout. Every error of the driver, the server or the network — refused
connection, lost connection, timeout, a full pool — becomes
`StoreUnavailable`, which the handler answers with ``451 4.3.0``, exactly as
SQLite's locked or full database does; a value the server cannot take
(SQLSTATE classes 22 and 54) is a `StoreDataError` instead (`classify`).

What several nodes writing at once must not break, and how:

* **One relationship per pair.** ``add_order`` inserts the relationship
  with ``INSERT … ON CONFLICT (seller_id, buyer_id) DO NOTHING`` and then
  reads it: the unique constraint decides, and a node that lost the race
  uses the winner's row (and aliases). A known order reference is a
  `Conflict`, also when two nodes record it at once (its unique constraint).

* **The daily cap.** ``reserve_send`` counts the seller's sends in the
  window and inserts a reservation in one transaction that first takes
  ``pg_advisory_xact_lock(SELLER_LOCKS, seller id)``. Under READ COMMITTED
  each statement sees what was committed before it started, and the lock is
  released only after the previous holder committed, so the count includes
  every reservation made by any node before: no node can let message N+1
  through. The lock is per seller, so sellers never wait for each other,
  and it touches no table row (unlike ``SELECT … FOR UPDATE`` on the
  seller's party row, which would also block `relay seller passwd` and
  friends); SERIALIZABLE would do the same with aborts and retries.

* **One archive chain.** Each row hashes its predecessor's row_sha256, so an
  append must read the last committed row and nobody may append between
  that read and its own commit. ``record`` takes
  ``pg_advisory_xact_lock(RELAY_LOCKS, CHAIN_LOCK)`` first, then reads the
  last row_sha256, then inserts; the id comes from the identity sequence
  *under* the lock, so id order is chain order (what ``verify`` walks).
  A sequence alone was the alternative and does not suffice: it orders the
  rows but cannot give an appender its predecessor's hash (row N-1 may not
  be committed yet, or may roll back and leave a gap), so the chain would
  fork or need a second linking pass. ``LOCK TABLE archive`` would also
  block the purge and readers' row locks; SERIALIZABLE would abort and
  redo multi-megabyte inserts under load. The advisory lock serializes
  exactly the appends, for the few milliseconds of the inserts (hashing and
  compression happen before it is taken), is released at commit or
  rollback or when a node's connection dies, and waiting for it counts
  against ``statement_timeout``, so a stuck holder means 451s, not a hang.
  It is the one point all nodes' archive writes pass through, as SQLite's
  write lock is on one node.

* **Migrations.** ``upgrade`` runs in one transaction holding
  ``pg_advisory_xact_lock(RELAY_LOCKS, UPGRADE_LOCK)``; PostgreSQL's DDL is
  transactional, so two nodes starting together apply each migration once,
  whole.

* **Purge and holds.** Every purge batch and every new hold takes
  ``pg_advisory_xact_lock(RELAY_LOCKS, PURGE_LOCK)``: two nodes' daily
  purges do not tombstone the same rows twice, and a hold placed while a
  purge runs is seen by its next batch.

Advisory locks use the two-int4 key space (class, object), which never
meets the one-bigint space; the classes are the relay's own constants.
"""


from __future__ import annotations

import asyncio
import contextlib
import functools
import re

import asyncpg

from relay.store import StoreDataError, StoreError, StoreUnavailable, common
from relay.store.queries import ALIASES, SqlStore
from relay.store.url import PostgresOptions, postgres_options, redact

# A connection left idle inside a transaction (a hung client) is closed by
# the server after this long, so its locks go.
IDLE_IN_TRANSACTION_MS = 60_000
# How long migrations may wait for another node's migrations.
UPGRADE_TIMEOUT_MS = 600_000

# Advisory lock keys (two int4 each). 0x52454C59 is "RELY".
RELAY_LOCKS = 0x52454C59
UPGRADE_LOCK = 1
CHAIN_LOCK = 2
PURGE_LOCK = 3
SELLER_LOCKS = RELAY_LOCKS + 1  # object: the seller's party id (mod 2^31)

# The tables of the store, in an order that satisfies every foreign key.
TABLES = ("parties", "relationships", "orders", "archive_purges", "archive", "archive_bodies",
          "message_ids", "seller_sends", "archive_holds", "bounces", "api_tokens", "api_idempotency",
          "webhook_events")




def migrations() -> list[tuple[int, str]]:
    """The numbered migrations as PostgreSQL runs them (relay/store/schema.py)."""
    return common.migrations("postgresql")


_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError,
              OSError, asyncio.TimeoutError)


# Server errors about the value, not the database: SQLSTATE class 22
# (data_exception: an invalid byte sequence or a NUL in text, a string too
# long, a bad number) and 54 (program_limit_exceeded: e.g. an index row too
# big for its value). The same value fails again on every retry.
_DATA_CLASSES = ("22", "54")


def classify(exc: BaseException) -> type[Exception] | None:
    """What a failure of a statement is (relay/store/__init__.py), as
    sqlite.classify() says it for SQLite: StoreDataError for a value the
    database cannot take (asyncpg's own DataError when it cannot encode an
    argument, a lone surrogate in text among them; the server's classes in
    `_DATA_CLASSES`); StoreUnavailable for the database's or the network's
    state (lost or refused connection, timeout, full pool, shutdown, locks,
    a damaged schema); None for a constraint the caller handles, which goes
    up as it is, as sqlite3.IntegrityError does."""
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return None
    if isinstance(exc, (UnicodeError, asyncpg.exceptions._base.DataError)):
        return StoreDataError
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return StoreDataError if sqlstate[:2] in _DATA_CLASSES else StoreUnavailable
    if isinstance(exc, _DB_ERRORS):
        return StoreUnavailable
    return None


_errors = functools.partial(common.store_errors, classify)


def _rowcount(status: str) -> int:
    """The row count of a command tag such as 'UPDATE 3' or 'INSERT 0 1'
    (0 for one without, such as 'CREATE TABLE')."""
    count = status.rsplit(" ", 1)[-1]
    return int(count) if count.isdigit() else 0


@functools.lru_cache(maxsize=1024)
def numbered(sql: str) -> str:
    """queries.py's ``?`` placeholders as asyncpg's ``$1, $2, …`` (no query
    of the store has a ``?`` inside a string literal)."""
    counter = iter(range(1, sql.count("?") + 1))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


# The advisory lock of each lock of queries.py: (class, object).
_LOCKS = {"upgrade": (RELAY_LOCKS, UPGRADE_LOCK), "chain": (RELAY_LOCKS, CHAIN_LOCK),
          "purge": (RELAY_LOCKS, PURGE_LOCK)}


class Transaction:
    """One transaction on a pooled connection (queries.py's seam)."""

    def __init__(self, conn):
        self.conn = conn

    async def fetchall(self, sql: str, params=()) -> list:
        with _errors():
            return await self.conn.fetch(numbered(sql), *params)

    async def fetchone(self, sql: str, params=()):
        with _errors():
            return await self.conn.fetchrow(numbered(sql), *params)

    async def execute(self, sql: str, params=()) -> int:
        with _errors():
            return _rowcount(await self.conn.execute(numbered(sql), *params))

    async def executemany(self, sql: str, rows) -> None:
        with _errors():
            await self.conn.executemany(numbered(sql), rows)

    async def insert(self, sql: str, params) -> int | None:
        """The new row's id; None when ON CONFLICT DO NOTHING inserted none."""
        with _errors():
            return await self.conn.fetchval(numbered(sql + " RETURNING id"), *params)

    async def script(self, sql: str) -> None:
        with _errors():
            await self.conn.execute(sql)  # no arguments: the whole migration, as one script

    async def lock(self, name: str, key: int = 0) -> None:
        """The advisory lock `name` (a seller's: `key` is the seller id),
        held until this transaction ends (the module docstring says why
        each exists). Migrations may wait longer for another node's."""
        key_class, key = (SELLER_LOCKS, key % 2**31) if name == "seller" else _LOCKS[name]
        with _errors():
            if name == "upgrade":
                await self.conn.execute(f"SET LOCAL statement_timeout = {UPGRADE_TIMEOUT_MS}")
            await self.conn.execute("SELECT pg_advisory_xact_lock($1::int, $2::int)", key_class, key)


class PostgresStore(SqlStore):
    ENGINE = "postgresql"

    def __init__(self, pool: asyncpg.Pool, options: PostgresOptions, url: str):
        self._pool = pool
        self.options = options
        self.url = redact(url)
        self._acquire_timeout = options.statement_timeout_ms / 1000

    @classmethod
    async def open(cls, url: str) -> "PostgresStore":
        try:
            options = postgres_options(url)
        except ValueError as exc:
            raise StoreError(f"database: {exc}") from None
        with _errors():
            pool = await asyncpg.create_pool(
                options.dsn, min_size=1, max_size=options.pool_size, timeout=options.connect_timeout,
                command_timeout=None, max_inactive_connection_lifetime=300.0,
                server_settings={
                    "statement_timeout": str(options.statement_timeout_ms),
                    "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS),
                    "application_name": "relay",
                })
        return cls(pool, options, url)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout=10)
        except (asyncio.TimeoutError, *_DB_ERRORS):
            self._pool.terminate()

    @contextlib.asynccontextmanager
    async def _connection(self):
        with _errors():
            conn = await self._pool.acquire(timeout=self._acquire_timeout)
        try:
            yield conn
        finally:
            with contextlib.suppress(*_DB_ERRORS):
                await self._pool.release(conn)

    @contextlib.asynccontextmanager
    async def _transaction(self):
        async with self._connection() as conn:
            transaction = conn.transaction()
            with _errors():
                await transaction.start()
            try:
                yield Transaction(conn)
            except BaseException:
                with contextlib.suppress(*_DB_ERRORS):
                    await transaction.rollback()
                raise
            with _errors():
                await transaction.commit()

    # One statement outside a transaction of ours: asyncpg runs it in one
    # of its own on a pooled connection.

    async def _fetchall(self, sql: str, params=()) -> list:
        async with self._connection() as conn:
            return await Transaction(conn).fetchall(sql, params)

    async def _fetchone(self, sql: str, params=()):
        async with self._connection() as conn:
            return await Transaction(conn).fetchone(sql, params)

    async def _execute(self, sql: str, params=()) -> int:
        async with self._connection() as conn:
            return await Transaction(conn).execute(sql, params)

    @staticmethod
    def _among(column: str, values: list, sql_type: str) -> tuple[str, list]:
        return f"{column} = ANY(?::{sql_type}[])", [list(values)]

    @staticmethod
    def _unindexed(expression: str) -> str:
        return expression  # the planner has statistics

    @staticmethod
    def _unique_violation(exc: BaseException, table: str | None = None, column: str | None = None) -> bool:
        if not isinstance(exc, asyncpg.UniqueViolationError):
            return False
        name = exc.constraint_name or ""
        # PostgreSQL's own names: <table>_<column>_key, <table>_pkey, …
        return table is None or (name == f"{table}_{column}_key" if column else name.startswith(f"{table}_"))

    @staticmethod
    async def _archive_dicts(rows: list) -> list[dict]:
        return [dict(row) for row in rows]

    async def _has_table(self, name: str) -> bool:
        row = await self._fetchone("SELECT to_regclass(?) IS NOT NULL", (name,))
        return row[0]

    async def database_bytes(self) -> int:
        """The database's size on the server's disk."""
        row = await self._fetchone("SELECT pg_database_size(current_database())")
        return row[0]

    # --- relay db migrate-to ---------------------------------------------------

    @contextlib.asynccontextmanager
    async def bulk_load(self):
        """A `Loader` for copying another store in: one transaction that
        holds every lock of the relay (no node may migrate, append, reserve
        or purge meanwhile), refuses a database that holds any row, and
        commits only when the whole copy is done (a failed copy leaves the
        database empty)."""
        async with self._transaction() as tx:
            for name in ("upgrade", "chain", "purge"):
                await tx.lock(name)
            conn = tx.conn
            with _errors():
                await conn.execute("SET LOCAL statement_timeout = 0")  # a big archive takes its time
                for table in TABLES:
                    if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                        raise StoreError(f"{self.url} is not empty ({table} has rows); "
                                         "migrate-to copies into an empty database only")
            loader = Loader(conn)
            yield loader
            with _errors():
                await loader.advance_sequences()


class Loader:
    """Rows copied into an empty PostgreSQL store with their ids (COPY)."""

    def __init__(self, conn):
        self._conn = conn
        self.counts: dict[str, int] = {}

    async def columns(self, table: str) -> dict[str, str]:
        """The table's columns: name -> PostgreSQL type."""
        assert table in TABLES  # never from input
        with _errors():
            rows = await self._conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position", table)
        return {row[0]: row[1] for row in rows}

    async def copy(self, table: str, columns: list[str], rows: list) -> None:
        types = await self.columns(table)
        convert = [_converter(types[column]) for column in columns]
        records = [tuple(None if value is None else fn(value) for fn, value in zip(convert, row)) for row in rows]
        with _errors():
            await self._conn.copy_records_to_table(table, records=records, columns=columns)
        self.counts[table] = self.counts.get(table, 0) + len(records)

    async def advance_sequences(self) -> None:
        """Move each id sequence past the copied ids, so the next row a node
        inserts gets a fresh one."""
        for table in TABLES:
            if "id" not in await self.columns(table):
                continue
            sequence = await self._conn.fetchval("SELECT pg_get_serial_sequence($1, 'id')", table)
            if sequence is None:
                continue
            await self._conn.execute(
                f"SELECT setval($1::regclass, COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)", sequence)


def _converter(pg_type: str):
    """SQLite is dynamically typed: make each value what the column holds."""
    if pg_type == "bytea":
        return lambda value: value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if pg_type in ("bigint", "integer", "smallint"):
        return int
    if pg_type == "text":
        return lambda value: value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return lambda value: value


async def all_aliases(url: str) -> list[str]:
    """Every alias of every relationship, over one short connection."""
    options = postgres_options(url)
    with _errors():
        conn = await asyncpg.connect(options.dsn, timeout=options.connect_timeout,
                                     server_settings={"statement_timeout": str(options.statement_timeout_ms)})
        try:
            rows = await conn.fetch(ALIASES)
        finally:
            await conn.close()
    return [row[0] for row in rows]
