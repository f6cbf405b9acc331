"""The archive in a real SQLite file: compressed bodies that read back as
the exact bytes, the per-row encoding, holds and purge at the store level."""

from __future__ import annotations

import base64
import random
import sqlite3

import pytest

from relay.store import ArchiveEntry, BodyDecodeError, NotFound, decode_bodies, encode_bodies, open_store


@pytest.fixture
async def store(tmp_path):
    store = await open_store(str(tmp_path / "relay.sqlite3"))
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
    db = sqlite3.connect(store.path)
    inline, stored_raw, stored_delivered = db.execute(
        "SELECT length(a.raw), length(b.raw), length(b.delivered) FROM archive a"
        " JOIN archive_bodies b ON b.archive_id = a.id WHERE a.id = ?", (archive_id,)).fetchone()
    db.close()
    assert inline == 0
    # Base64 of random bytes packs to about 3/4; the delivered copy is a
    # delta against raw: a few hundred bytes for a 2 MB message.
    assert stored_raw < 0.8 * len(raw)
    assert stored_delivered < 2000


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
    import relay.store.sqlite as sqlite_module

    ids = [await store.record(entry(store, b"Subject: %d\r\n\r\nbody\r\n" % n, b"out", relay_id=f"<r{n}@m>",
                                    when=f"2020-01-0{n + 1}T00:00:00.000000Z")) for n in range(3)]
    monkeypatch.setattr(sqlite_module, "BATCH_BYTES", 1)  # every batch holds one row
    assert [row["id"] async for row in store.archive_chain()] == ids
    assert [row["id"] async for row in store.conversation(store.relationship.id)] == ids
    assert [row["content_problem"] async for row in store.archive_chain()] == [None, None, None]
    assert (await store.purge("2025-01-01T00:00:00.000000Z")).rows == 3
