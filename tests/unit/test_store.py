"""The SQLite store on real files: migrations, provisioning rules, the
archive chain."""

from __future__ import annotations

import sqlite3

import pytest

from relay.store import ArchiveEntry, Conflict, NotFound, StoreUnavailable, chain_hash, open_store
from relay.store.sqlite import migrations


@pytest.fixture
async def store(tmp_path):
    store = await open_store(str(tmp_path / "sub" / "relay.sqlite3"))
    await store.upgrade()
    yield store
    await store.close()


def test_migrations_are_numbered_from_one():
    numbers = [number for number, _ in migrations()]
    assert numbers == list(range(1, len(numbers) + 1))


async def test_upgrade_is_idempotent(store):
    assert await store.upgrade() == []
    assert await store.schema_version() == len(migrations())


async def test_wal_and_full_sync(store):
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def seed(store):
    await store.add_party("seller", "Sam@Shop.example", "Sam")
    await store.add_party("buyer", "bea@mail.example", "Bea")
    return await store.add_order("O-1", "sam@shop.example", "BEA@mail.example", "2026-11-01T00:00:00Z",
                                 "marketplace.example")


async def test_first_order_creates_the_relationship(store):
    relationship, created = await seed(store)
    assert created
    assert relationship.seller.address == "sam@shop.example"
    assert relationship.seller_alias.endswith("@marketplace.example")
    again, created = await store.add_order("O-2", "sam@shop.example", "bea@mail.example",
                                           "2026-11-02T00:00:00Z", "marketplace.example")
    assert not created and again == relationship
    assert await store.relationship_by_alias(relationship.buyer_alias.upper()) == relationship
    assert (await store.relationship_stats(relationship.id)).orders == 2


async def test_duplicate_order_changes_nothing(store):
    relationship, _ = await seed(store)
    await store.add_party("seller", "other@shop.example", "Other")
    with pytest.raises(Conflict):
        await store.add_order("O-1", "other@shop.example", "bea@mail.example", "2026-11-02T00:00:00Z",
                              "marketplace.example")
    # No relationship was created for the other seller on the way.
    assert await store.relationship_for_pair("other@shop.example", "bea@mail.example") is None
    assert (await store.relationship_stats(relationship.id)).orders == 1


async def test_unknown_party_and_duplicate_party(store):
    await seed(store)
    with pytest.raises(NotFound):
        await store.add_order("O-9", "nobody@shop.example", "bea@mail.example", "2026-11-02T00:00:00Z",
                              "marketplace.example")
    with pytest.raises(Conflict):
        await store.add_party("buyer", "Bea@Mail.Example", "again")
    # The same address may be a seller and a buyer (a seller buys elsewhere).
    await store.add_party("buyer", "sam@shop.example", "Sam buying")


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


async def test_locked_database_is_unavailable_not_a_crash(tmp_path):
    path = str(tmp_path / "relay.sqlite3")
    store = await open_store(path)
    await store.upgrade()
    await store.add_party("seller", "sam@shop.example", "Sam")
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        import relay.store.sqlite as sqlite_module
        await store._db.execute("PRAGMA busy_timeout = 50")
        with pytest.raises(StoreUnavailable):
            await store.add_party("buyer", "bea@mail.example", "Bea")
    finally:
        blocker.rollback()
        blocker.close()
        await store.close()
    assert sqlite_module.BUSY_TIMEOUT_MS > 0


async def test_prune_seller_sends_keeps_the_window(store):
    relationship, _ = await seed(store)
    seller_id = relationship.seller.id
    for n, day in enumerate(("2026-11-20", "2026-11-26", "2026-11-27")):
        await store.record(ArchiveEntry(
            received_at=f"{day}T10:00:00.000000Z", relationship_id=relationship.id, direction="seller_to_buyer",
            client_address="127.0.0.1", mail_from="sam@shop.example", rcpt_to=("x@marketplace.example",),
            verdict="delivered", reply="250", changes=(), raw=b"r%d" % n, delivered=b"d%d" % n,
            sender_id=seller_id, relay_message_id=f"<s{n}@marketplace.example>"))
    assert (await store.seller_sends_since(seller_id, "2026-01-01"))[0] == 3
    assert await store.prune_seller_sends("2026-11-25T00:00:00.000000Z") == 1
    assert (await store.seller_sends_since(seller_id, "2026-01-01"))[0] == 2
