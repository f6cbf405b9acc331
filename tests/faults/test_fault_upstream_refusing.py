"""Fault: the upstream refuses, at every stage of the conversation, or is
not there at all. The client sees a 4xx (and its retry, once the upstream
is back, is delivered exactly once and archived once) or a 5xx (and nothing
is delivered); never a 250 for a message the upstream did not take."""

from __future__ import annotations

import pytest

from faultkit import Ledger, ScriptedUpstream, archive_of, fault_message, send
from support import closed_port


def transaction(relay, pair, tag, ledger):
    raw = fault_message(pair.buyer, pair.seller_alias, tag)
    return ledger.note(tag, send(relay.port, pair.buyer, pair.seller_alias, raw))


TRANSIENT = [
    ("greeting", "421 4.3.2 shutting down"),
    ("mail", "451 4.3.0 sender check deferred"),
    ("rcpt", "450 4.2.1 mailbox busy"),
    ("data", "451 4.3.0 not now"),
    ("eom", "451 4.3.0 queue file write error"),
    ("eom", "421 4.4.2 closing connection"),
]


@pytest.mark.parametrize("stage, line", TRANSIENT, ids=[f"{s}-{line[:3]}" for s, line in TRANSIENT])
def test_transient_refusal_is_451_then_the_retry_is_delivered_once(start_relay, scripted, stage, line):
    relay = start_relay(scripted.url(), upstream_timeout=5.0)
    pair = relay.pair()
    ledger = Ledger()
    setattr(scripted, stage, line)
    first = transaction(relay, pair, "t1", ledger)
    assert (first.code, first.text[:5]) == (451, "4.3.0"), first  # the upstream said 4xx: deferred
    assert "shop.example" not in first.text  # the upstream's words stay in the log and the archive
    assert scripted.accepted() == {}
    assert archive_of(relay) == {"t1": ["deferred"]}

    scripted.heal()
    second = transaction(relay, pair, "t1", ledger)
    assert second.code == 250, second
    assert scripted.accepted() == {"t1": 1}
    assert archive_of(relay) == {"t1": ["deferred", "delivered"]}
    assert ledger.check(scripted.accepted(), archive_of(relay)) == {"sent": 1, "duplicates": 0, "archived_without_250": 0}


PERMANENT = [
    ("greeting", "554 5.3.2 no service here", 554, "5.0.0"),
    ("mail", "553 5.1.8 sender domain unknown", 550, "5.1.1"),
    ("rcpt", "550 5.1.1 <seller@shop.example>: no such user", 550, "5.1.1"),
    ("data", "554 5.5.1 no valid recipients", 554, "5.0.0"),
    ("eom", "552 5.3.4 message too big for seller@shop.example", 552, "5.3.4"),  # "too large", not 5.0.0
    ("eom", "552 5.2.2 mailbox full: seller@shop.example", 554, "5.0.0"),
]


@pytest.mark.parametrize("stage, line, code, enhanced", PERMANENT,
                         ids=[f"{s}-{line[:9].replace(' ', '-')}" for s, line, _, _ in PERMANENT])
def test_permanent_refusal_is_5xx_and_nothing_is_delivered(start_relay, scripted, stage, line, code, enhanced):
    relay = start_relay(scripted.url())
    pair = relay.pair()
    ledger = Ledger()
    setattr(scripted, stage, line)
    attempt = transaction(relay, pair, "p1", ledger)
    assert (attempt.code, attempt.text[:5]) == (code, enhanced), attempt
    assert "shop.example" not in attempt.text
    assert scripted.accepted() == {}
    assert archive_of(relay) == {"p1": ["failed"]}
    ledger.check(scripted.accepted(), archive_of(relay))


def test_upstream_port_closed_then_back(start_relay):
    """Connection refused: 451 4.4.1; the upstream comes up on that port and the retry goes through."""
    port = closed_port()
    relay = start_relay(f"smtp://127.0.0.1:{port}")
    pair = relay.pair()
    ledger = Ledger()
    first = transaction(relay, pair, "c1", ledger)
    assert (first.code, first.text[:5]) == (451, "4.4.1"), first
    assert archive_of(relay) == {"c1": ["deferred"]}

    upstream = ScriptedUpstream(port=port).start()
    try:
        second = transaction(relay, pair, "c1", ledger)
        assert second.code == 250, second
        assert upstream.accepted() == {"c1": 1}
        assert ledger.check(upstream.accepted(), archive_of(relay))["duplicates"] == 0
    finally:
        upstream.stop()


def test_refusing_for_a_while_loses_nothing(start_relay, scripted):
    """A burst of messages through an upstream that refuses every other
    delivery: each message ends delivered once, after some 451s."""
    relay = start_relay(scripted.url())
    pair = relay.pair()
    ledger = Ledger()
    tags = [f"b{i}" for i in range(6)]
    pending = list(tags)
    for round_ in range(6):  # bounded retries, as a client queue has
        scripted.eom = "451 4.3.0 busy" if round_ % 2 == 0 else None
        for tag in list(pending):
            if transaction(relay, pair, tag, ledger).code == 250:
                pending.remove(tag)
        if not pending:
            break
    assert pending == []
    assert ledger.check(scripted.accepted(), archive_of(relay)) == {"sent": 6, "duplicates": 0, "archived_without_250": 0}
    assert scripted.accepted() == {tag: 1 for tag in tags}


CONFUSED = ["354 go ahead", "999 what", "hello", "1" * 2000]


@pytest.mark.parametrize("line", CONFUSED, ids=["354", "999", "no-code", "long"])
def test_nonsense_reply_to_the_final_dot_is_451(start_relay, scripted, line):
    """An upstream answering the final "." with something that is not a
    reply (or not one that means "accepted"): keep the message, 451."""
    relay = start_relay(scripted.url(), upstream_timeout=1.0)
    pair = relay.pair()
    ledger = Ledger()
    scripted.eom = line
    attempt = transaction(relay, pair, "n1", ledger)
    assert attempt.code == 451, attempt
    assert archive_of(relay) == {"n1": ["deferred"]}
    scripted.heal()
    for _ in range(3):  # a loaded machine may hit the short timeout once more: the client retries
        if transaction(relay, pair, "n1", ledger).code == 250:
            break
    assert ledger.check(scripted.accepted(), archive_of(relay))["sent"] == 1
