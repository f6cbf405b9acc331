"""Fault: the upstream stalls. It takes the connection and never answers,
or stops answering in the middle, or answers the final "." only after the
relay's `[upstream] timeout`. The client gets a 451 (well before its own
socket timeout, which bounds each test), and once the upstream recovers the
retry is delivered; a late upstream that did take the first copy makes a
counted duplicate, never a loss."""

from __future__ import annotations

import smtplib
import threading

import pytest

from faultkit import Ledger, archive_of, fault_message, send

UPSTREAM_TIMEOUT = 0.5
CLIENT_TIMEOUT = 20.0  # bounds the test; the relay must answer long before


def transaction(relay, pair, tag, ledger):
    raw = fault_message(pair.buyer, pair.seller_alias, tag)
    return ledger.note(tag, send(relay.port, pair.buyer, pair.seller_alias, raw, timeout=CLIENT_TIMEOUT))


def retry(relay, pair, tag, ledger, attempts=3):
    """The client's retry once the upstream is healthy again. With the short
    timeout of these tests a loaded machine may still time out once; the
    client simply tries again, as it would."""
    for _ in range(attempts):
        attempt = transaction(relay, pair, tag, ledger)
        if attempt.code == 250:
            break
    return attempt


@pytest.mark.parametrize("stage", ["greeting", "rcpt", "data", "eom"])
def test_silent_upstream_is_451_then_the_retry_is_delivered_once(start_relay, scripted, stage):
    relay = start_relay(scripted.url(), upstream_timeout=UPSTREAM_TIMEOUT)
    pair = relay.pair()
    ledger = Ledger()
    setattr(scripted, stage, "stall")
    first = transaction(relay, pair, "s1", ledger)
    assert (first.code, first.text[:5]) == (451, "4.4.1"), first
    assert scripted.accepted() == {}
    assert archive_of(relay) == {"s1": ["deferred"]}

    scripted.heal()
    second = retry(relay, pair, "s1", ledger)
    assert second.code == 250, second
    assert ledger.check(scripted.accepted(), archive_of(relay))["sent"] == 1


def test_final_reply_after_the_timeout_is_451_and_the_retry_may_duplicate(start_relay, scripted):
    """The upstream answers the final "." three timeouts late. The relay
    has given up and told the client 451 by then; the retry is delivered.
    Whether the upstream keeps the late copy is up to it (this one answers
    only a client still connected): at most one duplicate, never a loss."""
    relay = start_relay(scripted.url(), upstream_timeout=UPSTREAM_TIMEOUT)
    pair = relay.pair()
    ledger = Ledger()
    scripted.eom = ("delay", 3 * UPSTREAM_TIMEOUT)
    first = transaction(relay, pair, "late", ledger)
    assert (first.code, first.text[:5]) == (451, "4.4.1"), first
    assert scripted.seen_tags() == {"late": 1}  # it got the whole message…
    assert archive_of(relay) == {"late": ["deferred"]}

    scripted.heal()
    assert retry(relay, pair, "late", ledger).code == 250
    summary = ledger.check(scripted.accepted(), archive_of(relay))
    assert summary["sent"] == 1
    assert archive_of(relay)["late"][0] == "deferred" and archive_of(relay)["late"][-1] == "delivered"


def test_stalled_upstream_does_not_hold_up_other_connections(start_relay, scripted):
    """While one delivery hangs on an upstream that has not answered the
    final "." yet, the relay still serves other clients; when the upstream
    finally answers, that client gets its 250."""
    relay = start_relay(scripted.url(), upstream_timeout=CLIENT_TIMEOUT)
    pair = relay.pair()
    ledger = Ledger()
    scripted.eom = "hold"
    outcome = []
    stuck = threading.Thread(target=lambda: outcome.append(transaction(relay, pair, "stuck", ledger)))
    stuck.start()
    try:
        scripted.wait_seen(1)
        with smtplib.SMTP(relay.host, relay.port, timeout=CLIENT_TIMEOUT) as other:
            assert other.ehlo()[0] == 250
            assert other.mail(pair.buyer)[0] == 250
            assert other.rcpt(pair.seller_alias)[0] == 250
            assert other.rset()[0] == 250
        assert outcome == []  # still waiting for the upstream
    finally:
        scripted.heal()
        stuck.join(CLIENT_TIMEOUT + 5)
    assert outcome and outcome[0].code == 250, outcome
    assert ledger.check(scripted.accepted(), archive_of(relay)) == \
        {"sent": 1, "duplicates": 0, "archived_without_250": 0}
