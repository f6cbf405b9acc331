"""Loops end at the relay; auto-replies pass through aliases like any mail
and are never answered by the relay."""

from __future__ import annotations

import email
import smtplib

from support import message


def data_reply(relay, sender, alias, raw):
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        client.mail(sender)
        assert client.rcpt(alias)[0] == 250
        return client.data(raw)


def test_a_message_that_passed_the_relay_too_often_is_a_loop(relay, upstream):
    pair = relay.pair()
    # What the relay writes on each pass; four of them (limit 3) is a loop.
    trace = "by marketplace.example (relay) with ESMTP id 0123456789ab; Thu, 26 Nov 2026 10:00:00 +0000"
    raw = message(pair.buyer, pair.seller_alias).replace(
        b"From:", b"".join(f"Received: {trace}\r\n".encode() for _ in range(4)) + b"From:", 1)
    code, text = data_reply(relay, pair.buyer, pair.seller_alias, raw)
    assert (code, text[:5]) == (554, b"5.4.6")
    assert upstream.messages == []


def test_too_many_received_headers_is_a_loop(relay, upstream):
    pair = relay.pair()
    hops = b"".join(b"Received: from h%d.example by h%d.example; Thu, 26 Nov 2026 10:00:00 +0000\r\n" % (n, n + 1)
                    for n in range(51))
    raw = hops + message(pair.buyer, pair.seller_alias)
    code, text = data_reply(relay, pair.buyer, pair.seller_alias, raw)
    assert (code, text[:5]) == (554, b"5.4.6")


def test_one_pass_is_no_loop(relay, upstream):
    """A delivered message carries one trace line of the relay; sent through
    again (a seller forwarding it to the buyer, say) it is still fine."""
    pair = relay.pair()
    assert data_reply(relay, pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))[0] == 250
    delivered = upstream.wait_for(1)[0].data
    again = delivered.replace(b"From: Bea Buyer <%s>" % pair.buyer_alias.encode(), b"From: " + pair.seller.encode())
    again = again.replace(b"To: Sam Seller <%s>" % pair.seller.encode(), b"To: " + pair.buyer_alias.encode())
    assert data_reply(relay, pair.seller, pair.buyer_alias, again)[0] == 250


def test_auto_replies_are_forwarded_and_never_answered(relay, upstream):
    pair = relay.pair()
    raw = message(pair.seller, pair.buyer_alias, subject="Out of office",
                  headers={"Auto-Submitted": "auto-replied", "Precedence": "bulk"},
                  body=f"I am away. Write to {pair.seller}.\n")
    assert data_reply(relay, pair.seller, pair.buyer_alias, raw)[0] == 250
    [got] = upstream.wait_for(1)
    out = email.message_from_bytes(got.data)
    assert out["Auto-Submitted"] == "auto-replied"  # kept, so the buyer's client will not answer it
    assert out["Precedence"] is None  # not on the allowlist
    assert pair.seller.encode() not in got.data
    assert len(upstream.messages) == 1  # and the relay sent nothing of its own
