"""The archive on both backends (a real SQLite file, a real PostgreSQL
database: tests/store_backends.py): compressed bodies that read back as the
exact bytes, the per-row encoding, holds and purge at the store level."""

from __future__ import annotations

import base64
import random
from dataclasses import replace

import pytest

from relay import archive as archive_logic
from relay.store import ArchiveEntry, BodyDecodeError, NotFound, decode_bodies, encode_bodies, open_store
from store_backends import database, engine  # noqa: F401


@pytest.fixture
async def store(database):
    store = await open_store(database)
    await store.upgrade()
    await store.add_party("seller", "sam@shop.example", "Sam")
    await store.add_party("buyer", "bea@mail.example", "Bea")
    store.relationship, _ = await store.add_order("O-1", "sam@shop.example", "bea@mail.example",
                                                  "2026-01-01T00:00:00.000000Z", "marketplace.example")
    yield store
    await store.close()


def photo_message(size: int) -> bytes:
    data = base64.encodebytes(random.Random(7).randbytes(size)).replace(b"\n", b"\r\n")
    return (b"From: bea@mail.example\r\nSubject: photo\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
            b"See the crack, bea@mail.example\r\n--b\r\nContent-Type: image/jpeg\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + data + b"--b--\r\n")


def entry(store, raw, delivered, when="2026-02-01T00:00:00.000000Z", verdict="delivered", relay_id="<r1@m>"):
    return ArchiveEntry(received_at=when, relationship_id=store.relationship.id, direction="buyer_to_seller",
                        client_address="127.0.0.1", mail_from="bea@mail.example", rcpt_to=("s@m",),
                        verdict=verdict, reply="250", changes=("c",), raw=raw, delivered=delivered,
                        sender_id=store.relationship.buyer.id, original_message_id="<o@mail.example>",
                        relay_message_id=relay_id)


async def test_bodies_are_compressed_and_read_back_exactly(store):
    raw = photo_message(1_500_000)
    delivered = (b"Received: by relay\r\nX-Relay-Policy: clean\r\n"
                 + raw.replace(b"bea@mail.example", b"xxxxxxxxxxxxxxxx@marketplace.example"))
    archive_id = await store.record(entry(store, raw, delivered))
    row = await store.archive_row(archive_id)
    assert (row["raw"], row["delivered"], row["body_encoding"]) == (raw, delivered, "zstd")
    assert (row["raw_size"], row["delivered_size"], row["auto_reply"]) == (len(raw), len(delivered), 0)
    inline, stored_raw, stored_delivered = await store._fetchone(
        "SELECT length(a.raw), length(b.raw), length(b.delivered) FROM archive a"
        f" JOIN archive_bodies b ON b.archive_id = a.id WHERE a.id = {int(archive_id)}")
    assert inline == 0
    # Base64 of random bytes packs to about 3/4; the delivered copy is a
    # delta against raw: a few hundred bytes for a 2 MB message.
    assert stored_raw < 0.8 * len(raw)
    assert stored_delivered < 2000


async def test_bodies_prepared_by_the_worker_are_stored_as_they_are(store):
    """A delivered message's bodies come hashed and compressed from the
    worker that made them; record() stores those and reads back the same.
    Ones made for other bodies (other sizes) are not trusted: made again."""
    from relay.store.common import prepare_bodies

    raw, delivered = photo_message(300_000), b"Received: by relay\r\n" + photo_message(300_000)
    prepared = prepare_bodies(raw, delivered)
    first = await store.record(replace(entry(store, raw, delivered), bodies=prepared))
    row = await store.archive_row(first)
    assert (row["raw"], row["delivered"], row["raw_sha256"]) == (raw, delivered, prepared.raw_sha256)
    stale = prepare_bodies(raw + b"x", None)
    second = await store.record(replace(entry(store, raw, delivered, relay_id="<r2@m>"), bodies=stale))
    row = await store.archive_row(second)
    assert (row["raw"], row["delivered"], row["raw_sha256"]) == (raw, delivered, prepared.raw_sha256)
    assert row["delivered_sha256"] == prepared.delivered_sha256


async def test_a_spliced_delivered_copy_is_stored_and_read_back(store):
    """The worker's bodies for a message whose attachment was delivered as
    received: delivered is a splice of raw (relay/store/__init__.py), on
    both engines, and reads back as the exact bytes."""
    from relay.store.common import prepare_bodies

    raw = photo_message(2_000_000)
    start = raw.index(b"\r\n\r\n", raw.index(b"image/jpeg")) + 4
    end = raw.rindex(b"\r\n--b--")
    delivered = b"DKIM-Signature: v=1\r\nReceived: by relay\r\n" + raw.replace(b"bea@mail.example", b"b@m")
    prepared = prepare_bodies(raw, delivered, ((start, end),))
    assert len(prepared.delivered_blob) < 2000
    archive_id = await store.record(replace(entry(store, raw, delivered), bodies=prepared))
    row = await store.archive_row(archive_id)
    assert (row["raw"], row["delivered"], row["decode_error"]) == (raw, delivered, None)
    assert archive_logic.content_problem(row) is None  # the row's hashes hold for what was read back


def test_splice_round_trips_and_damage():
    raw = photo_message(100_000)
    start = raw.index(b"\r\n\r\n", raw.index(b"image/jpeg")) + 4
    end = raw.rindex(b"\r\n--b--")
    delivered = b"X-New: 1\r\n" + raw[:start] + b"changed\r\n" + raw[start:]
    raw_blob, spliced = encode_bodies(raw, delivered, ((start, end), (0, 10)))
    assert spliced[:4] == bytes.fromhex("5e2a4d18")
    assert decode_bodies("zstd", raw_blob, spliced) == (raw, delivered)
    # Ranges that delivered does not hold: the ordinary frame.
    raw_blob, plain = encode_bodies(raw, b"something else", ((start, end),))
    assert plain[:4] == bytes.fromhex("28b52ffd")
    assert decode_bodies("zstd", raw_blob, plain) == (raw, b"something else")
    # A damaged splice is reported, never read as other bytes.
    import json
    import struct

    size = struct.unpack_from("<I", spliced, 4)[0]
    recipe = json.loads(spliced[8:8 + size])
    def with_recipe(value) -> bytes:
        text = json.dumps(value).encode()
        return spliced[:4] + struct.pack("<I", len(text)) + text + spliced[8 + size:]
    at, first, length = recipe["splice"][0]
    for damaged in (spliced[:8 + size - 2] + spliced[8 + size:],  # cut JSON
                    with_recipe({"splice": [[at, len(raw) - 5, length]]}),  # outside raw
                    with_recipe({"splice": [[at, first, length], [at, first, length]]}),  # overlapping
                    with_recipe({"other": []}), with_recipe({"splice": [["a", 1, 2]]}),
                    spliced[:8 + size + 10]):  # the zstd frame cut
        with pytest.raises(BodyDecodeError, match="splice|zstd"):
            decode_bodies("zstd", raw_blob, damaged)


async def test_auto_reply_flag_is_set_when_recorded(store):
    archive_id = await store.record(entry(store, b"Auto-Submitted: auto-replied\r\n\r\nAway.\r\n", None,
                                          verdict="rejected"))
    assert (await store.archive_row(archive_id))["auto_reply"] == 1


def test_codec_round_trip_and_damage():
    for raw, delivered in [(b"", None), (b"a", b""), (b"x" * 100_000, b"x" * 99_999 + b"y")]:
        assert decode_bodies("zstd", *encode_bodies(raw, delivered)) == (raw, delivered)
    assert decode_bodies("identity", b"raw", None) == (b"raw", None)
    raw_blob, delivered_blob = encode_bodies(b"hello " * 100, b"hello " * 99)
    with pytest.raises(BodyDecodeError, match="zstd"):
        decode_bodies("zstd", raw_blob[:-3], delivered_blob)
    with pytest.raises(BodyDecodeError, match="unknown body encoding 'lz4'"):
        decode_bodies("lz4", raw_blob, None)


async def test_purge_dry_run_hold_and_tombstone(store):
    old = await store.record(entry(store, b"Subject: old\r\n\r\nold\r\n", b"old out", when="2020-01-01T00:00:00.000000Z"))
    new = await store.record(entry(store, b"Subject: new\r\n\r\nnew\r\n", b"new out", relay_id="<r2@m>"))
    cutoff = "2025-01-01T00:00:00.000000Z"

    dry = await store.purge(cutoff, dry_run=True)
    assert (dry.rows, dry.message_ids, dry.bytes, dry.run_id) == (1, 1, len(b"Subject: old\r\n\r\nold\r\nold out"), None)
    assert (await store.archive_row(old))["purged_at"] is None

    assert await store.hold(store.relationship.id, "case 1") is True
    assert await store.hold(store.relationship.id) is False
    held = await store.purge(cutoff)
    assert (held.rows, held.held) == (0, 1)
    assert await store.release(store.relationship.id) is True
    assert await store.release(store.relationship.id) is False
    with pytest.raises(NotFound):
        await store.hold(999)

    done = await store.purge(cutoff, now="2026-06-01T00:00:00.000000Z")
    assert (done.rows, done.message_ids, done.held, done.damaged) == (1, 1, 0, 0)
    tomb = await store.archive_row(old)
    assert tomb["purged_at"] == "2026-06-01T00:00:00.000000Z" and tomb["purge_id"] == done.run_id
    assert (tomb["raw"], tomb["delivered"], tomb["mail_from"], tomb["client_address"]) == (None, None, "", "")
    assert tomb["row_sha256"] and tomb["raw_sha256"]
    assert await store.purge_runs() == {done.run_id: cutoff}
    assert await store.message_id_rows(store.relationship.id, ["<r1@m>", "<r2@m>"]) != []
    assert [r.relay_id for r in await store.message_id_rows(store.relationship.id, ["<r1@m>", "<r2@m>"])] == ["<r2@m>"]
    assert (await store.archive_row(new))["raw"] == b"Subject: new\r\n\r\nnew\r\n"


async def test_batches_are_bounded_by_bytes_not_only_rows(store, monkeypatch):
    from relay.store import queries

    ids = [await store.record(entry(store, b"Subject: %d\r\n\r\nbody\r\n" % n, b"out", relay_id=f"<r{n}@m>",
                                    when=f"2020-01-0{n + 1}T00:00:00.000000Z")) for n in range(3)]
    monkeypatch.setattr(queries, "BATCH_BYTES", 1)  # every batch holds one row
    assert [row["id"] async for row in store.archive_chain()] == ids
    assert [row["id"] async for row in store.conversation(store.relationship.id)] == ids
    assert [row["content_problem"] async for row in store.archive_chain()] == [None, None, None]
    assert (await store.purge("2025-01-01T00:00:00.000000Z")).rows == 3


async def second_pair(store):
    await store.add_party("buyer", "bob@mail.example", "Bob")
    relationship, _ = await store.add_order("O-2", "sam@shop.example", "bob@mail.example",
                                            "2026-01-01T00:00:00.000000Z", "marketplace.example")
    return relationship


async def test_listing_filters_and_pages(store):
    bob = await second_pair(store)
    bea_first = await store.record(entry(store, b"Subject: 1\r\n\r\n1\r\n", b"o1", when="2026-02-01T00:00:00.000000Z"))
    refused = await store.record(entry(store, b"Subject: 2\r\n\r\n2\r\n", None, verdict="rejected",
                                       when="2026-02-02T00:00:00.000000Z", relay_id="<r2@m>"))
    bob_row = await store.record(ArchiveEntry(
        received_at="2026-02-03T00:00:00.000000Z", relationship_id=bob.id, direction="buyer_to_seller",
        client_address="127.0.0.1", mail_from="bob@mail.example", rcpt_to=("s@m",), verdict="delivered",
        reply="250", changes=(), raw=b"Subject: 3\r\n\r\n3\r\n", delivered=b"o3", sender_id=bob.buyer.id,
        relay_message_id="<r3@m>"))
    everything = await store.archive_list()
    assert [row["id"] for row in everything] == [bob_row, refused, bea_first]
    assert everything[0] | {"reply": None} == {
        "id": bob_row, "received_at": "2026-02-03T00:00:00.000000Z", "relationship": bob.id,
        "direction": "buyer_to_seller", "verdict": "delivered", "reply": None, "bytes": 17, "delivered_bytes": 2,
        "purged_at": None, "seller": "sam@shop.example", "buyer": "bob@mail.example"}
    ids = lambda rows: [row["id"] for row in rows]  # noqa: E731
    assert ids(await store.archive_list(relationship_id=store.relationship.id)) == [refused, bea_first]
    assert ids(await store.archive_list(seller="SAM@shop.example")) == [bob_row, refused, bea_first]
    assert ids(await store.archive_list(buyer="bob@mail.example")) == [bob_row]
    assert ids(await store.archive_list(since="2026-02-02T00:00:00.000000Z")) == [bob_row, refused]
    assert ids(await store.archive_list(until="2026-02-02T00:00:00.000000Z")) == [bea_first]
    assert ids(await store.archive_list(verdict="rejected", seller="sam@shop.example")) == [refused]
    assert ids(await store.archive_list(limit=1, offset=1)) == [refused]
    assert ids([row async for row in store.conversation(store.relationship.id)]) == [bea_first, refused]
    row = await store.archive_row(refused)
    assert await store.archive_id_by_row_hash(row["row_sha256"]) == refused
    assert await store.archive_id_by_row_hash("f" * 64) is None


async def test_response_facts_work_out_unknown_auto_reply_flags_once(store):
    asking = await store.record(entry(store, b"Subject: q\r\n\r\nq\r\n", b"q", when="2026-02-01T00:00:00.000000Z"))
    auto = await store.record(entry(store, b"Auto-Submitted: auto-replied\r\n\r\naway\r\n", b"a",
                                    when="2026-02-01T01:00:00.000000Z", relay_id="<r2@m>"))
    # As rows written before migration 3 are: the flag not known yet.
    await store._fetchone("UPDATE archive SET auto_reply = NULL RETURNING id")
    facts, names = await store.response_facts(since="2026-01-01T00:00:00.000000Z", seller="sam@shop.example")
    assert [(fact.archive_id, fact.auto_reply) for fact in facts] == [(asking, False), (auto, True)]
    assert names == {"sam@shop.example": "Sam"}
    assert [(await store.archive_row(i))["auto_reply"] for i in (asking, auto)] == [0, 1]
    assert (await store.response_facts(until="2026-02-01T00:30:00.000000Z"))[0][0].archive_id == asking


async def test_holds_are_listed_and_purge_takes_bounces_along(store):
    old = await store.record(entry(store, b"Subject: old\r\n\r\nold\r\n", b"old out", when="2020-01-01T00:00:00.000000Z"))
    await store.record_bounce("2020-01-02T00:00:00.000000Z", "<r1@m>", old, store.relationship.id, "failed", "5.1.1",
                              True, b"report")
    assert await store.hold(store.relationship.id, "case 7", at="2026-03-01T00:00:00.000000Z")
    assert await store.holds() == [{"relationship": store.relationship.id, "held_at": "2026-03-01T00:00:00.000000Z",
                                    "reason": "case 7", "seller": "sam@shop.example", "buyer": "bea@mail.example"}]
    await store.release(store.relationship.id)
    assert await store.holds() == []
    dry = await store.purge("2025-01-01T00:00:00.000000Z", dry_run=True)
    assert (dry.rows, dry.bounces, dry.message_ids) == (1, 1, 1)
    done = await store.purge("2025-01-01T00:00:00.000000Z")
    assert (done.rows, done.bounces, done.message_ids) == (1, 1, 1)
    assert await store.bounces_for(old) == []
    # Purged once: a second run finds nothing to do.
    assert (await store.purge("2025-01-01T00:00:00.000000Z")).rows == 0
