"""Every query of the store, written once for both engines.

`SqlStore` implements the whole store API (relay/store/__init__.py) in
SQL that SQLite and PostgreSQL both run, written with ``?`` placeholders.
What the engines do differently is asked of the engine's subclass, the
dialect seam, and nothing else is (sqlite.py and postgresql.py are each
small enough to read whole):

* ``_transaction()`` gives a `Transaction`: ``fetchall``, ``fetchone``,
  ``execute`` (its row count), ``executemany``, ``insert`` (the new row's
  id, or None when ``ON CONFLICT DO NOTHING`` inserted none), ``script``
  (a migration) and ``lock(name, key)``: the chain, purge and upgrade locks
  and a seller's daily-cap lock. PostgreSQL takes an advisory lock;
  SQLite's ``BEGIN IMMEDIATE`` already holds the one write lock, so it
  takes nothing more. The PostgreSQL one numbers the ``?`` as ``$1…``.
* ``_fetchall``/``_fetchone``/``_execute``: one statement outside a
  transaction of ours.
* ``_among(column, values, type)``: ``column IN (?, ?, …)`` in SQLite,
  ``column = ANY(?::type[])`` in PostgreSQL (one parameter, one plan).
* ``_unindexed(expression)``: SQLite has no statistics, so the archive
  list steers its planner off an index with a unary ``+``; PostgreSQL's
  planner chooses by itself.
* ``_unique_violation(exc, table, column)`` and ``_has_table(name)``.
* ``_archive_dicts(rows)``: archive rows (``SELECT <extras>, a.*``) as
  dicts by column name.

Rows come back as sequences (tuples, asyncpg.Record). Errors are classified by each engine (`classify`) before
they reach this module: StoreUnavailable, StoreDataError, or the driver's
own constraint error, which the callers here turn into Conflict.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from relay import addresses
from relay import archive as archive_logic
from relay import events
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
    StoreUnavailable,
    chain_hash,
    common,
    schema,
    utc_now,
)
from relay.store.common import RELATIONSHIP_SELECT, checked, decoded, prepare_bodies, purge_check, relationship_from_row

# Upper bound on ids looked up per message: References can be hostile.
MAX_LOOKUP_IDS = 100
# Stored body bytes read at once by verify, export and purge.
BATCH_BYTES = 32 * 1024 * 1024

ALIASES = "SELECT seller_alias FROM relationships UNION SELECT buyer_alias FROM relationships"

# Live rows of no relationship on hold: what purge may turn into tombstones.
_PURGEABLE = ("a.purged_at IS NULL AND (a.relationship_id IS NULL OR a.relationship_id NOT IN"
              " (SELECT relationship_id FROM archive_holds))")

_ARCHIVE_INSERT = (
    "INSERT INTO archive (received_at, relationship_id, direction,"
    " client_address, mail_from, rcpt_to, verdict, reply, changes,"
    " raw, delivered, raw_sha256, delivered_sha256, prev_sha256, row_sha256,"
    " body_encoding, raw_size, delivered_size, auto_reply)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


class SqlStore:
    """The store's methods over the engine's seam (module docstring)."""

    ENGINE: str  # "sqlite" or "postgresql": which schema.migrations() to run

    # --- schema -----------------------------------------------------------

    async def upgrade(self) -> list[int]:
        """Apply the migrations not yet applied; return their numbers. All in
        one transaction holding the upgrade lock: two nodes starting at once
        apply each migration once, whole (both engines' DDL is transactional)."""
        applied = []
        async with self._transaction() as tx:
            await tx.lock("upgrade")
            await tx.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                             " version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
            done = {row[0] for row in await tx.fetchall("SELECT version FROM schema_migrations")}
            for version, sql in schema.migrations(self.ENGINE):
                if version in done:
                    continue
                await tx.script(sql)
                await tx.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                                 (version, utc_now()))
                applied.append(version)
        return applied

    async def schema_version(self) -> int:
        if not await self._has_table("schema_migrations"):
            return 0
        row = await self._fetchone("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return row[0]

    # --- parties, orders, relationships -----------------------------------

    async def add_party(self, role: str, address: str, display_name: str) -> Party:
        address = addresses.normalize(address)
        try:
            async with self._transaction() as tx:
                party_id = await tx.insert(
                    "INSERT INTO parties (role, address, display_name, created_at) VALUES (?, ?, ?, ?)",
                    (role, address, display_name, utc_now()))
        except Exception as exc:
            if self._unique_violation(exc, "parties"):
                raise Conflict(f"{role} {address} is already registered") from None
            raise
        return Party(party_id, role, address, display_name)

    async def get_party(self, role: str, address: str) -> Party | None:
        row = await self._fetchone(
            "SELECT id, address, display_name, opted_out, daily_orders FROM parties"
            " WHERE role = ? AND address = ?", (role, addresses.normalize(address)))
        return None if row is None else Party(row[0], role, row[1], row[2], bool(row[3]), row[4])

    async def _update_party(self, role: str, address: str, column: str, value) -> Party:
        assert column in ("password_hash", "daily_orders", "opted_out")  # never from input
        count = await self._execute(f"UPDATE parties SET {column} = ? WHERE role = ? AND address = ?",
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
        """(messages the seller sent since `since`, the oldest of them);
        reservations of messages being forwarded count too."""
        row = await self._fetchone(
            "SELECT COUNT(*), MIN(sent_at) FROM seller_sends WHERE seller_id = ? AND sent_at >= ?",
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

        The count and the insert are one transaction holding the seller's
        lock, taken before the count (SQLite: the write lock of BEGIN
        IMMEDIATE; PostgreSQL: an advisory lock per seller, postgresql.py):
        the count then sees every reservation committed before, by any
        process or node, so no two senders can both see room for one more
        message, and other sellers never wait."""
        async with self._transaction() as tx:
            await tx.lock("seller", seller_id)
            count, oldest = await tx.fetchone(
                "SELECT COUNT(*), MIN(sent_at) FROM seller_sends WHERE seller_id = ? AND sent_at >= ?",
                (seller_id, window_start))
            if count >= cap:
                return None, count, oldest
            reservation = await tx.insert(
                "INSERT INTO seller_sends (seller_id, archive_id, sent_at) VALUES (?, NULL, ?)", (seller_id, at))
            return reservation, count, oldest

    async def release_send(self, reservation_id: int) -> None:
        """Give back a place taken by `reserve_send()` for a message that
        was not archived (record() itself settles the others)."""
        await self._execute("DELETE FROM seller_sends WHERE id = ? AND archive_id IS NULL", (reservation_id,))

    async def prune_seller_sends(self, before: str) -> int:
        """Forget cap bookkeeping older than `before` (the cap only ever looks
        back one window; the archive keeps the messages themselves)."""
        return await self._execute("DELETE FROM seller_sends WHERE sent_at < ?", (before,))

    async def seller_orders_since(self, seller_id: int, since: str) -> int:
        row = await self._fetchone(
            "SELECT COUNT(*) FROM orders o JOIN relationships r ON r.id = o.relationship_id"
            " WHERE r.seller_id = ? AND o.placed_at >= ?", (seller_id, since))
        return row[0]

    async def latest_order_at(self, relationship_id: int) -> str | None:
        row = await self._fetchone("SELECT MAX(placed_at) FROM orders WHERE relationship_id = ?", (relationship_id,))
        return row[0]

    async def seller_relationships(self, seller: str) -> list[Relationship]:
        rows = await self._fetchall(RELATIONSHIP_SELECT + " WHERE s.address = ? ORDER BY r.id",
                                    (addresses.normalize(seller),))
        return [relationship_from_row(row) for row in rows]

    async def add_order(
        self, order_ref: str, seller: str, buyer: str, placed_at: str, domain: str
    ) -> tuple[Relationship, bool]:
        """Record an order; create the pair's relationship on its first order.

        Returns the relationship and whether it was created now. A known
        order reference is a Conflict and changes nothing, also when two
        nodes record it at once (its unique constraint decides). Two nodes
        adding the first orders of one pair at once get the same
        relationship: ``ON CONFLICT (seller_id, buyer_id) DO NOTHING``, and
        the loser reads the winner's row."""
        seller_party, buyer_party = await self._order_parties(seller, buyer)
        try:
            async with self._transaction() as tx:
                relationship_id, created = await self._insert_order(tx, order_ref, seller_party, buyer_party,
                                                                    placed_at, domain)
        except Exception as exc:
            self._order_conflict(exc, order_ref)
            raise
        relationship = await self.relationship_by_id(relationship_id)
        assert relationship is not None
        return relationship, created

    async def add_order_once(self, token_id: int, key: str, request_sha256: str, order_ref: str, seller: str,
                             buyer: str, placed_at: str, domain: str, answer) -> tuple[int, str, bool]:
        """`add_order` under an idempotency key of one API token, in one
        transaction with the key's record: `answer(relationship, created)`
        gives the (status, JSON text) to keep. Returns (status, JSON text,
        whether it is a replay of the key's first answer). The same key
        with another request is a Conflict; a failed call keeps no key."""
        seller_party, buyer_party = await self._order_parties(seller, buyer)
        try:
            async with self._transaction() as tx:
                kept = await tx.fetchone("SELECT request_sha256, status, response FROM api_idempotency"
                                         " WHERE token_id = ? AND idem_key = ?", (token_id, key))
                if kept is not None:
                    if kept[0] != request_sha256:
                        raise Conflict("this Idempotency-Key was used for another request")
                    return kept[1], kept[2], True
                relationship_id, created = await self._insert_order(tx, order_ref, seller_party, buyer_party,
                                                                    placed_at, domain)
                row = await tx.fetchone(RELATIONSHIP_SELECT + " WHERE r.id = ?", (relationship_id,))
                status, response = answer(relationship_from_row(row), created)
                await tx.execute("INSERT INTO api_idempotency (token_id, idem_key, request_sha256, status, response,"
                                 " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                                 (token_id, key, request_sha256, status, response, utc_now()))
        except Exception as exc:
            if not isinstance(exc, (NotFound, StoreUnavailable)) and self._is_constraint(exc):
                # The same key at the same moment from another call, which
                # committed first (its order or its key met ours): its answer.
                kept = await self._fetchone("SELECT request_sha256, status, response FROM api_idempotency"
                                            " WHERE token_id = ? AND idem_key = ?", (token_id, key))
                if kept is not None:
                    if kept[0] != request_sha256:
                        raise Conflict("this Idempotency-Key was used for another request") from None
                    return kept[1], kept[2], True
            self._order_conflict(exc, order_ref)
            raise
        return status, response, False

    async def idempotent_answer(self, token_id: int, key: str) -> tuple[str, int, str] | None:
        """(request hash, status, JSON text) kept for an idempotency key."""
        row = await self._fetchone("SELECT request_sha256, status, response FROM api_idempotency"
                                   " WHERE token_id = ? AND idem_key = ?", (token_id, key))
        return None if row is None else (row[0], row[1], row[2])

    async def _order_parties(self, seller: str, buyer: str) -> tuple[Party, Party]:
        seller_party = await self.get_party("seller", seller)
        if seller_party is None:
            raise NotFound(f"no seller {addresses.normalize(seller)}; add it with `relay seller add`")
        buyer_party = await self.get_party("buyer", buyer)
        if buyer_party is None:
            raise NotFound(f"no buyer {addresses.normalize(buyer)}; add it with `relay buyer add`")
        return seller_party, buyer_party

    async def _insert_order(self, tx, order_ref: str, seller_party: Party, buyer_party: Party, placed_at: str,
                            domain: str) -> tuple[int, bool]:
        """The order's rows in `tx`: (the relationship's id, whether it is new)."""
        created = False
        if await tx.fetchone("SELECT 1 FROM orders WHERE order_ref = ?", (order_ref,)) is not None:
            raise Conflict(f"order {order_ref} is already recorded")
        relationship_id = await tx.insert(
            "INSERT INTO relationships (seller_id, buyer_id, seller_alias, buyer_alias, created_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (seller_id, buyer_id) DO NOTHING",
            (seller_party.id, buyer_party.id, f"{addresses.new_alias_token()}@{domain}",
             f"{addresses.new_alias_token()}@{domain}", utc_now()))
        if relationship_id is None:  # it exists (maybe since a moment, from another node)
            row = await tx.fetchone("SELECT id FROM relationships WHERE seller_id = ? AND buyer_id = ?",
                                    (seller_party.id, buyer_party.id))
            relationship_id = row[0]
        else:
            created = True
        await tx.execute(
            "INSERT INTO orders (order_ref, relationship_id, placed_at, created_at) VALUES (?, ?, ?, ?)",
            (order_ref, relationship_id, placed_at, utc_now()))
        return relationship_id, created

    def _is_constraint(self, exc: Exception) -> bool:
        return isinstance(exc, Conflict) or self._unique_violation(exc)

    def _order_conflict(self, exc: Exception, order_ref: str) -> None:
        """Raise what a constraint error of an order's insert means, if it is one."""
        if isinstance(exc, (Conflict, NotFound)):
            return
        if self._unique_violation(exc, "orders", "order_ref"):  # recorded by another node just now
            raise Conflict(f"order {order_ref} is already recorded") from None
        if self._unique_violation(exc):  # two fresh aliases met an old one: try again
            raise StoreUnavailable(f"database error: {exc}") from exc

    async def relationship_by_order(self, order_ref: str) -> Relationship | None:
        row = await self._fetchone(RELATIONSHIP_SELECT + " WHERE r.id = (SELECT relationship_id FROM orders"
                                   " WHERE order_ref = ?)", (order_ref,))
        return None if row is None else relationship_from_row(row)

    # --- parties in one call (the HTTP API) ------------------------------------

    async def save_party(self, role: str, address: str, *, create: bool, display_name: str | None = None,
                         password_hash: str | None = None, daily_orders=..., opted_out: bool | None = None) -> Party:
        """Create (`create`) or update one party with every given field, in
        one transaction: Conflict if it exists (create), NotFound if not
        (update). `daily_orders` None clears the override; left out, it is kept."""
        address = addresses.normalize(address)
        fields = {}
        if display_name is not None:
            fields["display_name"] = display_name
        if password_hash is not None:
            fields["password_hash"] = password_hash
        if daily_orders is not ...:
            fields["daily_orders"] = daily_orders
        if opted_out is not None:
            fields["opted_out"] = int(opted_out)
        assert set(fields) <= {"display_name", "password_hash", "daily_orders", "opted_out"}  # never from input
        try:
            async with self._transaction() as tx:
                if create:
                    await tx.insert("INSERT INTO parties (role, address, display_name, created_at) VALUES (?, ?, ?, ?)",
                                    (role, address, fields.pop("display_name", ""), utc_now()))
                elif await tx.fetchone("SELECT 1 FROM parties WHERE role = ? AND address = ?", (role, address)) is None:
                    raise NotFound(f"no {role} {address}")
                for column, value in fields.items():
                    await tx.execute(f"UPDATE parties SET {column} = ? WHERE role = ? AND address = ?",
                                     (value, role, address))
        except Exception as exc:
            if create and self._unique_violation(exc, "parties"):
                raise Conflict(f"{role} {address} is already registered") from None
            raise
        party = await self.get_party(role, address)
        assert party is not None
        return party

    # --- API tokens --------------------------------------------------------------

    async def add_api_token(self, name: str, role: str, token_sha256: str) -> int:
        try:
            async with self._transaction() as tx:
                return await tx.insert("INSERT INTO api_tokens (name, role, token_sha256, created_at)"
                                       " VALUES (?, ?, ?, ?)", (name, role, token_sha256, utc_now()))
        except Exception as exc:
            if self._unique_violation(exc, "api_tokens"):
                raise Conflict(f"an API token named {name!r} exists; revoke it first") from None
            raise

    async def revoke_api_token(self, name: str) -> bool:
        return await self._execute("UPDATE api_tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                                   (utc_now(), name)) > 0

    async def api_tokens(self) -> list[dict]:
        rows = await self._fetchall("SELECT id, name, role, created_at, revoked_at FROM api_tokens ORDER BY id")
        return [{"id": r[0], "name": r[1], "role": r[2], "created_at": r[3], "revoked_at": r[4]} for r in rows]

    async def api_token(self, token_sha256: str) -> dict | None:
        """The live token with this hash: {id, name, role}, or None."""
        row = await self._fetchone("SELECT id, name, role FROM api_tokens WHERE token_sha256 = ?"
                                   " AND revoked_at IS NULL", (token_sha256,))
        return None if row is None else {"id": row[0], "name": row[1], "role": row[2]}

    async def relationship_by_id(self, relationship_id: int) -> Relationship | None:
        row = await self._fetchone(RELATIONSHIP_SELECT + " WHERE r.id = ?", (relationship_id,))
        return None if row is None else relationship_from_row(row)

    async def relationship_by_alias(self, alias: str) -> Relationship | None:
        alias = addresses.normalize(alias)
        row = await self._fetchone(RELATIONSHIP_SELECT + " WHERE r.seller_alias = ? OR r.buyer_alias = ?",
                                   (alias, alias))
        return None if row is None else relationship_from_row(row)

    async def relationship_for_pair(self, seller: str, buyer: str) -> Relationship | None:
        row = await self._fetchone(RELATIONSHIP_SELECT + " WHERE s.address = ? AND b.address = ?",
                                   (addresses.normalize(seller), addresses.normalize(buyer)))
        return None if row is None else relationship_from_row(row)

    async def relationship_stats(self, relationship_id: int) -> RelationshipStats:
        orders = await self._fetchone("SELECT COUNT(*) FROM orders WHERE relationship_id = ?", (relationship_id,))
        rows = await self._fetchall(
            "SELECT direction, COUNT(*), MAX(received_at) FROM archive"
            " WHERE relationship_id = ? AND verdict = 'delivered' GROUP BY direction", (relationship_id,))
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
        relay_ids, relay_params = self._among("relay_id", ids, "text")
        original_ids, original_params = self._among("original_id", ids, "text")
        rows = await self._fetchall(
            "SELECT sender_id, original_id, relay_id FROM message_ids"
            f" WHERE relationship_id = ? AND ({relay_ids} OR {original_ids})",
            (relationship_id, *relay_params, *original_params))
        return [common.message_id_row(*row) for row in rows]

    # --- archive ------------------------------------------------------------

    async def record(self, entry: ArchiveEntry) -> int:
        """Append `entry` to the archive (and its Message-ID map row, and the
        daily-cap row of a delivered seller message, settling
        `entry.send_reservation`) in one transaction; return the archive id
        once committed.

        Each row hashes its predecessor's row_sha256, so the read of the last
        row and the insert happen under the chain lock (SQLite: the write
        lock; PostgreSQL: an advisory lock, postgresql.py says why): id order
        is chain order, on one node or many."""
        # Message-borne text (8-bit bytes as surrogates) in the spelling both
        # engines store, before the row is hashed: the chain covers what is stored.
        entry = common.storable_entry(entry)
        metadata = entry.metadata()
        # Hashing and compressing a 10 MB message takes a while: done by the
        # worker for a delivered message, else here off the loop; either way
        # before the chain lock is taken.
        bodies = entry.bodies
        raw_size = entry.raw_size if entry.raw is None else len(entry.raw)
        if bodies is None or not bodies.are_of(raw_size, entry.delivered):
            if entry.raw is None:
                raise ValueError("an archive entry without its raw bytes needs the bodies made from them")
            bodies = await asyncio.to_thread(prepare_bodies, entry.raw, entry.delivered)
        raw_sha, delivered_sha, raw_blob, delivered_blob, auto_reply = bodies[:5]
        async with self._transaction() as tx:
            await tx.lock("chain")
            row = await tx.fetchone("SELECT row_sha256 FROM archive ORDER BY id DESC LIMIT 1")
            prev = row[0] if row else GENESIS_HASH
            archive_id = await tx.insert(_ARCHIVE_INSERT, (
                entry.received_at, entry.relationship_id, entry.direction, entry.client_address,
                entry.mail_from, json.dumps(list(entry.rcpt_to)), entry.verdict, entry.reply,
                json.dumps(list(entry.changes)),
                b"", None,  # the bodies live in archive_bodies
                raw_sha, delivered_sha, prev, chain_hash(metadata, raw_sha, delivered_sha, prev),
                BODY_ENCODING, bodies.raw_size, None if entry.delivered is None else len(entry.delivered),
                int(auto_reply)))
            await tx.execute("INSERT INTO archive_bodies (archive_id, raw, delivered) VALUES (?, ?, ?)",
                             (archive_id, raw_blob, delivered_blob))
            delivered = entry.verdict == "delivered"
            counted = False
            if entry.send_reservation is not None:
                if delivered:  # the reserved place becomes this message's row
                    counted = await tx.execute(
                        "UPDATE seller_sends SET archive_id = ?, sent_at = ? WHERE id = ? AND archive_id IS NULL",
                        (archive_id, entry.received_at, entry.send_reservation)) == 1
                else:  # not sent: the place is free again
                    await tx.execute("DELETE FROM seller_sends WHERE id = ? AND archive_id IS NULL",
                                     (entry.send_reservation,))
            if delivered and not counted and entry.direction == "seller_to_buyer" and entry.sender_id:
                await tx.execute("INSERT INTO seller_sends (seller_id, archive_id, sent_at) VALUES (?, ?, ?)",
                                 (entry.sender_id, archive_id, entry.received_at))
            if entry.relay_message_id and delivered:
                await tx.execute(
                    "INSERT INTO message_ids (relationship_id, sender_id, original_id, relay_id, archive_id,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (entry.relationship_id, entry.sender_id, entry.original_message_id,
                     entry.relay_message_id, archive_id, entry.received_at))
            if entry.webhook_event:
                await self._add_webhook_event(tx, entry.webhook_event, archive_id,
                                              events.message_data(archive_id, metadata), entry.received_at)
        return archive_id

    async def archive_row(self, archive_id: int) -> dict | None:
        """One archive row as a dict (for tests and the dispute tools): the
        archive table's columns with `raw` and `delivered` uncompressed
        (None for a purged row), `rcpt_to`/`changes` as lists, and
        `decode_error` set when the stored bodies cannot be read."""
        rows = await self._archive_rows(" WHERE a.id = ?", (archive_id,))
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
            "SELECT length(a.raw) AS inline_raw_size, b.raw AS body_raw, b.delivered AS body_delivered, a.*"
            " FROM archive a LEFT JOIN archive_bodies b ON b.archive_id = a.id" + where, params)
        return await self._archive_dicts(rows)

    async def _archive_batch(self, where: str, params, order: str, limit: int) -> list[dict]:
        """Up to `limit` rows matching `where`, in `order`, but no more than
        BATCH_BYTES of stored bodies (at least one row): a batch of ten-megabyte
        photos must not fill the memory. Sizes come from length(), which
        neither engine answers by reading the blobs (SQLite's record header,
        PostgreSQL's TOAST header)."""
        sizes = await self._fetchall(
            "SELECT a.id, length(a.raw) + COALESCE(length(a.delivered), 0)"
            " + COALESCE(length(b.raw), 0) + COALESCE(length(b.delivered), 0)"
            f" FROM archive a LEFT JOIN archive_bodies b ON b.archive_id = a.id{where} ORDER BY {order} LIMIT ?",
            (*params, limit))
        ids, total = [], 0
        for archive_id, size in sizes:
            if ids and total + size > BATCH_BYTES:
                break
            ids.append(archive_id)
            total += size
        if not ids:
            return []
        among, among_params = self._among("a.id", ids, "bigint")
        return await self._archive_rows(f" WHERE {among} ORDER BY {order}", among_params)

    async def archive_chain(self, batch: int = 500):
        """Every archive row in id order, decoded and with `content_problem`
        (what `relay.archive.content_problem()` says of it) already worked
        out, for `relay archive verify`. Read in batches, so a million rows
        never sit in memory at once; the next batch is read while this one
        is decoded and hashed on a worker thread."""

        def read(after):
            if after is None:
                return asyncio.ensure_future(self._archive_batch("", (), "a.id", batch))
            return asyncio.ensure_future(self._archive_batch(" WHERE a.id > ?", (after,), "a.id", batch))

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
            where, params = " WHERE a.relationship_id = ?", [relationship_id]
            if last is not None:
                where += " AND a.id > ?"
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

        With a party filter the relationship index should drive (cost
        bounded by that party's rows), else (verdict, received_at), else
        received_at: SQLite, which has no statistics, is told so with
        `_unindexed` on the other columns."""
        clauses, params = [], []
        party = relationship_id is not None or seller is not None or buyer is not None
        column = self._unindexed if party else (lambda name: name)
        if relationship_id is not None:
            clauses.append("a.relationship_id = ?")
            params.append(relationship_id)
        for role, address in (("seller", seller), ("buyer", buyer)):
            if address is not None:
                clauses.append(f"a.relationship_id IN (SELECT r2.id FROM relationships r2"
                               f" JOIN parties p2 ON p2.id = r2.{role}_id"
                               f" WHERE p2.role = '{role}' AND p2.address = ?)")
                params.append(addresses.normalize(address))
        for condition, value in ((f"{column('a.received_at')} >= ?", since),
                                 (f"{column('a.received_at')} < ?", until),
                                 (f"{column('a.verdict')} = ?", verdict)):
            if value is not None:
                clauses.append(condition)
                params.append(value)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        # The page's ids first, from the index alone (a deep page skips
        # index entries, not rows), then their details.
        rows = await self._fetchall(
            "SELECT a.id, a.received_at, a.relationship_id, a.direction, a.verdict, a.reply,"
            " COALESCE(a.raw_size, length(a.raw)), COALESCE(a.delivered_size, length(a.delivered)),"
            " a.purged_at, s.address, b.address"
            " FROM archive a"
            " LEFT JOIN relationships r ON r.id = a.relationship_id"
            " LEFT JOIN parties s ON s.id = r.seller_id"
            " LEFT JOIN parties b ON b.id = r.buyer_id"
            f" WHERE a.id IN (SELECT a.id FROM archive a{where}"
            "  ORDER BY a.received_at DESC, a.id DESC LIMIT ? OFFSET ?)"
            " ORDER BY a.received_at DESC, a.id DESC",
            (*params, limit, offset))
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
        row = await self._fetchone("SELECT id FROM archive WHERE row_sha256 = ? LIMIT 1", (row_sha256,))
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
            ") AS refs ORDER BY archive_id, t LIMIT ?", (limit,))
        return [(row[0], row[1]) for row in rows]

    async def purge_runs(self) -> dict[int, str]:
        """Recorded purge runs: id -> cutoff."""
        return {row[0]: row[1] for row in await self._fetchall("SELECT id, cutoff FROM archive_purges")}

    async def hold(self, relationship_id: int, reason: str = "", at: str | None = None) -> bool:
        """Keep the relationship's archive from purge; False if already held.
        Under the purge lock: a purge batch running now finishes first, and
        its next batch sees the hold."""
        if await self.relationship_by_id(relationship_id) is None:
            raise NotFound(f"no relationship {relationship_id}")
        async with self._transaction() as tx:
            await tx.lock("purge")
            count = await tx.execute(
                "INSERT INTO archive_holds (relationship_id, held_at, reason) VALUES (?, ?, ?)"
                " ON CONFLICT (relationship_id) DO NOTHING", (relationship_id, at or utc_now(), reason))
        return count == 1

    async def release(self, relationship_id: int) -> bool:
        """End a hold; False if there was none."""
        return await self._execute("DELETE FROM archive_holds WHERE relationship_id = ?", (relationship_id,)) == 1

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
        """Turn archive rows received before `before_iso` into tombstones.

        A tombstone keeps id, received_at, relationship, direction, verdict,
        the auto-reply flag and the four hashes, so `relay archive verify`
        still checks the chain's linkage across it; bodies, envelope,
        client address, reply and changes are cleared, and the Message-ID
        map entries of those rows are deleted. Rows of a relationship on
        hold are skipped, and so are rows that fail their own hashes (purging
        them would hide the tampering). Delivery reports about a purged row
        (the `bounces` table, where it exists) go with it: they quote it.
        Works in batches of `batch` rows, one short write transaction each
        holding the purge lock, so a message arriving meanwhile waits for one
        batch at most and the daily purges of several nodes take turns and
        never tombstone a row twice. `relay serve` calls this once a day.
        """
        held = await self._fetchone(
            "SELECT COUNT(*) FROM archive WHERE purged_at IS NULL AND received_at < ?"
            " AND relationship_id IN (SELECT relationship_id FROM archive_holds)", (before_iso,))
        has_bounces = await self._has_table("bounces")
        counts = dict(rows=0, bytes=0, message_ids=0, bounces=0, damaged=0)
        run_id = None
        cursor_key = ("", 0)
        while True:
            rows = await self._archive_batch(
                f" WHERE {_PURGEABLE} AND a.received_at < ? AND (a.received_at, a.id) > (?, ?)",
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
            if dry_run:
                among, among_params = self._among("archive_id", [row_id for row_id, _, _ in good], "bigint")
                counts["rows"] += len(good)
                counts["bytes"] += sum(size for _, _, size in good)
                row = await self._fetchone(f"SELECT COUNT(*) FROM message_ids WHERE {among}", among_params)
                counts["message_ids"] += row[0]
                if has_bounces:
                    row = await self._fetchone(f"SELECT COUNT(*) FROM bounces WHERE {among}", among_params)
                    counts["bounces"] += row[0]
                continue
            stamp = now or utc_now()
            async with self._transaction() as tx:
                await tx.lock("purge")
                # Re-check under the lock: a hold placed or another purge
                # finished since the rows were read.
                among, among_params = self._among("a.id", [row_id for row_id, _, _ in good], "bigint")
                still = {row[0] for row in await tx.fetchall(
                    f"SELECT a.id FROM archive a WHERE {among} AND {_PURGEABLE}", among_params)}
                good = [item for item in good if item[0] in still]
                if not good:
                    continue
                among, among_params = self._among("archive_id", [row_id for row_id, _, _ in good], "bigint")
                if run_id is None:
                    run_id = await tx.insert("INSERT INTO archive_purges (ran_at, cutoff, rows) VALUES (?, ?, 0)",
                                             (stamp, before_iso))
                await tx.executemany(
                    "UPDATE archive SET client_address = '', mail_from = '', rcpt_to = '[]', reply = '',"
                    " changes = '[]', raw = ?, delivered = NULL, purged_at = ?, purge_id = ?,"
                    " auto_reply = COALESCE(auto_reply, ?) WHERE id = ?",
                    [(b"", stamp, run_id, int(auto), row_id) for row_id, auto, _ in good])
                await tx.execute(f"DELETE FROM archive_bodies WHERE {among}", among_params)
                counts["message_ids"] += await tx.execute(f"DELETE FROM message_ids WHERE {among}", among_params)
                if has_bounces:  # a delivery report quotes the message it reports on
                    counts["bounces"] += await tx.execute(f"DELETE FROM bounces WHERE {among}", among_params)
                await tx.execute("UPDATE archive_purges SET rows = rows + ? WHERE id = ?", (len(good), run_id))
            counts["rows"] += len(good)
            counts["bytes"] += sum(size for _, _, size in good)
        return PurgeCounts(before=before_iso, dry_run=dry_run, held=held[0], run_id=run_id, **counts)

    async def response_facts(self, since: str | None = None, until: str | None = None,
                             seller: str | None = None) -> tuple[list, dict[str, str]]:
        """The delivered messages the response-time report needs (facts from
        `since`, inclusive, to `until`, exclusive), and sellers' names.

        Rows written before migration 3 have no auto-reply flag yet: it is
        read from their raw headers now and stored, once."""
        clauses, params = ["a.verdict = 'delivered'"], []
        for condition, value in (("a.received_at >= ?", since), ("a.received_at < ?", until),
                                 ("s.address = ?", None if seller is None else addresses.normalize(seller))):
            if value is not None:
                clauses.append(condition)
                params.append(value)
        rows = await self._fetchall(
            "SELECT a.id, a.relationship_id, s.address, s.display_name, a.direction, a.received_at,"
            " a.auto_reply, EXISTS (SELECT 1 FROM bounces b WHERE b.archive_id = a.id AND b.action = 'failed')"
            " FROM archive a JOIN relationships r ON r.id = a.relationship_id"
            " JOIN parties s ON s.id = r.seller_id WHERE " + " AND ".join(clauses), params)
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
            among, among_params = self._among("a.id", chunk, "bigint")
            rows = await self._archive_batch(f" WHERE {among}", among_params, "a.id", len(chunk))
            done = {row["id"] for row in rows}
            ids = [row_id for row_id in ids if row_id not in done]
            rows_decoded = await asyncio.to_thread(lambda: [decoded(r) for r in rows])
            found = {row["id"]: archive_logic.is_auto_reply(row["raw"])
                     for row in rows_decoded if row["raw"] is not None}
            flags.update(found)
            if found:
                async with self._transaction() as tx:
                    await tx.executemany("UPDATE archive SET auto_reply = ? WHERE id = ? AND auto_reply IS NULL",
                                         [(int(flag), row_id) for row_id, flag in found.items()])
        return flags

    # --- bounces ------------------------------------------------------------

    async def message_by_relay_id(self, relay_id: str) -> dict | None:
        """The Message-ID map entry of a message the relay delivered."""
        row = await self._fetchone(
            "SELECT relationship_id, sender_id, archive_id, created_at, original_id FROM message_ids"
            " WHERE relay_id = ?", (relay_id,))
        if row is None:
            return None
        found = dict(zip(("relationship_id", "sender_id", "archive_id", "created_at", "original_id"), row))
        found["original_id"] = common.parsed_id(found["original_id"])
        return found

    async def record_bounce(self, received_at: str, relay_message_id: str, archive_id: int | None,
                            relationship_id: int | None, action: str, status: str, notified: bool,
                            raw: bytes, detector: str = "rfc3464", webhook_event: str | None = None) -> int:
        """Record a delivery report (and, with `webhook_event`, its event) in one transaction."""
        # A report's fields are message-borne text (8-bit bytes as surrogates).
        action, status, detector = (common.storable_text(v) for v in (action, status, detector))
        async with self._transaction() as tx:
            bounce_id = await tx.insert(
                "INSERT INTO bounces (received_at, relay_message_id, archive_id, relationship_id,"
                " action, status, notified, raw, detector) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (received_at, relay_message_id, archive_id, relationship_id, action, status, int(notified), raw,
                 detector))
            if webhook_event:
                data = events.bounce_data(bounce_id, archive_id, relationship_id, received_at, action, status,
                                          detector, notified)
                await self._add_webhook_event(tx, webhook_event, archive_id, data, received_at)
            return bounce_id

    async def bounces_for(self, archive_id: int) -> list[dict]:
        rows = await self._fetchall(
            "SELECT id, received_at, action, status, notified, detector FROM bounces"
            " WHERE archive_id = ? ORDER BY id", (archive_id,))
        return [dict(zip(("id", "received_at", "action", "status", "notified", "detector"), row))
                for row in rows]

    # --- webhook events (relay/events.py, relay/webhooks.py) -----------------

    @staticmethod
    async def _add_webhook_event(tx, event: str, archive_id: int | None, data: dict, at: str) -> None:
        await tx.execute(
            "INSERT INTO webhook_events (event, archive_id, data, created_at, next_attempt_at)"
            " VALUES (?, ?, ?, ?, ?)", (event, archive_id, json.dumps(data, ensure_ascii=False), at, at))

    async def claim_webhook_events(self, now: str, lease_until: str, limit: int) -> list[dict]:
        """Take up to `limit` events due by `now` for one attempt each: their
        next attempt moves to `lease_until` (past the POST's timeout, so an
        event whose sender died is due again then) and the attempt is
        counted. The UPDATE names the due time it read, so of two nodes
        claiming at once each event goes to one."""
        async with self._transaction() as tx:
            claimed: list[int] = []
            lost = True
            while lost and len(claimed) < limit:
                # Rows another node took meanwhile are lost to us; look again
                # (each statement sees what has been committed since).
                due = await tx.fetchall(
                    "SELECT id, next_attempt_at FROM webhook_events WHERE next_attempt_at IS NOT NULL"
                    " AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?", (now, limit - len(claimed)))
                lost = False
                for event_id, due_at in due:
                    if await tx.execute("UPDATE webhook_events SET next_attempt_at = ?, attempts = attempts + 1"
                                        " WHERE id = ? AND next_attempt_at = ?", (lease_until, event_id, due_at)) == 1:
                        claimed.append(event_id)
                    else:
                        lost = True
            if not claimed:
                return []
            among, params = self._among("id", claimed, "bigint")
            rows = await tx.fetchall(
                f"SELECT id, event, archive_id, data, created_at, attempts FROM webhook_events WHERE {among}"
                " ORDER BY id", params)
        return [dict(zip(("id", "event", "archive_id", "data", "created_at", "attempts"), row)) for row in rows]

    async def finish_webhook_attempt(self, event_id: int, *, sent_at: str | None = None, error: str = "",
                                     next_attempt_at: str | None = None) -> None:
        """An attempt's outcome: sent (`sent_at`), failed and due again at
        `next_attempt_at`, or failed for the last time (neither)."""
        await self._execute(
            "UPDATE webhook_events SET sent_at = ?, last_error = ?, next_attempt_at = ? WHERE id = ?",
            (sent_at, common.storable_text(error)[:500], next_attempt_at, event_id))

    async def release_webhook_events(self, event_ids: list[int], at: str) -> None:
        """Claimed events not attempted after all (the relay is stopping):
        due again at `at`, their claim not counted as an attempt."""
        if not event_ids:
            return
        among, params = self._among("id", event_ids, "bigint")
        await self._execute(
            f"UPDATE webhook_events SET next_attempt_at = ?, attempts = attempts - 1 WHERE {among}"
            " AND sent_at IS NULL AND next_attempt_at IS NOT NULL", [at, *params])

    async def webhook_events(self, limit: int = 100, unsent: bool = False) -> list[dict]:
        """The latest events, newest first, as stored (`relay webhooks list`,
        tests); with `unsent`, only those not sent (pending or given up)."""
        where = " WHERE sent_at IS NULL" if unsent else ""
        rows = await self._fetchall(
            "SELECT id, event, archive_id, data, created_at, attempts, next_attempt_at, sent_at, last_error"
            f" FROM webhook_events{where} ORDER BY id DESC LIMIT ?", (limit,))
        names = ("id", "event", "archive_id", "data", "created_at", "attempts", "next_attempt_at", "sent_at",
                 "last_error")
        return [dict(zip(names, row)) for row in rows]

    async def retry_webhook_event(self, event_id: int, at: str) -> bool:
        """An unsent event (given up, or waiting for its next attempt) due
        again at `at`; False if there is no such unsent event."""
        return await self._execute(
            "UPDATE webhook_events SET next_attempt_at = ? WHERE id = ? AND sent_at IS NULL",
            (at, event_id)) == 1

    async def prune_webhook_events(self, before: str) -> int:
        """Drop finished events (sent or given up) made before `before`."""
        return await self._execute(
            "DELETE FROM webhook_events WHERE next_attempt_at IS NULL AND created_at < ?", (before,))

    # --- health and metrics --------------------------------------------------

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers a query."""
        await self._fetchone("SELECT 1 FROM schema_migrations LIMIT 1")

    async def archive_size(self) -> int:
        """The highest archive id: the number of rows ever archived, cheap at any size."""
        row = await self._fetchone("SELECT COALESCE(MAX(id), 0) FROM archive")
        return row[0]
