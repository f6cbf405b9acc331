"""The PostgreSQL backend of the store (asyncpg), for several relay nodes on
one database. Same methods, same rows and same meaning as sqlite.py; the
schema is migrations/postgresql/, numbered like migrations/sqlite/.

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
import json

import asyncpg

from relay import addresses
from relay import archive as archive_logic
from relay.store import (
    BODY_ENCODING,
    GENESIS_HASH,
    ArchiveEntry,
    Conflict,
    MessageIdRow,
    NotFound,
    Party,
    PurgeCounts,
    Relationship,
    RelationshipStats,
    StoreDataError,
    StoreError,
    StoreUnavailable,
    chain_hash,
    utc_now,
)
from relay.store import common
from relay.store.common import RELATIONSHIP_SELECT, checked, decoded, prepare_bodies, purge_check, relationship_from_row
from relay.store.url import PostgresOptions, postgres_options, redact

# Upper bound on ids looked up per message: References can be hostile.
MAX_LOOKUP_IDS = 100
# Stored body bytes read at once by verify, export and purge.
BATCH_BYTES = 32 * 1024 * 1024
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
          "message_ids", "seller_sends", "archive_holds", "bounces")


def migrations() -> list[tuple[int, str]]:
    """The numbered migrations shipped in relay/store/migrations/postgresql/."""
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


@contextlib.contextmanager
def _unavailable_on_db_error():
    try:
        yield
    except Exception as exc:
        kind = classify(exc)
        if kind is None:
            raise
        if kind is StoreDataError:
            raise StoreDataError(f"database refused a value: {type(exc).__name__}: {exc}") from exc
        raise StoreUnavailable(f"database error: {type(exc).__name__}: {exc}") from exc


def _rowcount(status: str) -> int:
    """The row count of a command tag such as 'UPDATE 3' or 'INSERT 0 1'."""
    return int(status.rsplit(" ", 1)[-1])


async def _lock(conn, key_class: int, key: int) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock($1::int, $2::int)", key_class, key % 2**31)


class _Args:
    """Numbered placeholders for a query built piece by piece."""

    def __init__(self, *values):
        self.values = list(values)

    def __call__(self, value) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


class PostgresStore:
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
        with _unavailable_on_db_error():
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
        with _unavailable_on_db_error():
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
            with _unavailable_on_db_error():
                await transaction.start()
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(*_DB_ERRORS):
                    await transaction.rollback()
                raise
            with _unavailable_on_db_error():
                await transaction.commit()

    async def _fetchone(self, sql: str, params=()):
        async with self._connection() as conn:
            with _unavailable_on_db_error():
                return await conn.fetchrow(sql, *params)

    async def _fetchall(self, sql: str, params=()):
        async with self._connection() as conn:
            with _unavailable_on_db_error():
                return await conn.fetch(sql, *params)

    async def _execute(self, sql: str, params=()) -> int:
        """Run one statement in its own transaction; its row count."""
        async with self._connection() as conn:
            with _unavailable_on_db_error():
                return _rowcount(await conn.execute(sql, *params))

    # --- schema -----------------------------------------------------------

    async def upgrade(self) -> list[int]:
        """Apply the migrations not yet applied; return their numbers. Safe
        to run from several nodes at once (an advisory lock)."""
        applied = []
        async with self._transaction() as conn:
            with _unavailable_on_db_error():
                await conn.execute(f"SET LOCAL statement_timeout = {UPGRADE_TIMEOUT_MS}")
                await _lock(conn, RELAY_LOCKS, UPGRADE_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
                done = {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")}
                for version, sql in migrations():
                    if version in done:
                        continue
                    await conn.execute(sql)  # no arguments: the whole file, as one script
                    await conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                                       version, utc_now())
                    applied.append(version)
        return applied

    async def schema_version(self) -> int:
        row = await self._fetchone("SELECT to_regclass('schema_migrations') IS NOT NULL")
        if not row[0]:
            return 0
        row = await self._fetchone("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return row[0]

    # --- parties, orders, relationships -----------------------------------

    async def add_party(self, role: str, address: str, display_name: str) -> Party:
        address = addresses.normalize(address)
        try:
            async with self._transaction() as conn:
                with _unavailable_on_db_error():
                    party_id = await conn.fetchval(
                        "INSERT INTO parties (role, address, display_name, created_at)"
                        " VALUES ($1, $2, $3, $4) RETURNING id",
                        role, address, display_name, utc_now())
        except asyncpg.UniqueViolationError:
            raise Conflict(f"{role} {address} is already registered") from None
        return Party(party_id, role, address, display_name)

    async def get_party(self, role: str, address: str) -> Party | None:
        row = await self._fetchone(
            "SELECT id, address, display_name, opted_out, daily_orders FROM parties"
            " WHERE role = $1 AND address = $2", (role, addresses.normalize(address)))
        return None if row is None else Party(row[0], role, row[1], row[2], bool(row[3]), row[4])

    async def _update_party(self, role: str, address: str, column: str, value) -> Party:
        assert column in ("password_hash", "daily_orders", "opted_out")  # never from input
        count = await self._execute(f"UPDATE parties SET {column} = $1 WHERE role = $2 AND address = $3",
                                    (value, role, addresses.normalize(address)))
        if count == 0:
            raise NotFound(f"no {role} {addresses.normalize(address)}; add it with `relay {role} add`")
        party = await self.get_party(role, address)
        assert party is not None
        return party

    async def set_password_hash(self, seller: str, password_hash: str) -> Party:
        return await self._update_party("seller", seller, "password_hash", password_hash)

    async def password_hash(self, seller: str) -> tuple[Party, str] | None:
        """The seller and its stored hash, or None if unknown or without one."""
        row = await self._fetchone(
            "SELECT id, address, display_name, opted_out, daily_orders, password_hash FROM parties"
            " WHERE role = 'seller' AND address = $1", (addresses.normalize(seller),))
        if row is None or not row[5]:
            return None
        return Party(row[0], "seller", row[1], row[2], bool(row[3]), row[4]), row[5]

    async def set_daily_orders(self, seller: str, daily_orders: int | None) -> Party:
        return await self._update_party("seller", seller, "daily_orders", daily_orders)

    async def set_opted_out(self, buyer: str, opted_out: bool) -> Party:
        return await self._update_party("buyer", buyer, "opted_out", int(opted_out))

    # --- the sending rules ------------------------------------------------------

    async def seller_sends_since(self, seller_id: int, since: str) -> tuple[int, str | None]:
        """(messages the seller sent since `since`, the oldest of them);
        reservations of messages being forwarded count too."""
        row = await self._fetchone(
            "SELECT COUNT(*), MIN(sent_at) FROM seller_sends WHERE seller_id = $1 AND sent_at >= $2",
            (seller_id, since))
        return row[0], row[1]

    async def reserve_send(self, seller_id: int, at: str, window_start: str,
                           cap: int) -> tuple[int | None, int, str | None]:
        """Take a place under the seller's daily cap for a message about to
        be forwarded: count the seller's seller_sends rows since
        `window_start` (reservations included) and, if fewer than `cap`,
        insert a reservation (archive_id NULL, sent_at `at`). Returns
        (reservation id or None when the cap is reached, the count, the
        oldest sent_at in the window).

        Serialized per seller across every node by
        ``pg_advisory_xact_lock(SELLER_LOCKS, seller_id)``, taken before the
        count: the count statement then sees every reservation that another
        node committed before handing the lock over, so no two nodes can
        both see room for one more message; other sellers never wait, and no
        table row is locked (the module docstring compares the other ways)."""
        async with self._transaction() as conn:
            with _unavailable_on_db_error():
                await _lock(conn, SELLER_LOCKS, seller_id)
                count, oldest = await conn.fetchrow(
                    "SELECT COUNT(*), MIN(sent_at) FROM seller_sends WHERE seller_id = $1 AND sent_at >= $2",
                    seller_id, window_start)
                if count >= cap:
                    return None, count, oldest
                reservation = await conn.fetchval(
                    "INSERT INTO seller_sends (seller_id, archive_id, sent_at) VALUES ($1, NULL, $2) RETURNING id",
                    seller_id, at)
                return reservation, count, oldest

    async def release_send(self, reservation_id: int) -> None:
        """Give back a place taken by `reserve_send()` for a message that
        was not archived (record() itself settles the others)."""
        await self._execute("DELETE FROM seller_sends WHERE id = $1 AND archive_id IS NULL", (reservation_id,))

    async def prune_seller_sends(self, before: str) -> int:
        """Forget cap bookkeeping older than `before` (the cap only ever looks
        back one window; the archive keeps the messages themselves)."""
        return await self._execute("DELETE FROM seller_sends WHERE sent_at < $1", (before,))

    async def seller_orders_since(self, seller_id: int, since: str) -> int:
        row = await self._fetchone(
            "SELECT COUNT(*) FROM orders o JOIN relationships r ON r.id = o.relationship_id"
            " WHERE r.seller_id = $1 AND o.placed_at >= $2", (seller_id, since))
        return row[0]

    async def latest_order_at(self, relationship_id: int) -> str | None:
        row = await self._fetchone("SELECT MAX(placed_at) FROM orders WHERE relationship_id = $1",
                                   (relationship_id,))
        return row[0]

    async def seller_relationships(self, seller: str) -> list[Relationship]:
        rows = await self._fetchall(RELATIONSHIP_SELECT + " WHERE s.address = $1 ORDER BY r.id",
                                    (addresses.normalize(seller),))
        return [relationship_from_row(row) for row in rows]

    async def add_order(
        self, order_ref: str, seller: str, buyer: str, placed_at: str, domain: str
    ) -> tuple[Relationship, bool]:
        """Record an order; create the pair's relationship on its first order.

        Returns the relationship and whether it was created now. A known
        order reference is a Conflict and changes nothing. Two nodes adding
        the first orders of one pair at once get the same relationship."""
        seller_party = await self.get_party("seller", seller)
        if seller_party is None:
            raise NotFound(f"no seller {addresses.normalize(seller)}; add it with `relay seller add`")
        buyer_party = await self.get_party("buyer", buyer)
        if buyer_party is None:
            raise NotFound(f"no buyer {addresses.normalize(buyer)}; add it with `relay buyer add`")
        created = False
        try:
            async with self._transaction() as conn:
                with _unavailable_on_db_error():
                    if await conn.fetchval("SELECT 1 FROM orders WHERE order_ref = $1", order_ref) is not None:
                        raise Conflict(f"order {order_ref} is already recorded")
                    relationship_id = await conn.fetchval(
                        "INSERT INTO relationships (seller_id, buyer_id, seller_alias, buyer_alias, created_at)"
                        " VALUES ($1, $2, $3, $4, $5)"
                        " ON CONFLICT (seller_id, buyer_id) DO NOTHING RETURNING id",
                        seller_party.id, buyer_party.id, f"{addresses.new_alias_token()}@{domain}",
                        f"{addresses.new_alias_token()}@{domain}", utc_now())
                    if relationship_id is None:  # it exists (maybe since a moment, from another node)
                        relationship_id = await conn.fetchval(
                            "SELECT id FROM relationships WHERE seller_id = $1 AND buyer_id = $2",
                            seller_party.id, buyer_party.id)
                    else:
                        created = True
                    await conn.execute(
                        "INSERT INTO orders (order_ref, relationship_id, placed_at, created_at) VALUES ($1, $2, $3, $4)",
                        order_ref, relationship_id, placed_at, utc_now())
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "orders_order_ref_key":  # recorded by another node just now
                raise Conflict(f"order {order_ref} is already recorded") from None
            raise StoreUnavailable(f"database error: {exc}") from exc
        relationship = await self.relationship_by_id(relationship_id)
        assert relationship is not None
        return relationship, created

    async def relationship_by_id(self, relationship_id: int) -> Relationship | None:
        row = await self._fetchone(RELATIONSHIP_SELECT + " WHERE r.id = $1", (relationship_id,))
        return None if row is None else relationship_from_row(row)

    async def relationship_by_alias(self, alias: str) -> Relationship | None:
        alias = addresses.normalize(alias)
        row = await self._fetchone(RELATIONSHIP_SELECT + " WHERE r.seller_alias = $1 OR r.buyer_alias = $1",
                                   (alias,))
        return None if row is None else relationship_from_row(row)

    async def relationship_for_pair(self, seller: str, buyer: str) -> Relationship | None:
        row = await self._fetchone(RELATIONSHIP_SELECT + " WHERE s.address = $1 AND b.address = $2",
                                   (addresses.normalize(seller), addresses.normalize(buyer)))
        return None if row is None else relationship_from_row(row)

    async def relationship_stats(self, relationship_id: int) -> RelationshipStats:
        orders = await self._fetchone("SELECT COUNT(*) FROM orders WHERE relationship_id = $1", (relationship_id,))
        rows = await self._fetchall(
            "SELECT direction, COUNT(*), MAX(received_at) FROM archive"
            " WHERE relationship_id = $1 AND verdict = 'delivered' GROUP BY direction", (relationship_id,))
        counts = {direction: count for direction, count, _ in rows}
        last = max((latest for _, _, latest in rows), default=None)
        return RelationshipStats(
            orders=orders[0],
            buyer_to_seller=counts.get("buyer_to_seller", 0),
            seller_to_buyer=counts.get("seller_to_buyer", 0),
            last_message_at=last,
        )

    # --- threading ----------------------------------------------------------

    async def message_id_rows(self, relationship_id: int, ids: list[str]) -> list[MessageIdRow]:
        """Map entries of this relationship whose relay or original id is in `ids`
        (ids as the email package spells them; common.stored_id)."""
        ids = list(dict.fromkeys(common.stored_id(i) for i in ids))[-MAX_LOOKUP_IDS:]
        if not ids:
            return []
        rows = await self._fetchall(
            "SELECT sender_id, original_id, relay_id FROM message_ids"
            " WHERE relationship_id = $1 AND (relay_id = ANY($2::text[]) OR original_id = ANY($2::text[]))",
            (relationship_id, ids))
        return [common.message_id_row(*row) for row in rows]

    # --- archive ------------------------------------------------------------

    async def record(self, entry: ArchiveEntry) -> int:
        """Append `entry` to the archive (and its Message-ID map row, and the
        daily-cap row of a delivered seller message, settling
        `entry.send_reservation`) in one transaction; return the archive id
        once committed. Appends from every node are serialized by the chain
        lock (module docstring)."""
        # Message-borne text (8-bit bytes as surrogates) in the spelling both
        # engines store, before the row is hashed: the chain covers what is stored.
        entry = common.storable_entry(entry)
        metadata = entry.metadata()
        # Hashing and compressing a 10 MB message takes a while: off the loop,
        # and before the chain lock is taken.
        raw_sha, delivered_sha, raw_blob, delivered_blob, auto_reply = await asyncio.to_thread(
            prepare_bodies, entry.raw, entry.delivered)
        async with self._transaction() as conn:
            with _unavailable_on_db_error():
                await _lock(conn, RELAY_LOCKS, CHAIN_LOCK)
                prev = await conn.fetchval("SELECT row_sha256 FROM archive ORDER BY id DESC LIMIT 1") or GENESIS_HASH
                archive_id = await conn.fetchval(
                    "INSERT INTO archive (received_at, relationship_id, direction,"
                    " client_address, mail_from, rcpt_to, verdict, reply, changes,"
                    " raw, delivered, raw_sha256, delivered_sha256, prev_sha256, row_sha256,"
                    " body_encoding, raw_size, delivered_size, auto_reply)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)"
                    " RETURNING id",
                    entry.received_at,
                    entry.relationship_id,
                    entry.direction,
                    entry.client_address,
                    entry.mail_from,
                    json.dumps(list(entry.rcpt_to)),
                    entry.verdict,
                    entry.reply,
                    json.dumps(list(entry.changes)),
                    b"",  # the bodies live in archive_bodies
                    None,
                    raw_sha,
                    delivered_sha,
                    prev,
                    chain_hash(metadata, raw_sha, delivered_sha, prev),
                    BODY_ENCODING,
                    len(entry.raw),
                    None if entry.delivered is None else len(entry.delivered),
                    int(auto_reply),
                )
                await conn.execute("INSERT INTO archive_bodies (archive_id, raw, delivered) VALUES ($1, $2, $3)",
                                   archive_id, raw_blob, delivered_blob)
                delivered = entry.verdict == "delivered"
                counted = False
                if entry.send_reservation is not None:
                    if delivered:  # the reserved place becomes this message's row
                        counted = _rowcount(await conn.execute(
                            "UPDATE seller_sends SET archive_id = $1, sent_at = $2 WHERE id = $3 AND archive_id IS NULL",
                            archive_id, entry.received_at, entry.send_reservation)) == 1
                    else:  # not sent: the place is free again
                        await conn.execute("DELETE FROM seller_sends WHERE id = $1 AND archive_id IS NULL",
                                           entry.send_reservation)
                if delivered and not counted and entry.direction == "seller_to_buyer" and entry.sender_id:
                    await conn.execute("INSERT INTO seller_sends (seller_id, archive_id, sent_at) VALUES ($1, $2, $3)",
                                       entry.sender_id, archive_id, entry.received_at)
                if entry.relay_message_id and delivered:
                    await conn.execute(
                        "INSERT INTO message_ids (relationship_id, sender_id, original_id, relay_id, archive_id,"
                        " created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                        entry.relationship_id, entry.sender_id, entry.original_message_id,
                        entry.relay_message_id, archive_id, entry.received_at)
        return archive_id

    async def archive_row(self, archive_id: int) -> dict | None:
        """One archive row as a dict, as SqliteStore.archive_row() gives it."""
        rows = await self._archive_rows(" WHERE a.id = $1", (archive_id,))
        if not rows:
            return None
        [row] = await asyncio.to_thread(lambda: [decoded(r) for r in rows])
        return row

    async def archive_ids(self) -> list[int]:
        return [row[0] for row in await self._fetchall("SELECT id FROM archive ORDER BY id")]

    # --- dispute tools (relay archive …, relay purge, relay report) -----------

    async def _archive_rows(self, where: str, params=()) -> list[dict]:
        """Archive rows joined with their bodies, still encoded."""
        rows = await self._fetchall(
            "SELECT a.*, length(a.raw) AS inline_raw_size, b.raw AS body_raw, b.delivered AS body_delivered"
            " FROM archive a LEFT JOIN archive_bodies b ON b.archive_id = a.id" + where, params)
        return [dict(row) for row in rows]

    async def _archive_batch(self, where: str, params, order: str, limit: int) -> list[dict]:
        """Up to `limit` rows matching `where` (placeholders $1…$n for
        `params`), in `order`, but no more than BATCH_BYTES of stored bodies
        (at least one row). length() of a TOASTed value reads its header,
        not the value."""
        sizes = await self._fetchall(
            "SELECT a.id, length(a.raw) + COALESCE(length(a.delivered), 0)"
            " + COALESCE(length(b.raw), 0) + COALESCE(length(b.delivered), 0)"
            f" FROM archive a LEFT JOIN archive_bodies b ON b.archive_id = a.id{where}"
            f" ORDER BY {order} LIMIT ${len(params) + 1}", (*params, limit))
        ids, total = [], 0
        for archive_id, size in sizes:
            if ids and total + size > BATCH_BYTES:
                break
            ids.append(archive_id)
            total += size
        if not ids:
            return []
        return await self._archive_rows(f" WHERE a.id = ANY($1::bigint[]) ORDER BY {order}", (ids,))

    async def archive_chain(self, batch: int = 500):
        """Every archive row in id order, decoded and with `content_problem`,
        for `relay archive verify` (as SqliteStore.archive_chain)."""

        def read(after):
            if after is None:
                return asyncio.ensure_future(self._archive_batch("", (), "a.id", batch))
            return asyncio.ensure_future(self._archive_batch(" WHERE a.id > $1", (after,), "a.id", batch))

        pending = read(None)
        try:
            while True:
                rows = await pending
                if not rows:
                    return
                pending = read(rows[-1]["id"])
                for row in await asyncio.to_thread(checked, rows):
                    yield row
        finally:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending

    async def conversation(self, relationship_id: int, batch: int = 50):
        """A relationship's archive rows in order, both directions, decoded."""
        last = None
        while True:
            where, params = " WHERE a.relationship_id = $1", [relationship_id]
            if last is not None:
                where += " AND a.id > $2"
                params.append(last)
            rows = await self._archive_batch(where, params, "a.id", batch)
            if not rows:
                return
            for row in await asyncio.to_thread(lambda: [decoded(r) for r in rows]):
                yield row
            last = rows[-1]["id"]

    async def archive_list(self, *, relationship_id: int | None = None, seller: str | None = None,
                           buyer: str | None = None, since: str | None = None, until: str | None = None,
                           verdict: str | None = None, limit: int = 50, offset: int = 0) -> list[dict]:
        """Archive rows newest first (by received_at, then id), without
        bodies; `since` inclusive, `until` exclusive (store timestamps).
        PostgreSQL's planner has statistics: no plan hints here."""
        arg = _Args()
        clauses = []
        if relationship_id is not None:
            clauses.append(f"a.relationship_id = {arg(relationship_id)}")
        for role, address in (("seller", seller), ("buyer", buyer)):
            if address is not None:
                clauses.append(f"a.relationship_id IN (SELECT r2.id FROM relationships r2"
                               f" JOIN parties p2 ON p2.id = r2.{role}_id"
                               f" WHERE p2.role = '{role}' AND p2.address = {arg(addresses.normalize(address))})")
        if since is not None:
            clauses.append(f"a.received_at >= {arg(since)}")
        if until is not None:
            clauses.append(f"a.received_at < {arg(until)}")
        if verdict is not None:
            clauses.append(f"a.verdict = {arg(verdict)}")
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = await self._fetchall(
            "SELECT a.id, a.received_at, a.relationship_id, a.direction, a.verdict, a.reply,"
            " COALESCE(a.raw_size, length(a.raw)), COALESCE(a.delivered_size, length(a.delivered)),"
            " a.purged_at, s.address, b.address"
            " FROM archive a"
            " LEFT JOIN relationships r ON r.id = a.relationship_id"
            " LEFT JOIN parties s ON s.id = r.seller_id"
            " LEFT JOIN parties b ON b.id = r.buyer_id"
            f"{where} ORDER BY a.received_at DESC, a.id DESC LIMIT {arg(limit)} OFFSET {arg(offset)}",
            arg.values)
        return [
            {"id": row[0], "received_at": row[1], "relationship": row[2], "direction": row[3],
             "verdict": row[4], "reply": row[5], "bytes": row[6] if not row[8] else None,
             "delivered_bytes": row[7] if not row[8] else None, "purged_at": row[8],
             "seller": row[9], "buyer": row[10]}
            for row in rows
        ]

    async def archive_head(self) -> str | None:
        """The newest row's row_sha256 (None for an empty archive)."""
        row = await self._fetchone("SELECT row_sha256 FROM archive ORDER BY id DESC LIMIT 1")
        return None if row is None else row[0]

    async def archive_id_by_row_hash(self, row_sha256: str) -> int | None:
        """The row whose row_sha256 is this (a full scan: for diagnosing a break)."""
        row = await self._fetchone("SELECT id FROM archive WHERE row_sha256 = $1 LIMIT 1", (row_sha256,))
        return None if row is None else row[0]

    async def archive_dangling_references(self, limit: int = 100) -> list[tuple[str, int]]:
        """(table, archive id) of references to archive rows that do not exist."""
        rows = await self._fetchall(
            "SELECT t, archive_id FROM ("
            " SELECT 'message_ids' AS t, archive_id FROM message_ids m"
            "  WHERE NOT EXISTS (SELECT 1 FROM archive a WHERE a.id = m.archive_id)"
            " UNION ALL SELECT 'seller_sends', archive_id FROM seller_sends s"
            "  WHERE s.archive_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM archive a WHERE a.id = s.archive_id)"
            " UNION ALL SELECT 'archive_bodies', archive_id FROM archive_bodies b"
            "  WHERE NOT EXISTS (SELECT 1 FROM archive a WHERE a.id = b.archive_id)"
            ") AS refs ORDER BY archive_id, t LIMIT $1", (limit,))
        return [(row[0], row[1]) for row in rows]

    async def purge_runs(self) -> dict[int, str]:
        """Recorded purge runs: id -> cutoff."""
        return {row[0]: row[1] for row in await self._fetchall("SELECT id, cutoff FROM archive_purges")}

    async def hold(self, relationship_id: int, reason: str = "", at: str | None = None) -> bool:
        """Keep the relationship's archive from purge; False if already held."""
        if await self.relationship_by_id(relationship_id) is None:
            raise NotFound(f"no relationship {relationship_id}")
        async with self._transaction() as conn:
            with _unavailable_on_db_error():
                await _lock(conn, RELAY_LOCKS, PURGE_LOCK)  # a purge batch running now finishes first
                status = await conn.execute(
                    "INSERT INTO archive_holds (relationship_id, held_at, reason) VALUES ($1, $2, $3)"
                    " ON CONFLICT (relationship_id) DO NOTHING", relationship_id, at or utc_now(), reason)
        return _rowcount(status) == 1

    async def release(self, relationship_id: int) -> bool:
        """End a hold; False if there was none."""
        return await self._execute("DELETE FROM archive_holds WHERE relationship_id = $1", (relationship_id,)) == 1

    async def holds(self) -> list[dict]:
        rows = await self._fetchall(
            "SELECT h.relationship_id, h.held_at, h.reason, s.address, b.address FROM archive_holds h"
            " JOIN relationships r ON r.id = h.relationship_id"
            " JOIN parties s ON s.id = r.seller_id JOIN parties b ON b.id = r.buyer_id"
            " ORDER BY h.relationship_id")
        return [{"relationship": row[0], "held_at": row[1], "reason": row[2], "seller": row[3],
                 "buyer": row[4]} for row in rows]

    async def purge(self, before_iso: str, dry_run: bool = False, *, batch: int = 500,
                    now: str | None = None, progress=None) -> PurgeCounts:
        """Turn archive rows received before `before_iso` into tombstones, as
        SqliteStore.purge() does (its docstring has the rules). Each batch's
        transaction holds the purge lock, so the daily purges of several
        nodes take turns and never tombstone a row twice."""
        held = await self._fetchone(
            "SELECT COUNT(*) FROM archive WHERE purged_at IS NULL AND received_at < $1"
            " AND relationship_id IN (SELECT relationship_id FROM archive_holds)", (before_iso,))
        counts = dict(rows=0, bytes=0, message_ids=0, bounces=0, damaged=0)
        run_id = None
        cursor_key = ("", 0)
        eligible = ("a.purged_at IS NULL AND (a.relationship_id IS NULL OR a.relationship_id NOT IN"
                    " (SELECT relationship_id FROM archive_holds))")
        while True:
            rows = await self._archive_batch(
                f" WHERE {eligible} AND a.received_at < $1 AND (a.received_at, a.id) > ($2, $3)",
                (before_iso, *cursor_key), "a.received_at, a.id", batch)
            if not rows:
                break
            if progress is not None:  # `relay purge` on a terminal: rows looked at in this batch
                progress(len(rows))
            cursor_key = (rows[-1]["received_at"], rows[-1]["id"])
            found = await asyncio.to_thread(purge_check, rows)
            good = [(row_id, auto, size) for row_id, auto, size, problem in found if problem is None]
            counts["damaged"] += len(found) - len(good)
            if not good:
                continue
            ids = [row_id for row_id, _, _ in good]
            if dry_run:
                row = await self._fetchone("SELECT COUNT(*) FROM message_ids WHERE archive_id = ANY($1::bigint[])",
                                           (ids,))
                counts["rows"] += len(good)
                counts["bytes"] += sum(size for _, _, size in good)
                counts["message_ids"] += row[0]
                row = await self._fetchone("SELECT COUNT(*) FROM bounces WHERE archive_id = ANY($1::bigint[])", (ids,))
                counts["bounces"] += row[0]
                continue
            stamp = now or utc_now()
            async with self._transaction() as conn:
                with _unavailable_on_db_error():
                    await _lock(conn, RELAY_LOCKS, PURGE_LOCK)
                    # Re-check under the lock: a hold placed or another
                    # node's purge finished since the rows were read.
                    still = {row[0] for row in await conn.fetch(
                        f"SELECT a.id FROM archive a WHERE a.id = ANY($1::bigint[]) AND {eligible}", ids)}
                    good = [item for item in good if item[0] in still]
                    if not good:
                        continue
                    ids = [row_id for row_id, _, _ in good]
                    if run_id is None:
                        run_id = await conn.fetchval(
                            "INSERT INTO archive_purges (ran_at, cutoff, rows) VALUES ($1, $2, 0) RETURNING id",
                            stamp, before_iso)
                    await conn.execute(
                        "UPDATE archive AS a SET client_address = '', mail_from = '', rcpt_to = '[]', reply = '',"
                        " changes = '[]', raw = ''::bytea, delivered = NULL, purged_at = $1, purge_id = $2,"
                        " auto_reply = COALESCE(a.auto_reply, v.auto)"
                        " FROM unnest($3::bigint[], $4::int[]) AS v(id, auto) WHERE a.id = v.id",
                        stamp, run_id, ids, [int(auto) for _, auto, _ in good])
                    await conn.execute("DELETE FROM archive_bodies WHERE archive_id = ANY($1::bigint[])", ids)
                    counts["message_ids"] += _rowcount(await conn.execute(
                        "DELETE FROM message_ids WHERE archive_id = ANY($1::bigint[])", ids))
                    # A delivery report quotes the message it reports on.
                    counts["bounces"] += _rowcount(await conn.execute(
                        "DELETE FROM bounces WHERE archive_id = ANY($1::bigint[])", ids))
                    await conn.execute("UPDATE archive_purges SET rows = rows + $1 WHERE id = $2", len(good), run_id)
            counts["rows"] += len(good)
            counts["bytes"] += sum(size for _, _, size in good)
        return PurgeCounts(before=before_iso, dry_run=dry_run, held=held[0], run_id=run_id, **counts)

    async def response_facts(self, since: str | None = None, until: str | None = None,
                             seller: str | None = None) -> tuple[list, dict[str, str]]:
        """The delivered messages the response-time report needs (as
        SqliteStore.response_facts)."""
        arg = _Args()
        clauses = ["a.verdict = 'delivered'"]
        if since is not None:
            clauses.append(f"a.received_at >= {arg(since)}")
        if until is not None:
            clauses.append(f"a.received_at < {arg(until)}")
        if seller is not None:
            clauses.append(f"s.address = {arg(addresses.normalize(seller))}")
        rows = await self._fetchall(
            "SELECT a.id, a.relationship_id, s.address, s.display_name, a.direction, a.received_at,"
            " a.auto_reply, EXISTS (SELECT 1 FROM bounces b WHERE b.archive_id = a.id AND b.action = 'failed')"
            " FROM archive a JOIN relationships r ON r.id = a.relationship_id"
            " JOIN parties s ON s.id = r.seller_id WHERE " + " AND ".join(clauses), arg.values)
        unknown = [row[0] for row in rows if row[6] is None]
        flags = await self._backfill_auto_reply(unknown) if unknown else {}
        facts = [
            archive_logic.MessageFact(
                archive_id=row[0], relationship_id=row[1], seller=row[2], direction=row[4],
                received_at=archive_logic.parse_iso(row[5]),
                auto_reply=bool(row[6] if row[6] is not None else flags.get(row[0], False)),
                bounced=bool(row[7]))
            for row in rows
        ]
        return facts, {row[2]: row[3] for row in rows}

    async def _backfill_auto_reply(self, ids: list[int]) -> dict[int, bool]:
        flags: dict[int, bool] = {}
        ids = sorted(ids)
        while ids:
            chunk = ids[:500]
            rows = await self._archive_batch(" WHERE a.id = ANY($1::bigint[])", (chunk,), "a.id", len(chunk))
            done = {row["id"] for row in rows}
            ids = [row_id for row_id in ids if row_id not in done]
            rows_decoded = await asyncio.to_thread(lambda: [decoded(r) for r in rows])
            found = {row["id"]: archive_logic.is_auto_reply(row["raw"])
                     for row in rows_decoded if row["raw"] is not None}
            flags.update(found)
            if found:
                await self._execute(
                    "UPDATE archive AS a SET auto_reply = v.flag FROM unnest($1::bigint[], $2::int[]) AS v(id, flag)"
                    " WHERE a.id = v.id AND a.auto_reply IS NULL",
                    (list(found), [int(flag) for flag in found.values()]))
        return flags

    # --- bounces ------------------------------------------------------------

    async def message_by_relay_id(self, relay_id: str) -> dict | None:
        """The Message-ID map entry of a message the relay delivered."""
        row = await self._fetchone(
            "SELECT relationship_id, sender_id, archive_id, created_at, original_id FROM message_ids"
            " WHERE relay_id = $1", (relay_id,))
        if row is None:
            return None
        found = dict(zip(("relationship_id", "sender_id", "archive_id", "created_at", "original_id"), row))
        found["original_id"] = common.parsed_id(found["original_id"])
        return found

    async def record_bounce(self, received_at: str, relay_message_id: str, archive_id: int | None,
                            relationship_id: int | None, action: str, status: str, notified: bool,
                            raw: bytes, detector: str = "rfc3464") -> int:
        # A report's fields are message-borne text (8-bit bytes as surrogates).
        action, status, detector = (common.storable_text(v) for v in (action, status, detector))
        row = await self._fetchone(
            "INSERT INTO bounces (received_at, relay_message_id, archive_id, relationship_id,"
            " action, status, notified, raw, detector) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
            (received_at, relay_message_id, archive_id, relationship_id, action, status, int(notified), raw,
             detector))
        return row[0]

    async def bounces_for(self, archive_id: int) -> list[dict]:
        rows = await self._fetchall(
            "SELECT id, received_at, action, status, notified, detector FROM bounces"
            " WHERE archive_id = $1 ORDER BY id",
            (archive_id,))
        return [dict(zip(("id", "received_at", "action", "status", "notified", "detector"), row))
                for row in rows]

    # --- health and metrics --------------------------------------------------

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers a query."""
        await self._fetchone("SELECT 1 FROM schema_migrations LIMIT 1")

    async def archive_size(self) -> int:
        """The highest archive id: the number of rows ever archived, cheap at any size."""
        row = await self._fetchone("SELECT COALESCE(MAX(id), 0) FROM archive")
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
        async with self._transaction() as conn:
            with _unavailable_on_db_error():
                await conn.execute("SET LOCAL statement_timeout = 0")  # a big archive takes its time
                for key in (UPGRADE_LOCK, CHAIN_LOCK, PURGE_LOCK):
                    await _lock(conn, RELAY_LOCKS, key)
                for table in TABLES:
                    if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                        raise StoreError(f"{self.url} is not empty ({table} has rows); "
                                         "migrate-to copies into an empty database only")
            loader = Loader(conn)
            yield loader
            with _unavailable_on_db_error():
                await loader.advance_sequences()


class Loader:
    """Rows copied into an empty PostgreSQL store with their ids (COPY)."""

    def __init__(self, conn):
        self._conn = conn
        self.counts: dict[str, int] = {}

    async def columns(self, table: str) -> dict[str, str]:
        """The table's columns: name -> PostgreSQL type."""
        assert table in TABLES  # never from input
        with _unavailable_on_db_error():
            rows = await self._conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position", table)
        return {row[0]: row[1] for row in rows}

    async def copy(self, table: str, columns: list[str], rows: list) -> None:
        types = await self.columns(table)
        convert = [_converter(types[column]) for column in columns]
        records = [tuple(None if value is None else fn(value) for fn, value in zip(convert, row)) for row in rows]
        with _unavailable_on_db_error():
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
    with _unavailable_on_db_error():
        conn = await asyncpg.connect(options.dsn, timeout=options.connect_timeout,
                                     server_settings={"statement_timeout": str(options.statement_timeout_ms)})
        try:
            rows = await conn.fetch("SELECT seller_alias FROM relationships UNION SELECT buyer_alias FROM relationships")
        finally:
            await conn.close()
    return [row[0] for row in rows]
