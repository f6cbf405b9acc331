"""`relay purge` and holds: messages sent through a running relay whose
clock says they are older than retention, purged by the real command; the
chain still verifies across the tombstones."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from support import RecordingUpstream, RunningRelay, make_config, message, upstream_url
from archive_support import clock_at, relay_cli, send, write_config


@pytest.fixture
def old_and_new(tmp_path):
    """Relationship 1 (Bea) and 2 (Bob): two old messages of Bea's, one old
    of Bob's (800 days ago, past the default 730), and one recent of Bea's."""
    upstream = RecordingUpstream().start()
    now = datetime.now(timezone.utc)
    clock = clock_at(now - timedelta(days=800))
    relay = RunningRelay(make_config(tmp_path, upstream_url(upstream)), clock=clock)
    try:
        bea = relay.pair()
        bob = relay.pair(buyer="bob@mail.example", buyer_name="Bob", order="ORDER-2")
        for number, (pair, when) in enumerate([(bea, 800), (bob, 799), (bea, 798), (bea, 1)], start=1):
            clock.now = now - timedelta(days=when)
            raw = message(pair.buyer, pair.seller_alias, body=f"Message {number}\n",
                          message_id=f"<m{number}@mail.example>")
            assert send(relay, pair.buyer, pair.seller_alias, raw)[0] == 250
        upstream.wait_for(4)
    finally:
        relay.stop()
        upstream.stop()
    database = tmp_path / "relay.sqlite3"
    return write_config(tmp_path, database), database, bea, bob


def counts(database):
    db = sqlite3.connect(database)
    try:
        return {
            "live": db.execute("SELECT COUNT(*) FROM archive WHERE purged_at IS NULL").fetchone()[0],
            "bodies": db.execute("SELECT COUNT(*) FROM archive_bodies").fetchone()[0],
            "message_ids": db.execute("SELECT COUNT(*) FROM message_ids").fetchone()[0],
        }
    finally:
        db.close()


def run(config, *args):
    result = relay_cli(config, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def test_purge_skips_held_relationships_and_keeps_the_chain(old_and_new):
    config, database, bea, bob = old_and_new
    assert run(config, "archive", "hold", bea.buyer_alias, "--reason", "case 7") == \
        "relationship 1 is on hold: purge keeps its archive\n"
    assert json.loads(run(config, "archive", "holds", "--json"))[0]["reason"] == "case 7"

    before = counts(database)
    dry = json.loads(run(config, "purge", "--dry-run", "--json"))
    assert (dry["rows"], dry["held"], dry["message_ids"], dry["dry_run"]) == (1, 2, 1, True)
    assert counts(database) == before == {"live": 4, "bodies": 4, "message_ids": 4}

    done = run(config, "purge")
    assert done.startswith("purged 1 archive row(s) received before ")
    assert "1 Message-ID map entries); 2 row(s) kept on hold" in done
    assert counts(database) == {"live": 3, "bodies": 3, "message_ids": 3}

    shown = json.loads(run(config, "archive", "show", "2", "--json"))
    assert shown["purged_at"] and shown["relationship"] == bob.relationship_id
    assert (shown["mail_from"], shown["rcpt_to"], shown["reply"], shown["changes"]) == ("", [], "", [])
    assert shown["raw_sha256"] and shown["row_sha256"]  # the hashes stay
    gone = relay_cli(config, "archive", "show", "2", "--raw")
    assert gone.returncode == 1 and "was purged at" in gone.stderr and gone.stdout == b""

    assert run(config, "archive", "verify").startswith("archive chain verified: 4 row(s) (1 purged), head ")

    assert run(config, "archive", "release", "1") == \
        "relationship 1 released: its archive is purged past retention again\n"
    assert json.loads(run(config, "purge", "--json"))["rows"] == 2
    assert counts(database) == {"live": 1, "bodies": 1, "message_ids": 1}
    assert json.loads(run(config, "purge", "--json"))["rows"] == 0
    assert run(config, "archive", "verify").startswith("archive chain verified: 4 row(s) (3 purged), head ")
    listed = json.loads(run(config, "archive", "list", "--json"))
    assert [(row["archive_id"], bool(row["purged_at"])) for row in listed] == [(4, False), (3, True), (2, True), (1, True)]


def test_verify_tells_an_emptied_row_from_a_purged_one(old_and_new, tmp_path):
    config, database, _, _ = old_and_new
    db = sqlite3.connect(database)
    with db:  # "purge" the recent row by hand
        db.execute("UPDATE archive SET purged_at = '2026-01-01T00:00:00.000000Z' WHERE id = 4")
    db.close()
    result = relay_cli(config, "archive", "verify")
    assert result.returncode == 1
    assert result.stderr == ("relay: archive chain broken at row 4: "
                             "it is emptied but no purge run recorded it: edited bytes\n")


def test_purge_keeps_a_row_that_fails_its_hashes(old_and_new):
    config, database, _, _ = old_and_new
    db = sqlite3.connect(database)
    with db:
        db.execute("UPDATE archive SET verdict = 'rejected' WHERE id = 1")
    db.close()
    result = relay_cli(config, "purge")
    assert result.returncode == 1
    assert "purged 2 archive row(s)" in result.stdout.decode()
    assert result.stderr == ("relay: 1 archive row(s) past retention fail their hashes and were kept;"
                             " run `relay archive verify`\n")
    assert counts(database)["live"] == 2  # row 1 (edited) and row 4 (recent)


def test_serve_purges_past_retention_at_start(tmp_path, upstream):
    """`relay serve` runs the retention purge itself (at start, then daily)."""
    import smtplib
    import time
    from datetime import timedelta

    from support import Clock, RunningRelay, make_config, message, upstream_url

    clock = Clock()
    clock.now -= timedelta(days=800)  # write a message "800 days ago"
    config = make_config(tmp_path, upstream_url(upstream))
    old = RunningRelay(config, clock=clock)
    pair = old.pair()
    with smtplib.SMTP(old.host, old.port) as client:
        client.sendmail(pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias))
    old.stop()
    restarted = RunningRelay(config)  # today: the row is past 730 days
    try:
        # The purge runs on the server's loop right after start: wait for it, bounded.
        deadline = time.monotonic() + 10
        while restarted.archive_rows()[0].get("purged_at") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        row = restarted.archive_rows()[0]
        assert row["purged_at"] is not None and row["raw"] is None
    finally:
        restarted.stop()
