"""The store on both backends (SQLite on a real file, PostgreSQL on a real
server: tests/store_backends.py): migrations, provisioning rules, the
archive chain, the daily-cap reservations, 8-bit message ids, errors as
StoreUnavailable (the database's state) or StoreDataError (the value), and
two stores on one database — two relay nodes — writing at once."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from dataclasses import replace

import asyncpg
import pytest

from relay import archive
from relay.store import ArchiveEntry, Conflict, NotFound, StoreDataError, StoreUnavailable, chain_hash, open_store
from relay.store import common
from relay.store.sqlite import migrations
from relay.store.url import is_postgres, postgres_options, redact
from store_backends import database, engine, open_two, with_query  # noqa: F401

DOMAIN = "marketplace.example"


@pytest.fixture
async def store(database):
    store = await open_store(database)
    await store.upgrade()
    yield store
    await store.close()


def test_migrations_are_numbered_from_one_and_alike_for_both_engines():
    numbers = [number for number, _ in migrations()]
    assert numbers == list(range(1, len(numbers) + 1))
    assert [number for number, _ in common.migrations("postgresql")] == numbers


def test_postgres_urls_options_and_redaction():
    options = postgres_options("postgresql://relay@db:5433/relay?pool_size=3&statement_timeout=250&sslmode=disable")
    assert (options.pool_size, options.statement_timeout_ms, options.connect_timeout) == (3, 250, 10.0)
    assert options.dsn == "postgresql://relay@db:5433/relay?sslmode=disable"  # the rest goes to asyncpg
    assert postgres_options("postgres://relay@db1,db2/relay").pool_size == 10
    for bad in ("postgresql://relay@db/relay?pool_size=x", "postgresql://relay@db:port/relay", "var/relay.sqlite3"):
        with pytest.raises(ValueError):
            postgres_options(bad)
    assert redact("postgres://relay:pw@db/relay?sslmode=require") == "postgres://relay:***@db/relay?sslmode=require"
    assert redact("var/relay.sqlite3") == "var/relay.sqlite3"
    assert is_postgres("PostgreSQL://db/relay") and not is_postgres("var/relay.sqlite3")


async def test_upgrade_is_idempotent(store):
    assert await store.upgrade() == []
    assert await store.schema_version() == len(migrations())


async def test_upgrade_from_two_nodes_at_once_applies_each_migration_once(database):
    first, second = await open_store(database), await open_store(database)
    try:
        assert await first.schema_version() == 0
        applied = await asyncio.gather(first.upgrade(), second.upgrade())
        assert sorted(applied, key=len) == [[], [n for n, _ in migrations()]]
        assert await second.schema_version() == len(migrations())
    finally:
        await first.close()
        await second.close()


async def test_wal_and_full_sync(tmp_path):
    store = await open_store(str(tmp_path / "relay.sqlite3"))
    try:
        db = sqlite3.connect(store.path)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()
    finally:
        await store.close()


async def seed(store):
    await store.add_party("seller", "Sam@Shop.example", "Sam")
    await store.add_party("buyer", "bea@mail.example", "Bea")
    return await store.add_order("O-1", "sam@shop.example", "BEA@mail.example", "2026-11-01T00:00:00Z", DOMAIN)


async def test_first_order_creates_the_relationship(store):
    relationship, created = await seed(store)
    assert created
    assert relationship.seller.address == "sam@shop.example"
    assert relationship.seller_alias.endswith("@marketplace.example")
    again, created = await store.add_order("O-2", "sam@shop.example", "bea@mail.example",
                                           "2026-11-02T00:00:00Z", DOMAIN)
    assert not created and again == relationship
    assert await store.relationship_by_alias(relationship.buyer_alias.upper()) == relationship
    assert (await store.relationship_stats(relationship.id)).orders == 2
    assert await store.seller_relationships("SAM@shop.example") == [relationship]
    assert await store.latest_order_at(relationship.id) == "2026-11-02T00:00:00Z"


async def test_duplicate_order_changes_nothing(store):
    relationship, _ = await seed(store)
    await store.add_party("seller", "other@shop.example", "Other")
    with pytest.raises(Conflict):
        await store.add_order("O-1", "other@shop.example", "bea@mail.example", "2026-11-02T00:00:00Z", DOMAIN)
    # No relationship was created for the other seller on the way.
    assert await store.relationship_for_pair("other@shop.example", "bea@mail.example") is None
    assert (await store.relationship_stats(relationship.id)).orders == 1


async def test_unknown_party_and_duplicate_party(store):
    await seed(store)
    with pytest.raises(NotFound):
        await store.add_order("O-9", "nobody@shop.example", "bea@mail.example", "2026-11-02T00:00:00Z", DOMAIN)
    with pytest.raises(Conflict):
        await store.add_party("buyer", "Bea@Mail.Example", "again")
    # The same address may be a seller and a buyer (a seller buys elsewhere).
    await store.add_party("buyer", "sam@shop.example", "Sam buying")


async def test_party_settings(store):
    await seed(store)
    assert await store.password_hash("sam@shop.example") is None
    party = await store.set_password_hash("SAM@shop.example", "scrypt$x")
    assert (await store.password_hash("sam@shop.example")) == (party, "scrypt$x")
    assert (await store.set_daily_orders("sam@shop.example", 3)).daily_orders == 3
    assert (await store.set_daily_orders("sam@shop.example", None)).daily_orders is None
    assert (await store.set_opted_out("bea@mail.example", True)).opted_out is True
    assert (await store.get_party("buyer", "bea@mail.example")).opted_out is True
    with pytest.raises(NotFound):
        await store.set_opted_out("nobody@mail.example", True)


def entry(relationship_id, n, verdict="delivered"):
    return ArchiveEntry(
        received_at=f"2026-11-27T00:00:0{n}Z", relationship_id=relationship_id, direction="buyer_to_seller",
        client_address="127.0.0.1", mail_from="bea@mail.example", rcpt_to=("x@marketplace.example",),
        verdict=verdict, reply="250 2.0.0 ok", changes=("c",), raw=b"raw%d" % n,
        delivered=b"out%d" % n if verdict == "delivered" else None, sender_id=2,
        original_message_id=f"<o{n}@mail.example>", relay_message_id=f"<r{n}@marketplace.example>")


async def test_archive_chain_and_message_id_map(store):
    relationship, _ = await seed(store)
    ids = [await store.record(entry(relationship.id, n)) for n in range(3)]
    ids.append(await store.record(entry(relationship.id, 3, verdict="rejected")))
    rows = [await store.archive_row(i) for i in ids]
    previous = "0" * 64
    for e, row in zip([entry(relationship.id, n) for n in range(3)] + [entry(relationship.id, 3, "rejected")], rows):
        assert row["prev_sha256"] == previous
        assert row["row_sha256"] == chain_hash(e.metadata(), row["raw_sha256"], row["delivered_sha256"], previous)
        previous = row["row_sha256"]
    mapped = await store.message_id_rows(relationship.id, ["<o1@mail.example>", "<r2@marketplace.example>",
                                                           "<r3@marketplace.example>"])
    # Rejected messages leave no threading entry.
    assert sorted(row.relay_id for row in mapped) == ["<r1@marketplace.example>", "<r2@marketplace.example>"]
    assert (await store.message_by_relay_id("<r1@marketplace.example>"))["archive_id"] == ids[1]
    assert await store.archive_size() == ids[-1]
    stats = await store.relationship_stats(relationship.id)
    assert (stats.buyer_to_seller, stats.seller_to_buyer, stats.last_message_at) == (3, 0, "2026-11-27T00:00:02Z")


async def test_bounces_are_recorded_against_their_message(store):
    relationship, _ = await seed(store)
    archive_id = await store.record(entry(relationship.id, 1))
    bounce_id = await store.record_bounce("2026-11-28T00:00:00Z", "<r1@marketplace.example>", archive_id,
                                          relationship.id, "failed", "5.1.1", True, b"report")
    plain_id = await store.record_bounce("2026-11-28T00:01:00Z", "<r1@marketplace.example>", archive_id,
                                         relationship.id, "failed", "", True, b"qmail text", detector="qmail")
    assert await store.bounces_for(archive_id) == [
        {"id": bounce_id, "received_at": "2026-11-28T00:00:00Z", "action": "failed", "status": "5.1.1",
         "notified": 1, "detector": "rfc3464"},
        {"id": plain_id, "received_at": "2026-11-28T00:01:00Z", "action": "failed", "status": "",
         "notified": 1, "detector": "qmail"}]


@contextlib.asynccontextmanager
async def locked(store, database):
    """Another connection holds the write lock meanwhile."""
    if engine(store) == "sqlite":
        blocker = sqlite3.connect(database, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            blocker.rollback()
            blocker.close()
        return
    blocker = await asyncpg.connect(database)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE parties IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await blocker.close()


async def test_locked_database_is_unavailable_not_a_crash(database):
    # PostgreSQL: a statement waits statement_timeout at most (5 s by
    # default, 200 ms here); SQLite: the busy timeout (5 s, lowered here).
    store = await open_store(with_query(database, statement_timeout=200))
    try:
        await store.upgrade()
        await store.add_party("seller", "sam@shop.example", "Sam")
        if engine(store) == "sqlite":
            import relay.store.sqlite as sqlite_module

            assert sqlite_module.BUSY_TIMEOUT_MS > 0
            await store._db.execute("PRAGMA busy_timeout = 50")
        else:
            assert store.options.statement_timeout_ms == 200
        async with locked(store, database):
            with pytest.raises(StoreUnavailable):
                await store.add_party("buyer", "bea@mail.example", "Bea")
        # Once the lock is gone, the same store works again.
        await store.add_party("buyer", "bea@mail.example", "Bea")
    finally:
        await store.close()


async def test_postgres_lost_connection_is_unavailable_then_recovers(postgres_url):
    store = await open_store(postgres_url)
    try:
        await store.upgrade()
        query = asyncio.ensure_future(store._fetchone("SELECT pg_sleep(4) FROM schema_migrations LIMIT 1"))
        killer = await asyncpg.connect(postgres_url)
        try:
            for _ in range(200):  # until the query runs
                killed = await killer.fetchval(
                    "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND query LIKE 'SELECT pg_sleep%'")
                if killed:
                    break
                await asyncio.sleep(0.02)
        finally:
            await killer.close()
        assert killed == 1
        with pytest.raises(StoreUnavailable):
            await query
        await store.ping()  # the pool opens a new connection
        assert await store.get_party("seller", "nobody@shop.example") is None
    finally:
        await store.close()


async def test_postgres_server_gone_or_url_wrong_is_unavailable(postgres_cluster):
    with pytest.raises(StoreUnavailable):  # nothing listens there
        await open_store(f"postgresql://postgres@127.0.0.1:{postgres_cluster.port + 1}/x?connect_timeout=2")
    with pytest.raises(StoreUnavailable):  # no such database
        await open_store(postgres_cluster.url("no_such_database"))


async def test_prune_seller_sends_keeps_the_window(store):
    relationship, _ = await seed(store)
    seller_id = relationship.seller.id
    for n, day in enumerate(("2026-11-20", "2026-11-26", "2026-11-27")):
        await store.record(seller_message(relationship, f"{day}T10:00:00.000000Z", n))
    assert (await store.seller_sends_since(seller_id, "2026-01-01"))[0] == 3
    assert await store.prune_seller_sends("2026-11-25T00:00:00.000000Z") == 1
    assert (await store.seller_sends_since(seller_id, "2026-01-01"))[0] == 2


def seller_message(relationship, received_at, n, verdict="delivered", reservation=None):
    return ArchiveEntry(
        received_at=received_at, relationship_id=relationship.id, direction="seller_to_buyer",
        client_address="127.0.0.1", mail_from="sam@shop.example", rcpt_to=("x@marketplace.example",),
        verdict=verdict, reply="250", changes=(), raw=b"r%d" % n,
        delivered=b"d%d" % n if verdict == "delivered" else None, sender_id=relationship.seller.id,
        relay_message_id=f"<s{n}@marketplace.example>", send_reservation=reservation)


WINDOW = "2026-11-26T00:00:00.000000Z"


async def test_reserve_send_counts_reservations_and_stops_at_the_cap(store):
    relationship, _ = await seed(store)
    seller = relationship.seller.id
    first, count, oldest = await store.reserve_send(seller, "2026-11-26T10:00:00.000000Z", WINDOW, 2)
    assert first is not None and (count, oldest) == (0, None)
    second, count, oldest = await store.reserve_send(seller, "2026-11-26T11:00:00.000000Z", WINDOW, 2)
    assert second is not None and (count, oldest) == (1, "2026-11-26T10:00:00.000000Z")
    # A reservation is a place taken: the read-only check sees it, and the cap is reached.
    assert await store.seller_sends_since(seller, WINDOW) == (2, "2026-11-26T10:00:00.000000Z")
    assert await store.reserve_send(seller, "2026-11-26T12:00:00.000000Z", WINDOW, 2) == (
        None, 2, "2026-11-26T10:00:00.000000Z")
    # Given back: the place is free again.
    await store.release_send(first)
    third, count, _ = await store.reserve_send(seller, "2026-11-26T12:00:00.000000Z", WINDOW, 2)
    assert third is not None and count == 1
    # Outside the window nothing counts.
    assert (await store.reserve_send(seller, "2026-11-28T12:00:00.000000Z", "2026-11-27T13:00:00.000000Z", 1))[0]


async def test_record_settles_the_reservation(store):
    relationship, _ = await seed(store)
    seller = relationship.seller.id
    delivered_place, _, _ = await store.reserve_send(seller, "2026-11-26T10:00:00.000000Z", WINDOW, 5)
    refused_place, _, _ = await store.reserve_send(seller, "2026-11-26T10:00:01.000000Z", WINDOW, 5)
    delivered = await store.record(seller_message(relationship, "2026-11-26T10:00:02.000000Z", 1,
                                                  reservation=delivered_place))
    await store.record(seller_message(relationship, "2026-11-26T10:00:03.000000Z", 2, verdict="deferred",
                                      reservation=refused_place))
    # The delivered message took over its reserved place (no second row, its
    # archive id and time); the deferred one gave its place back.
    rows = await store._fetchall("SELECT id, archive_id, sent_at FROM seller_sends ORDER BY id")
    assert [tuple(row) for row in rows] == [(delivered_place, delivered, "2026-11-26T10:00:02.000000Z")]
    # A reservation is never a dangling archive reference for verify.
    assert await store.archive_dangling_references() == []
    pending, _, _ = await store.reserve_send(seller, "2026-11-26T11:00:00.000000Z", WINDOW, 5)
    assert await store.archive_dangling_references() == []
    # release_send never removes a counted row.
    await store.release_send(delivered_place)
    assert (await store.seller_sends_since(seller, WINDOW))[0] == 2
    await store.release_send(pending)
    assert (await store.seller_sends_since(seller, WINDOW))[0] == 1


async def test_sqlite_migration_5_keeps_the_counted_sends(tmp_path):
    path = tmp_path / "relay.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    for version, sql in migrations()[:4]:
        db.executescript(sql)
        db.execute("INSERT INTO schema_migrations VALUES (?, '2026-01-01')", (version,))
    db.execute("INSERT INTO parties (id, role, address, created_at) VALUES (1, 'seller', 's@x.example', 'x')")
    db.execute("INSERT INTO archive (id, received_at, client_address, mail_from, rcpt_to, verdict, reply, changes,"
               " raw, raw_sha256, prev_sha256, row_sha256) VALUES (7, 't', '', '', '[]', 'delivered', '', '[]',"
               " x'', '', '', '')")
    db.execute("INSERT INTO seller_sends (id, seller_id, archive_id, sent_at) VALUES (3, 1, 7, '2026-11-26')")
    db.commit()
    db.close()
    store = await open_store(str(path))
    try:
        assert await store.upgrade() == list(range(5, len(migrations()) + 1))  # and every later migration
        assert await store.seller_sends_since(1, "2026") == (1, "2026-11-26")
        reservation, count, _ = await store.reserve_send(1, "2026-11-27", "2026", 5)
        assert (reservation, count) == (4, 1)
    finally:
        await store.close()


# --- two nodes on one database --------------------------------------------------------


async def test_two_nodes_creating_the_same_pair_at_once_make_one_relationship(database):
    first, second = await open_two(database)
    try:
        for n in range(8):
            await first.add_party("seller", f"s{n}@shop.example", "S")
            await first.add_party("buyer", f"b{n}@mail.example", "B")
        results = await asyncio.gather(*(
            node.add_order(f"O-{n}-{i}", f"s{n}@shop.example", f"b{n}@mail.example", "2026-11-01T00:00:00Z", DOMAIN)
            for n in range(8) for i, node in enumerate((first, second))))
        for n in range(8):
            (one, created_one), (two, created_two) = results[2 * n], results[2 * n + 1]
            assert one == two  # the same id and the same aliases on both nodes
            assert sorted([created_one, created_two]) == [False, True]
            assert (await first.relationship_stats(one.id)).orders == 2
        count = await first._fetchone("SELECT COUNT(*) FROM relationships")
        assert count[0] == 8
        # The same order reference from both nodes at once: one wins, one Conflict.
        outcomes = await asyncio.gather(
            *(node.add_order("SAME", "s0@shop.example", "b0@mail.example", "2026-11-02T00:00:00Z", DOMAIN)
              for node in (first, second)), return_exceptions=True)
        assert sorted(type(outcome).__name__ for outcome in outcomes) == ["Conflict", "tuple"]
        assert (await first.relationship_stats(results[0][0].id)).orders == 3
    finally:
        await first.close()
        await second.close()


async def test_two_nodes_reserving_at_the_cap_boundary_take_exactly_the_cap(database):
    first, second = await open_two(database)
    try:
        relationship, _ = await seed(first)
        seller, cap = relationship.seller.id, 7
        await first.reserve_send(seller, "2026-11-26T09:00:00.000000Z", WINDOW, cap)  # one already sent
        results = await asyncio.gather(*(
            node.reserve_send(seller, f"2026-11-26T10:00:{n:02d}.000000Z", WINDOW, cap)
            for n in range(10) for node in (first, second)))
        granted = [reservation for reservation, _, _ in results if reservation is not None]
        assert len(granted) == cap - 1 and len(set(granted)) == cap - 1
        assert await second.seller_sends_since(seller, WINDOW) == (cap, "2026-11-26T09:00:00.000000Z")
        # Each grant saw a different count: they really took turns.
        assert sorted(count for reservation, count, _ in results if reservation is not None) == list(range(1, cap))
    finally:
        await first.close()
        await second.close()


async def test_two_nodes_appending_at_once_keep_one_valid_chain(database):
    first, second = await open_two(database)
    try:
        relationship, _ = await seed(first)
        entries = [replace(entry(relationship.id, n % 10), relay_message_id=f"<r{n}@m>", received_at=f"2026-11-27T00:{n:02d}:00Z")
                   for n in range(40)]
        ids = await asyncio.gather(*(
            (first if n % 2 else second).record(e) for n, e in enumerate(entries)))
        assert sorted(ids) == await first.archive_ids() and len(set(ids)) == 40
        verifier = archive.ChainVerifier(purge_runs=await second.purge_runs())
        async for row in second.archive_chain():
            verifier.feed(row)
        assert verifier.ok, verifier.breaks
        assert verifier.rows == 40
        assert await first.archive_dangling_references() == []
    finally:
        await first.close()
        await second.close()


# --- 8-bit message ids and other message-borne text (issue 14 §2) ---------------------
#
# The email package hands the store a header's bytes decoded as ASCII with
# surrogateescape: each 8-bit byte a lone surrogate, which neither engine
# stores. `parser_form` makes such strings from the bytes a client sent.

def parser_form(data: bytes) -> str:
    return data.decode("ascii", errors="surrogateescape")


EIGHT_BIT_IDS = [
    ("ascii", b"<o1@mail.example>", "<o1@mail.example>"),
    ("utf8", "<bücher-€@mail.example>".encode("utf-8"), "<bücher-€@mail.example>"),
    ("latin1", "<bücher@mail.example>".encode("latin-1"), "bytes <b\\xfccher@mail.example>"),
    ("invalid-utf8", b"<\xff\xfe\x80@mail.example>", "bytes <\\xff\\xfe\\x80@mail.example>"),
    ("nul-and-backslash", b"<a\\b\x00@mail.example>", "bytes <a\\\\b\\x00@mail.example>"),
    ("utf8-control", "<a\u0085b@mail.example>".encode("utf-8"), "bytes <a\\xc2\\x85b@mail.example>"),
]


@pytest.mark.parametrize("sent, spelled", [(s, p) for _, s, p in EIGHT_BIT_IDS], ids=[n for n, _, _ in EIGHT_BIT_IDS])
def test_an_id_has_one_storable_spelling_that_gives_its_bytes_back(sent, spelled):
    msgid = parser_form(sent)
    assert common.stored_id(msgid) == spelled
    spelled.encode("utf-8")  # no surrogates left
    assert "\x00" not in spelled
    assert common.parsed_id(spelled) == msgid
    assert common.parsed_id(spelled).encode("ascii", errors="surrogateescape") == sent


def test_spellings_of_different_bytes_never_meet():
    # Strings that look like another form's output are spelled apart from it.
    look_alikes = [b"<b\\xfccher@mail.example>", b"bytes <b\\xfccher@mail.example>", "bytes <é>".encode("utf-8"),
                   b"bytes <\xe9>", b"<\xe9>", "<é>".encode("utf-8"), b"<a b>", b"bytes <a\\x20b>"]
    every = [sent for _, sent, _ in EIGHT_BIT_IDS] + look_alikes
    spellings = {common.stored_id(parser_form(sent)): sent for sent in every}
    assert len(spellings) == len(every)
    for spelled, sent in spellings.items():
        assert common.parsed_id(spelled) == parser_form(sent)


async def test_8bit_ids_are_recorded_and_found_under_the_same_bytes(store):
    relationship, _ = await seed(store)
    for n, (_, sent, _) in enumerate(EIGHT_BIT_IDS):
        await store.record(replace(entry(relationship.id, n), original_message_id=parser_form(sent)))
    for n, (name, sent, _) in enumerate(EIGHT_BIT_IDS):
        [row] = await store.message_id_rows(relationship.id, [parser_form(sent), "<unknown@mail.example>"])
        assert (row.original_id, row.relay_id) == (parser_form(sent), f"<r{n}@marketplace.example>"), name
        found = await store.message_by_relay_id(f"<r{n}@marketplace.example>")
        assert found["original_id"] == parser_form(sent)
    # The escaped spelling, sent as an ASCII id, names no 8-bit id.
    assert await store.message_id_rows(relationship.id, ["<b\\xfccher@mail.example>"]) == []


async def test_archive_text_with_8bit_bytes_is_stored_escaped_and_still_verifies(store):
    relationship, _ = await seed(store)
    bits = parser_form(b"\xff\xfe\x80")
    archive_id = await store.record(replace(
        entry(relationship.id, 1, verdict="rejected"), mail_from=f"bea{bits}@mail.example",
        rcpt_to=(f"x{bits}@marketplace.example",), reply=f"550 5.7.1 no {bits}",
        changes=(f"dropped header X-{bits}", "nul\x00")))
    row = await store.archive_row(archive_id)
    assert row["mail_from"] == "bea\\xff\\xfe\\x80@mail.example"
    assert row["reply"] == "550 5.7.1 no \\xff\\xfe\\x80"
    assert row["changes"] == ["dropped header X-\\xff\\xfe\\x80", "nul\\x00"]
    assert archive.content_problem(row) is None  # the chain covers what was stored
    bounce = await store.record_bounce("2026-11-28T00:00:00Z", "<r1@marketplace.example>", archive_id,
                                       relationship.id, f"failed{bits}", "", False, b"report")
    [recorded] = await store.bounces_for(archive_id)
    assert (recorded["id"], recorded["action"]) == (bounce, "failed\\xff\\xfe\\x80")


# --- what a failure is: the same value again, or the database's state -------------------


async def test_a_value_the_database_refuses_is_a_data_error_not_an_outage(store):
    select = "SELECT ?" if engine(store) == "sqlite" else "SELECT $1::text"
    # A lone surrogate: Python's UTF-8 encoder (SQLite) and asyncpg refuse it.
    with pytest.raises(StoreDataError) as refused:
        await store._fetchall(select, ("\udcff",))
    assert not isinstance(refused.value, StoreUnavailable)
    if engine(store) == "postgresql":
        # The server refuses a NUL in text (SQLSTATE 22021) and a division
        # by zero (22012): class 22, the value, not the database.
        for value in ("a\x00b",):
            with pytest.raises(StoreDataError):
                await store._fetchall(select, (value,))
        with pytest.raises(StoreDataError):
            await store._fetchall("SELECT 1 / $1::int", (0,))
    else:
        # Over SQLite's length limit: SQLITE_TOOBIG.
        await store._db._execute(store._db._conn.setlimit, sqlite3.SQLITE_LIMIT_LENGTH, 100)
        with pytest.raises(StoreDataError):
            await store._fetchall("SELECT ?", (b"x" * 200,))
    # The store goes on serving.
    assert await store.get_party("seller", "nobody@shop.example") is None


async def test_a_bug_in_a_statement_goes_up_as_it_is(store):
    if engine(store) == "sqlite":
        with pytest.raises(sqlite3.ProgrammingError):  # two placeholders, one value
            await store._fetchall("SELECT ?, ?", (1,))
    # A constraint the caller handles is not reworded either.
    relationship, _ = await seed(store)
    await store.record(entry(relationship.id, 1))
    integrity = sqlite3.IntegrityError if engine(store) == "sqlite" else asyncpg.UniqueViolationError
    with pytest.raises(integrity):
        await store.record(entry(relationship.id, 1))  # the same relay id again


def test_the_classification_of_driver_errors():
    from relay.store import postgresql as pg_store
    from relay.store import sqlite as sqlite_store

    def sqlite_error(kind, code):
        error = kind("x")
        error.sqlite_errorcode = code
        return error

    assert sqlite_store.classify(UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")) is StoreDataError
    assert sqlite_store.classify(sqlite_error(sqlite3.OperationalError, sqlite3.SQLITE_BUSY)) is StoreUnavailable
    assert sqlite_store.classify(sqlite_error(sqlite3.OperationalError, 778)) is StoreUnavailable  # IOERR_WRITE
    assert sqlite_store.classify(sqlite_error(sqlite3.OperationalError, sqlite3.SQLITE_FULL)) is StoreUnavailable
    assert sqlite_store.classify(sqlite_error(sqlite3.DataError, sqlite3.SQLITE_TOOBIG)) is StoreDataError
    assert sqlite_store.classify(sqlite3.ProgrammingError("Cannot operate on a closed database.")) is StoreUnavailable
    assert sqlite_store.classify(sqlite3.ProgrammingError("Incorrect number of bindings supplied")) is None
    assert sqlite_store.classify(ValueError("no active connection")) is StoreUnavailable
    assert sqlite_store.classify(OSError(28, "No space left on device")) is StoreUnavailable
    assert sqlite_store.classify(KeyError("bug")) is None

    assert pg_store.classify(asyncpg.CharacterNotInRepertoireError("nul")) is StoreDataError
    assert pg_store.classify(asyncpg.StringDataRightTruncationError("long")) is StoreDataError
    assert pg_store.classify(asyncpg.ProgramLimitExceededError("index row too big")) is StoreDataError
    assert pg_store.classify(asyncpg.QueryCanceledError("statement timeout")) is StoreUnavailable
    assert pg_store.classify(asyncpg.AdminShutdownError("shutdown")) is StoreUnavailable
    assert pg_store.classify(asyncpg.DeadlockDetectedError("deadlock")) is StoreUnavailable
    assert pg_store.classify(asyncpg.InterfaceError("connection is closed")) is StoreUnavailable
    assert pg_store.classify(asyncpg.UniqueViolationError("dup")) is None
    assert pg_store.classify(ConnectionRefusedError()) is StoreUnavailable
    assert pg_store.classify(KeyError("bug")) is None


async def test_webhook_events_are_written_with_their_row_and_claimed_once(database):
    """Two nodes claiming at once take each due event once; a claim that
    runs out makes the event due again; a released claim is no attempt;
    finished events are pruned, pending ones never."""
    first, second = await open_two(database)
    try:
        relationship, _ = await seed(first)
        ids = [await first.record(replace(entry(relationship.id, n), webhook_event="message.delivered"))
               for n in range(6)]
        await first.record(entry(relationship.id, 7))  # no event asked for
        stored = await first.webhook_events()
        assert sorted(e["archive_id"] for e in stored) == ids
        assert all(e["next_attempt_at"] == e["created_at"] and e["attempts"] == 0 for e in stored)
        now, lease = "2026-11-27T00:01:00.000000Z", "2026-11-27T00:02:00.000000Z"
        taken = await asyncio.gather(*(store.claim_webhook_events(now, lease, 3)
                                       for store in (first, second, first, second)))
        claimed = [e["id"] for batch in taken for e in batch]
        assert sorted(claimed) == sorted(e["id"] for e in stored)  # every event, each once
        assert {e["attempts"] for batch in taken for e in batch} == {1}
        assert await second.claim_webhook_events(now, lease, 10) == []  # all leased
        one, two, three = sorted(claimed)[:3]
        await first.finish_webhook_attempt(one, sent_at=now)
        await first.finish_webhook_attempt(two, error="HTTP 500", next_attempt_at="2026-11-27T00:01:30.000000Z")
        await first.release_webhook_events([three, one], now)  # `one` was sent: left alone
        again = await second.claim_webhook_events("2026-11-27T00:01:30.000000Z", "2026-11-27T00:05:00.000000Z", 10)
        assert sorted((e["id"], e["attempts"]) for e in again) == [(two, 2), (three, 1)]
        # The leases of the rest run out: due again.
        late = await first.claim_webhook_events("2026-11-27T00:02:00.000000Z", "2026-11-27T00:03:00.000000Z", 10)
        assert sorted(e["id"] for e in late) == sorted(claimed)[3:] and {e["attempts"] for e in late} == {2}
        await first.finish_webhook_attempt(two, error="HTTP 500")  # given up: finished, never sent
        rows = {e["id"]: e for e in await first.webhook_events()}
        assert (rows[one]["sent_at"], rows[one]["next_attempt_at"]) == (now, None)
        assert (rows[two]["sent_at"], rows[two]["next_attempt_at"], rows[two]["last_error"]) == (None, None, "HTTP 500")
        assert await first.prune_webhook_events("2026-11-28T00:00:00Z") == 2
        assert sorted(e["id"] for e in await first.webhook_events()) == sorted(set(claimed) - {one, two})
    finally:
        await first.close()
        await second.close()
