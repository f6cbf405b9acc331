"""Fault: the upstream hangs up. Worst of all, right after the final "."
and before its reply: the relay cannot know whether the upstream kept the
message, so the client must get a 4xx and retry (a possible duplicate),
never a 250. Hanging up at any earlier stage is a plain 451."""

from __future__ import annotations

import smtplib
import socket
import time

import pytest

from faultkit import Attempt, Ledger, archive_of, fault_message, send


def transaction(relay, pair, tag, ledger):
    raw = fault_message(pair.buyer, pair.seller_alias, tag)
    return ledger.note(tag, send(relay.port, pair.buyer, pair.seller_alias, raw))


def test_hangup_after_the_final_dot_is_451_and_the_retry_is_delivered(start_relay, scripted):
    relay = start_relay(scripted.url())
    pair = relay.pair()
    ledger = Ledger()
    scripted.eom = "close"
    first = transaction(relay, pair, "d1", ledger)
    assert (first.code, first.text[:5]) == (451, "4.4.1"), first
    assert scripted.seen_tags() == {"d1": 1}  # the whole message reached it, unacknowledged
    assert scripted.accepted() == {}
    assert archive_of(relay) == {"d1": ["deferred"]}

    scripted.heal()
    assert transaction(relay, pair, "d1", ledger).code == 250
    assert scripted.seen_tags() == {"d1": 2}
    assert ledger.check(scripted.accepted(), archive_of(relay)) == {"sent": 1, "duplicates": 0, "archived_without_250": 0}


def test_garbage_instead_of_the_final_reply_is_451(start_relay, scripted):
    relay = start_relay(scripted.url())
    pair = relay.pair()
    ledger = Ledger()
    scripted.eom = "garbage"
    attempt = transaction(relay, pair, "g1", ledger)
    assert attempt.code == 451, attempt
    assert scripted.accepted() == {}
    ledger.check(scripted.accepted(), archive_of(relay))


@pytest.mark.parametrize("stage", ["greeting", "rcpt", "data"])
def test_hangup_before_the_message_is_451(start_relay, scripted, stage):
    relay = start_relay(scripted.url())
    pair = relay.pair()
    ledger = Ledger()
    setattr(scripted, stage, "close")
    attempt = transaction(relay, pair, "h1", ledger)
    assert (attempt.code, attempt.text[:5]) == (451, "4.4.1"), attempt
    assert scripted.seen_tags() == {}
    assert archive_of(relay) == {"h1": ["deferred"]}
    scripted.heal()
    assert transaction(relay, pair, "h1", ledger).code == 250
    assert ledger.check(scripted.accepted(), archive_of(relay)) == {"sent": 1, "duplicates": 0, "archived_without_250": 0}


def test_client_hanging_up_while_the_upstream_is_slow_still_archives(start_relay, scripted):
    """The other side of the same coin: the *client* hangs up while the
    relay is forwarding. The relay finishes the delivery and archives it
    (the client never saw 250, so it retries: a counted duplicate)."""
    relay = start_relay(scripted.url(), upstream_timeout=10.0)
    pair = relay.pair()
    scripted.eom = "hold"
    raw = fault_message(pair.buyer, pair.seller_alias, "gone")
    client = smtplib.SMTP(relay.host, relay.port, timeout=20)
    try:
        client.ehlo()
        client.mail(pair.buyer)
        assert client.rcpt(pair.seller_alias)[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(raw + b".\r\n")
        scripted.wait_seen(1)
        client.sock.shutdown(socket.SHUT_RDWR)
    finally:
        client.close()
    scripted.heal()
    scripted.wait_accepted(1)
    # The archive row lands after the upstream's 250, hang-up or not.
    deadline = time.monotonic() + 10
    while not archive_of(relay) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert archive_of(relay) == {"gone": ["delivered"]}
    ledger = Ledger()
    ledger.note("gone", Attempt(None, "the client hung up", "sent"))
    retry = ledger.note("gone", send(relay.port, pair.buyer, pair.seller_alias, raw))
    assert retry.code == 250, retry
    assert ledger.check(scripted.accepted(), archive_of(relay)) == \
        {"sent": 1, "duplicates": 1, "archived_without_250": 1}


@pytest.mark.parametrize("action", ["close", "stall", "421 4.3.2 going down"])
def test_upstream_misbehaving_after_its_250_is_still_a_250(start_relay, scripted, action):
    """The upstream said 250 to the final "." and then hangs up on QUIT,
    never answers it, or answers it oddly: the message is delivered, so the
    client must hear 250 (a 451 here would make a needless duplicate)."""
    relay = start_relay(scripted.url(), upstream_timeout=1.0)
    pair = relay.pair()
    ledger = Ledger()
    scripted.quit = action
    attempt = transaction(relay, pair, "q1", ledger)
    assert attempt.code == 250, attempt
    assert ledger.check(scripted.accepted(), archive_of(relay)) == \
        {"sent": 1, "duplicates": 0, "archived_without_250": 0}
