"""Fault: another process holds the SQLite database (an operator's sqlite3
shell, a backup job) with `BEGIN EXCLUSIVE`, longer than the relay's busy
timeout.

The database is in WAL mode, so the relay's reads (RCPT's alias lookup)
still go through and the write that waits is the archive row, after the
upstream took the message: the client must then get `451 4.3.0` (it
retries: a counted duplicate) and never a 250 for an unarchived message.
Once the lock is gone the retry is delivered and archived.

The relay's busy timeout is 5 s (relay/store/sqlite.py); these tests lower
it on the relay's own connection so the lock outlasts it quickly, and hold
the lock until the client has its answer, however long that takes."""

from __future__ import annotations

import threading

from faultkit import DatabaseLocker, Ledger, archive_of, fault_message, send


def transaction(relay, pair, tag, ledger, to_buyer=False):
    sender, alias = (pair.seller, pair.buyer_alias) if to_buyer else (pair.buyer, pair.seller_alias)
    raw = fault_message(sender, alias, tag)
    return ledger.note(tag, send(relay.port, sender, alias, raw))


def busy_timeout(relay, milliseconds: int) -> None:
    relay.call(relay.store._db.execute(f"PRAGMA busy_timeout = {milliseconds}"))


def test_locked_database_is_451_then_the_retry_is_archived(start_relay, scripted):
    relay = start_relay(scripted.url())
    pair = relay.pair()
    busy_timeout(relay, 200)
    ledger = Ledger()
    with DatabaseLocker(relay.config.database):
        first = transaction(relay, pair, "l1", ledger)
        # RCPT passed (a read); the archive write could not get the lock.
        assert (first.code, first.text[:5]) == (451, "4.3.0"), first
        assert first.stage == "sent"
    # Delivered but not archived: the client was told to retry.
    assert archive_of(relay) == {}
    assert scripted.accepted() in ({}, {"l1": 1})

    second = transaction(relay, pair, "l1", ledger)
    assert second.code == 250, second
    assert archive_of(relay) == {"l1": ["delivered"]}
    summary = ledger.check(scripted.accepted(), archive_of(relay))
    assert summary == {"sent": 1, "duplicates": scripted.accepted()["l1"] - 1, "archived_without_250": 0}


def test_locked_database_seller_message_is_451_too(start_relay, scripted):
    """Seller → buyer also counts against the daily cap (a row in the same
    transaction as the archive); the lock defers it the same way."""
    relay = start_relay(scripted.url())
    pair = relay.pair()
    busy_timeout(relay, 200)
    ledger = Ledger()
    with DatabaseLocker(relay.config.database):
        first = transaction(relay, pair, "s1", ledger, to_buyer=True)
        assert (first.code, first.text[:5]) == (451, "4.3.0"), first
    assert transaction(relay, pair, "s1", ledger, to_buyer=True).code == 250
    assert archive_of(relay) == {"s1": ["delivered"]}
    ledger.check(scripted.accepted(), archive_of(relay))


def test_concurrent_clients_under_a_lock_all_get_451_and_none_is_lost(start_relay, scripted):
    relay = start_relay(scripted.url())
    pair = relay.pair()
    busy_timeout(relay, 200)
    ledger = Ledger()
    tags = [f"c{i}" for i in range(4)]
    with DatabaseLocker(relay.config.database):
        threads = [threading.Thread(target=transaction, args=(relay, pair, tag, ledger)) for tag in tags]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert all(not thread.is_alive() for thread in threads)
        assert [ledger.attempts[tag][0].code for tag in tags] == [451] * 4, ledger.attempts
    for tag in tags:
        assert transaction(relay, pair, tag, ledger).code == 250
    assert archive_of(relay) == {tag: ["delivered"] for tag in tags}
    summary = ledger.check(scripted.accepted(), archive_of(relay))
    assert summary["sent"] == 4


def test_lock_released_within_the_busy_timeout_is_invisible(start_relay, scripted):
    """A lock that goes away while the archive write waits for it: the
    client gets its 250 and the message exists once, archived once."""
    relay = start_relay(scripted.url())
    pair = relay.pair()
    busy_timeout(relay, 60_000)  # the wait below is ended by the release, not by the clock
    ledger = Ledger()
    locker = DatabaseLocker(relay.config.database).lock()
    try:
        sender = threading.Thread(target=transaction, args=(relay, pair, "w1", ledger))
        sender.start()
        scripted.wait_accepted(1)  # forwarded; now the archive write waits for the lock
        assert "w1" not in ledger.attempts
    finally:
        locker.release()
    sender.join(60)
    assert ledger.attempts["w1"][0].code == 250, ledger.attempts
    assert ledger.check(scripted.accepted(), archive_of(relay)) == \
        {"sent": 1, "duplicates": 0, "archived_without_250": 0}
