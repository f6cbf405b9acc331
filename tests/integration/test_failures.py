"""Failures inside the relay: a locked database, a bug in a stage (the
client gets a 451 with an enhanced code, never a 500 or internals), and a
value the database refuses (a 554, since it would be refused again); the
server keeps serving."""

from __future__ import annotations

import hashlib
import smtplib
import sqlite3

import pytest

import support

from relay import pipeline
from support import message


def data_reply(relay, pair):
    with smtplib.SMTP(relay.host, relay.port, timeout=30) as client:
        client.ehlo()
        client.mail(pair.buyer)
        assert client.rcpt(pair.seller_alias)[0] == 250
        reply = client.data(message(pair.buyer, pair.seller_alias))
        assert client.noop()[0] == 250
        return reply


def test_locked_archive_after_delivery_asks_for_a_retry(relay, upstream):
    pair = relay.pair()
    relay.call(relay.store._db.execute("PRAGMA busy_timeout = 100"))
    blocker = sqlite3.connect(relay.config.database, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        code, text = data_reply(relay, pair)
    finally:
        blocker.rollback()
        blocker.close()
    assert (code, text[:5]) == (451, b"4.3.0")
    assert b"archive" in text
    # The upstream has it; the client will retry: a duplicate, never a loss.
    assert len(upstream.wait_for(1)) == 1
    assert relay.archive_rows() == []
    assert data_reply(relay, pair)[0] == 250
    assert [row["verdict"] for row in relay.archive_rows()] == ["delivered"]


def test_broken_database_at_rcpt_is_451(relay, upstream):
    pair = relay.pair()
    # Another process damages the schema (an operator's mistake, a bad
    # restore): lookups now fail, and the client must be told to retry.
    damage = sqlite3.connect(relay.config.database)
    damage.execute("PRAGMA foreign_keys = OFF")
    damage.execute("ALTER TABLE relationships RENAME TO relationships_moved")
    damage.commit()
    damage.close()
    with smtplib.SMTP(relay.host, relay.port, timeout=30) as client:
        client.ehlo()
        client.mail(pair.buyer)
        code, text = client.rcpt(pair.seller_alias)
        assert (code, text) == (451, b"4.3.0 Temporary lookup failure, try again later")
        assert client.noop()[0] == 250


def test_a_bug_in_a_stage_is_451_without_internals(relay, upstream, monkeypatch):
    # The stages run in worker processes, which import what they are sent
    # by name: a module-level function of tests/support.py stands in for
    # the pipeline's second step there.
    monkeypatch.setattr(pipeline, "FINISH", "support:broken_finish")
    pair = relay.pair()
    code, text = data_reply(relay, pair)
    assert (code, text) == (451, b"4.3.0 Internal error, try again later")
    assert upstream.messages == []
    [row] = relay.archive_rows()
    assert row["verdict"] == "deferred"


def test_a_value_the_database_refuses_is_a_5xx_once_not_451_for_days(relay, upstream):
    """A StoreDataError (the same bytes fail the same way on every retry)
    is answered 554 5.6.0 with a reason; a 451 would make the sender retry
    for days against a healthy database (and, after delivery, deliver a
    copy on every retry). The store spells every 8-bit id storably, so real
    ones are made here by lowering SQLite's length limit: under an 8-bit
    References id (at the lookup), and under a body that does not compress
    (at the archive, after the upstream took the message)."""
    if support.database_factory is not None:
        pytest.skip("sets a limit of the SQLite connection")
    pair = relay.pair()
    long_id = b"<" + b"\xe9" * 200 + b"@client.example>"  # its stored spelling: about 820 characters
    with_long_id = message(pair.buyer, pair.seller_alias, headers={"References": "<REF>"}).replace(b"<REF>", long_id)
    noise = "".join(hashlib.sha256(b"%d" % n).hexdigest() for n in range(40))  # 2,560 characters, little redundancy
    big = message(pair.buyer, pair.seller_alias, subject="Big", body=noise + "\n", message_id="<big@client.example>")
    connection = relay.store._db
    default = relay.call(connection._execute(connection._conn.getlimit, sqlite3.SQLITE_LIMIT_LENGTH))
    relay.call(connection._execute(connection._conn.setlimit, sqlite3.SQLITE_LIMIT_LENGTH, 600))
    refused_for_good = (554, b"5.6.0 Message holds data the relay cannot store")
    with smtplib.SMTP(relay.host, relay.port, timeout=30) as client:
        for raw in (with_long_id, big):
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail(pair.buyer, [pair.seller_alias], raw)
            assert (refused.value.smtp_code, refused.value.smtp_error) == refused_for_good
        # The session and the store go on; without the limit both pass.
        relay.call(connection._execute(connection._conn.setlimit, sqlite3.SQLITE_LIMIT_LENGTH, default))
        for raw in (with_long_id, big):
            assert client.sendmail(pair.buyer, [pair.seller_alias], raw) == {}
    # The big message reached the upstream twice: when its archive failed
    # (once, not on every retry of a 451) and when it was sent again.
    assert [b"Subject: Big" in got.data for got in upstream.wait_for(3)] == [True, False, True]
    rows = relay.archive_rows()
    assert [row["verdict"] for row in rows] == ["rejected", "delivered", "delivered"]
    assert any("the store cannot hold a value of this message" in change for change in rows[0]["changes"])
