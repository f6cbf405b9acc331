"""Transient failures inside the relay: a locked database, a bug in a
stage. The client always gets a 451 with an enhanced code, never a 500 or
internals, and the server keeps serving."""

from __future__ import annotations

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
    monkeypatch.setattr(pipeline, "finish", support.broken_finish)
    pair = relay.pair()
    code, text = data_reply(relay, pair)
    assert (code, text) == (451, b"4.3.0 Internal error, try again later")
    assert upstream.messages == []
    [row] = relay.archive_rows()
    assert row["verdict"] == "deferred"
