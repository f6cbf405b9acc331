"""The SQLite backend of the store (aiosqlite: the database work runs on
aiosqlite's thread, never on the event loop).

One connection per process in WAL mode with ``synchronous=FULL``: a committed
archive row survives a power cut. aiosqlite serialises statements but not
transactions, so every write transaction holds `_write_lock`; otherwise two
messages' statements could interleave inside one BEGIN…COMMIT and the
archive chain would fork.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from importlib import resources
from pathlib import Path

import aiosqlite

from relay import addresses
from relay.store import (
    GENESIS_HASH,
    ArchiveEntry,
    Conflict,
    MessageIdRow,
    NotFound,
    Party,
    Relationship,
    RelationshipStats,
    StoreUnavailable,
    chain_hash,
    sha256_hex,
    utc_now,
)

# How long a statement waits for another process's lock (the CLI beside a
# running server) before the store reports itself unavailable.
BUSY_TIMEOUT_MS = 5000
# Upper bound on ids looked up per message: References can be hostile.
MAX_LOOKUP_IDS = 100


def migrations() -> list[tuple[int, str]]:
    """The numbered migrations shipped in relay/store/migrations/."""
    found = []
    for entry in resources.files("relay.store").joinpath("migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


_RELATIONSHIP_SELECT = """
    SELECT r.id, r.seller_alias, r.buyer_alias, r.created_at,
           s.id, s.address, s.display_name, s.opted_out, s.daily_orders,
           b.id, b.address, b.display_name, b.opted_out, b.daily_orders
      FROM relationships r
      JOIN parties s ON s.id = r.seller_id
      JOIN parties b ON b.id = r.buyer_id
"""


def _relationship(row) -> Relationship:
    return Relationship(
        id=row[0],
        seller_alias=row[1],
        buyer_alias=row[2],
        created_at=row[3],
        seller=Party(row[4], "seller", row[5], row[6], bool(row[7]), row[8]),
        buyer=Party(row[9], "buyer", row[10], row[11], bool(row[12]), row[13]),
    )


@contextlib.contextmanager
def _unavailable_on_db_error():
    try:
        yield
    except sqlite3.IntegrityError:
        raise
    except (sqlite3.Error, OSError, ValueError) as exc:
        # ValueError: aiosqlite's "no active connection" after close.
        raise StoreUnavailable(f"database error: {exc}") from exc


class SqliteStore:
    def __init__(self, db: aiosqlite.Connection, path: str):
        self._db = db
        self.path = path
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str) -> "SqliteStore":
        with _unavailable_on_db_error():
            parent = Path(path).parent
            if str(parent):
                os.makedirs(parent, exist_ok=True)
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
            with _unavailable_on_db_error():
                await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await self._db.execute("ROLLBACK")
                raise
            with _unavailable_on_db_error():
                await self._db.execute("COMMIT")

    async def _fetchone(self, sql: str, params=()):
        with _unavailable_on_db_error():
            async with self._db.execute(sql, params) as cursor:
                return await cursor.fetchone()

    async def _fetchall(self, sql: str, params=()):
        with _unavailable_on_db_error():
            async with self._db.execute(sql, params) as cursor:
                return await cursor.fetchall()

    # --- schema -----------------------------------------------------------

    async def upgrade(self) -> list[int]:
        """Apply the migrations not yet applied; return their numbers."""
        applied = []
        async with self._transaction() as db:
            with _unavailable_on_db_error():
                await db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
                )
                async with db.execute("SELECT version FROM schema_migrations") as cursor:
                    done = {row[0] for row in await cursor.fetchall()}
                for version, sql in migrations():
                    if version in done:
                        continue
                    # executescript() would COMMIT our transaction; run the
                    # statements one by one so a migration applies whole or not at all.
                    for statement in _statements(sql):
                        await db.execute(statement)
                    await db.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                        (version, utc_now()),
                    )
                    applied.append(version)
        return applied

    async def schema_version(self) -> int:
        row = await self._fetchone(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        )
        if row is None:
            return 0
        row = await self._fetchone("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return row[0]

    # --- parties, orders, relationships -----------------------------------

    async def add_party(self, role: str, address: str, display_name: str) -> Party:
        address = addresses.normalize(address)
        try:
            async with self._transaction() as db:
                with _unavailable_on_db_error():
                    cursor = await db.execute(
                        "INSERT INTO parties (role, address, display_name, created_at)"
                        " VALUES (?, ?, ?, ?)",
                        (role, address, display_name, utc_now()),
                    )
        except sqlite3.IntegrityError:
            raise Conflict(f"{role} {address} is already registered") from None
        return Party(cursor.lastrowid, role, address, display_name)

    async def get_party(self, role: str, address: str) -> Party | None:
        row = await self._fetchone(
            "SELECT id, address, display_name, opted_out, daily_orders FROM parties"
            " WHERE role = ? AND address = ?",
            (role, addresses.normalize(address)),
        )
        return None if row is None else Party(row[0], role, row[1], row[2], bool(row[3]), row[4])

    async def _update_party(self, role: str, address: str, column: str, value) -> Party:
        assert column in ("password_hash", "daily_orders", "opted_out")  # never from input
        async with self._transaction() as db:
            with _unavailable_on_db_error():
                cursor = await db.execute(
                    f"UPDATE parties SET {column} = ? WHERE role = ? AND address = ?",
                    (value, role, addresses.normalize(address)))
        if cursor.rowcount == 0:
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
            " WHERE role = 'seller' AND address = ?", (addresses.normalize(seller),))
        if row is None or not row[5]:
            return None
        return Party(row[0], "seller", row[1], row[2], bool(row[3]), row[4]), row[5]

    async def set_daily_orders(self, seller: str, daily_orders: int | None) -> Party:
        return await self._update_party("seller", seller, "daily_orders", daily_orders)

    async def set_opted_out(self, buyer: str, opted_out: bool) -> Party:
        return await self._update_party("buyer", buyer, "opted_out", int(opted_out))

    # --- the sending rules ------------------------------------------------------

    async def seller_sends_since(self, seller_id: int, since: str) -> tuple[int, str | None]:
        """(messages the seller sent since `since`, the oldest of them)."""
        row = await self._fetchone(
            "SELECT COUNT(*), MIN(sent_at) FROM seller_sends WHERE seller_id = ? AND sent_at >= ?",
            (seller_id, since))
        return row[0], row[1]

    async def seller_orders_since(self, seller_id: int, since: str) -> int:
        row = await self._fetchone(
            "SELECT COUNT(*) FROM orders o JOIN relationships r ON r.id = o.relationship_id"
            " WHERE r.seller_id = ? AND o.placed_at >= ?", (seller_id, since))
        return row[0]

    async def latest_order_at(self, relationship_id: int) -> str | None:
        row = await self._fetchone(
            "SELECT MAX(placed_at) FROM orders WHERE relationship_id = ?", (relationship_id,))
        return row[0]

    async def seller_relationships(self, seller: str) -> list[Relationship]:
        rows = await self._fetchall(_RELATIONSHIP_SELECT + " WHERE s.address = ? ORDER BY r.id",
                                    (addresses.normalize(seller),))
        return [_relationship(row) for row in rows]

    async def add_order(
        self, order_ref: str, seller: str, buyer: str, placed_at: str, domain: str
    ) -> tuple[Relationship, bool]:
        """Record an order; create the pair's relationship on its first order.

        Returns the relationship and whether it was created now. A known
        order reference is a Conflict and changes nothing.
        """
        seller_party = await self.get_party("seller", seller)
        if seller_party is None:
            raise NotFound(f"no seller {addresses.normalize(seller)}; add it with `relay seller add`")
        buyer_party = await self.get_party("buyer", buyer)
        if buyer_party is None:
            raise NotFound(f"no buyer {addresses.normalize(buyer)}; add it with `relay buyer add`")
        created = False
        async with self._transaction() as db:
            with _unavailable_on_db_error():
                async with db.execute(
                    "SELECT 1 FROM orders WHERE order_ref = ?", (order_ref,)
                ) as cursor:
                    if await cursor.fetchone() is not None:
                        raise Conflict(f"order {order_ref} is already recorded")
                async with db.execute(
                    "SELECT id FROM relationships WHERE seller_id = ? AND buyer_id = ?",
                    (seller_party.id, buyer_party.id),
                ) as cursor:
                    row = await cursor.fetchone()
                if row is None:
                    cursor = await db.execute(
                        "INSERT INTO relationships"
                        " (seller_id, buyer_id, seller_alias, buyer_alias, created_at)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (
                            seller_party.id,
                            buyer_party.id,
                            f"{addresses.new_alias_token()}@{domain}",
                            f"{addresses.new_alias_token()}@{domain}",
                            utc_now(),
                        ),
                    )
                    relationship_id = cursor.lastrowid
                    created = True
                else:
                    relationship_id = row[0]
                await db.execute(
                    "INSERT INTO orders (order_ref, relationship_id, placed_at, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (order_ref, relationship_id, placed_at, utc_now()),
                )
        relationship = await self.relationship_by_id(relationship_id)
        assert relationship is not None
        return relationship, created

    async def relationship_by_id(self, relationship_id: int) -> Relationship | None:
        row = await self._fetchone(_RELATIONSHIP_SELECT + " WHERE r.id = ?", (relationship_id,))
        return None if row is None else _relationship(row)

    async def relationship_by_alias(self, alias: str) -> Relationship | None:
        alias = addresses.normalize(alias)
        row = await self._fetchone(
            _RELATIONSHIP_SELECT + " WHERE r.seller_alias = ? OR r.buyer_alias = ?",
            (alias, alias),
        )
        return None if row is None else _relationship(row)

    async def relationship_for_pair(self, seller: str, buyer: str) -> Relationship | None:
        row = await self._fetchone(
            _RELATIONSHIP_SELECT + " WHERE s.address = ? AND b.address = ?",
            (addresses.normalize(seller), addresses.normalize(buyer)),
        )
        return None if row is None else _relationship(row)

    async def relationship_stats(self, relationship_id: int) -> RelationshipStats:
        orders = await self._fetchone(
            "SELECT COUNT(*) FROM orders WHERE relationship_id = ?", (relationship_id,)
        )
        rows = await self._fetchall(
            "SELECT direction, COUNT(*), MAX(received_at) FROM archive"
            " WHERE relationship_id = ? AND verdict = 'delivered' GROUP BY direction",
            (relationship_id,),
        )
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
        """Map entries of this relationship whose relay or original id is in `ids`."""
        ids = list(dict.fromkeys(ids))[-MAX_LOOKUP_IDS:]
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = await self._fetchall(
            "SELECT sender_id, original_id, relay_id FROM message_ids"
            f" WHERE relationship_id = ? AND (relay_id IN ({marks}) OR original_id IN ({marks}))",
            (relationship_id, *ids, *ids),
        )
        return [MessageIdRow(*row) for row in rows]

    # --- archive ------------------------------------------------------------

    async def record(self, entry: ArchiveEntry) -> int:
        """Append `entry` to the archive (and its Message-ID map row) in one
        transaction; return the archive id once committed."""
        raw_sha = sha256_hex(entry.raw)
        delivered_sha = sha256_hex(entry.delivered)
        metadata = entry.metadata()
        async with self._transaction() as db:
            with _unavailable_on_db_error():
                async with db.execute(
                    "SELECT row_sha256 FROM archive ORDER BY id DESC LIMIT 1"
                ) as cursor:
                    row = await cursor.fetchone()
                prev = row[0] if row else GENESIS_HASH
                cursor = await db.execute(
                    "INSERT INTO archive (received_at, relationship_id, direction,"
                    " client_address, mail_from, rcpt_to, verdict, reply, changes,"
                    " raw, delivered, raw_sha256, delivered_sha256, prev_sha256, row_sha256)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        entry.received_at,
                        entry.relationship_id,
                        entry.direction,
                        entry.client_address,
                        entry.mail_from,
                        json.dumps(list(entry.rcpt_to)),
                        entry.verdict,
                        entry.reply,
                        json.dumps(list(entry.changes)),
                        entry.raw,
                        entry.delivered,
                        raw_sha,
                        delivered_sha,
                        prev,
                        chain_hash(metadata, raw_sha, delivered_sha, prev),
                    ),
                )
                archive_id = cursor.lastrowid
                if entry.verdict == "delivered" and entry.direction == "seller_to_buyer" and entry.sender_id:
                    await db.execute(
                        "INSERT INTO seller_sends (seller_id, archive_id, sent_at) VALUES (?, ?, ?)",
                        (entry.sender_id, archive_id, entry.received_at))
                if entry.relay_message_id and entry.verdict == "delivered":
                    await db.execute(
                        "INSERT INTO message_ids (relationship_id, sender_id, original_id,"
                        " relay_id, archive_id, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            entry.relationship_id,
                            entry.sender_id,
                            entry.original_message_id,
                            entry.relay_message_id,
                            archive_id,
                            entry.received_at,
                        ),
                    )
        return archive_id

    async def archive_row(self, archive_id: int) -> dict | None:
        """One archive row as a dict (for tests and the dispute tools)."""
        with _unavailable_on_db_error():
            async with self._db.execute("SELECT * FROM archive WHERE id = ?", (archive_id,)) as cur:
                row = await cur.fetchone()
                names = [d[0] for d in cur.description]
        if row is None:
            return None
        result = dict(zip(names, row))
        result["rcpt_to"] = json.loads(result["rcpt_to"])
        result["changes"] = json.loads(result["changes"])
        return result

    async def archive_ids(self) -> list[int]:
        return [row[0] for row in await self._fetchall("SELECT id FROM archive ORDER BY id")]


    # --- health and metrics --------------------------------------------------

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers a query."""
        await self._fetchone("SELECT 1 FROM schema_migrations LIMIT 1")

    async def archive_size(self) -> int:
        """The highest archive id: the number of rows ever archived, cheap at any size."""
        row = await self._fetchone("SELECT COALESCE(MAX(id), 0) FROM archive")
        return row[0]


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
