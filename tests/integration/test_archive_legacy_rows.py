"""Rows written before migration 3 (bodies inline, uncompressed) still read,
verify, export, purge and count in the report, beside new compressed rows."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import datetime, timedelta, timezone

from relay.store import GENESIS_HASH, ArchiveEntry, chain_hash, iso, open_store, sha256_hex
from relay.store.sqlite import migrations
from support import message
from archive_support import relay_cli, write_config


def legacy_database(path, rows):
    """A database at migration 2 with archive rows as that code wrote them."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    for version, sql in migrations():
        if version <= 2:
            db.executescript(sql)
            db.execute("INSERT INTO schema_migrations VALUES (?, '2024-01-01T00:00:00.000000Z')", (version,))
    db.execute("INSERT INTO parties (id, role, address, display_name, created_at) VALUES"
               " (1, 'seller', 'sam@shop.example', 'Sam', '2019-01-01T00:00:00.000000Z'),"
               " (2, 'buyer', 'bea@mail.example', 'Bea', '2019-01-01T00:00:00.000000Z')")
    db.execute("INSERT INTO relationships VALUES (1, 1, 2, 'aaaaaaaaaaaaaaaa@marketplace.example',"
               " 'bbbbbbbbbbbbbbbb@marketplace.example', '2019-01-01T00:00:00.000000Z')")
    prev = GENESIS_HASH
    for entry in rows:
        raw_sha, delivered_sha = sha256_hex(entry.raw), sha256_hex(entry.delivered)
        row_sha = chain_hash(entry.metadata(), raw_sha, delivered_sha, prev)
        db.execute(
            "INSERT INTO archive (received_at, relationship_id, direction, client_address, mail_from, rcpt_to,"
            " verdict, reply, changes, raw, delivered, raw_sha256, delivered_sha256, prev_sha256, row_sha256)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (entry.received_at, entry.relationship_id, entry.direction, entry.client_address, entry.mail_from,
             json.dumps(list(entry.rcpt_to)), entry.verdict, entry.reply, json.dumps(list(entry.changes)),
             entry.raw, entry.delivered, raw_sha, delivered_sha, prev, row_sha))
        prev = row_sha
    db.commit()
    db.close()


def entry(when: datetime, direction: str, raw: bytes) -> ArchiveEntry:
    return ArchiveEntry(received_at=iso(when), relationship_id=1, direction=direction, client_address="127.0.0.1",
                        mail_from="bea@mail.example", rcpt_to=("aaaaaaaaaaaaaaaa@marketplace.example",),
                        verdict="delivered", reply="250 2.0.0 OK", changes=("rewrote From",), raw=raw,
                        delivered=raw.replace(b"bea@mail.example", b"bbbbbbbbbbbbbbbb@marketplace.example"))


def test_legacy_rows_beside_new_ones(tmp_path):
    now = datetime.now(timezone.utc)
    asked = now - timedelta(days=3)
    old = [
        entry(now - timedelta(days=2000), "buyer_to_seller", message("bea@mail.example", "a@x", body="Old.\n")),
        entry(asked - timedelta(hours=1), "buyer_to_seller",
              message("bea@mail.example", "a@x", body="I am away.\n", headers={"Auto-Submitted": "auto-replied"})),
        entry(asked, "buyer_to_seller", message("bea@mail.example", "a@x", body="Where is my parcel?\n")),
    ]
    database = tmp_path / "relay.sqlite3"
    legacy_database(database, old)
    config = write_config(tmp_path, database)

    verified = relay_cli(config, "archive", "verify")  # upgrades the database first
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.decode().startswith("archive chain verified: 3 row(s), head ")
    assert relay_cli(config, "archive", "show", "3", "--raw").stdout == old[2].raw
    assert relay_cli(config, "archive", "show", "3", "--delivered").stdout == old[2].delivered

    async def answer():
        store = await open_store(str(database))
        try:
            answer_id = await store.record(ArchiveEntry(
                received_at=iso(asked + timedelta(hours=5)), relationship_id=1, direction="seller_to_buyer",
                client_address="127.0.0.1", mail_from="sam@shop.example", rcpt_to=("b@x",), verdict="delivered",
                reply="250", changes=(), raw=b"Subject: on its way\r\n\r\nSent.\r\n", delivered=b"x"))
            return await store.archive_row(3), await store.archive_row(answer_id)
        finally:
            await store.close()

    legacy_row, new_row = asyncio.run(answer())
    assert (legacy_row["body_encoding"], legacy_row["raw"]) == ("identity", old[2].raw)
    assert (new_row["body_encoding"], new_row["raw"], new_row["prev_sha256"]) == (
        "zstd", b"Subject: on its way\r\n\r\nSent.\r\n", legacy_row["row_sha256"])
    assert relay_cli(config, "archive", "verify").stdout.decode().startswith("archive chain verified: 4 row(s)")

    # The auto-reply is read from the legacy row's raw headers: it asks for no answer.
    since = (asked - timedelta(hours=2)).isoformat()
    report = json.loads(relay_cli(config, "report", "response-time", "--since", since, "--json").stdout)
    [seller] = report["sellers"]
    assert (seller["buyer_messages"], seller["answered_within_24h"], seller["due"]) == (1, 1, 1)
    assert seller["median_seconds"] == 5 * 3600.0
    db = sqlite3.connect(database)
    assert db.execute("SELECT auto_reply FROM archive WHERE id = 2").fetchone() == (1,)
    db.close()

    purged = relay_cli(config, "purge", "--json")
    assert json.loads(purged.stdout)["rows"] == 1
    assert relay_cli(config, "archive", "verify").stdout.decode().startswith(
        "archive chain verified: 4 row(s) (1 purged)")
