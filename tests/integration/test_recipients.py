"""RCPT decisions: only aliases, only the counterpart, one relationship per
transaction. Replies are asserted exactly as the client sees them."""

from __future__ import annotations

import smtplib

from support import message


def rcpt(relay, sender, *recipients):
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        assert client.mail(sender)[0] == 250
        return [client.rcpt(r) for r in recipients]


def test_address_outside_our_domain_is_refused(relay):
    pair = relay.pair()
    [(code, text)] = rcpt(relay, pair.buyer, pair.seller)
    assert (code, text[:5]) == (550, b"5.1.1")
    assert b"not an alias" in text


def test_unknown_alias_is_refused(relay):
    pair = relay.pair()
    for unknown in ("aaaaaaaaaaaaaaaa@marketplace.example", "postmaster@marketplace.example",
                    "' OR 1=1 --@marketplace.example"):
        [(code, text)] = rcpt(relay, pair.buyer, unknown)
        assert (code, text[:5]) == (550, b"5.1.1"), unknown


def test_stranger_cannot_write_to_an_alias(relay, upstream):
    pair = relay.pair()
    [(code, text)] = rcpt(relay, "stranger@elsewhere.example", pair.seller_alias)
    assert (code, text[:5]) == (550, b"5.7.1")
    # No hint of who the counterpart is.
    assert pair.buyer.encode() not in text and b"mail.example" not in text
    # The seller cannot write to its own alias either (it is the buyer's door).
    [(code, _)] = rcpt(relay, pair.seller, pair.seller_alias)
    assert code == 550
    assert upstream.messages == []


def test_null_sender_cannot_write_to_an_alias(relay):
    pair = relay.pair()
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        client.mail("<>")
        code, text = client.rcpt(pair.seller_alias)
    assert (code, text[:5]) == (550, b"5.7.1")


def test_alias_matching_ignores_case(relay, upstream):
    pair = relay.pair()
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.sendmail(pair.buyer.upper(), [pair.seller_alias.upper()],
                        message(pair.buyer.upper(), pair.seller_alias))
    [got] = upstream.wait_for(1)
    assert got.rcpt_tos == [pair.seller]


def test_second_relationship_in_one_transaction_gets_452(relay, upstream):
    first = relay.pair(order="O-1")
    second = relay.pair(seller="other@shop2.example", order="O-2")
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        client.mail(first.buyer)
        assert client.rcpt(first.seller_alias)[0] == 250
        code, text = client.rcpt(second.seller_alias)
        assert (code, text[:5]) == (452, b"4.5.3")
        # The same alias twice is harmless and delivers once.
        assert client.rcpt(first.seller_alias)[0] == 250
        assert client.data(message(first.buyer, first.seller_alias))[0] == 250
        # The client sends the other one in a new transaction, as told.
        client.mail(first.buyer)
        assert client.rcpt(second.seller_alias)[0] == 250
        assert client.data(message(first.buyer, second.seller_alias))[0] == 250
    got = upstream.wait_for(2)
    assert [m.rcpt_tos for m in got] == [[first.seller], ["other@shop2.example"]]


def test_header_from_must_match_the_envelope(relay, upstream):
    pair = relay.pair()
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        client.mail(pair.buyer)
        client.rcpt(pair.seller_alias)
        code, text = client.data(message("someone@else.example", pair.seller_alias))
    assert (code, text[:5]) == (550, b"5.7.1")
    assert upstream.messages == []
    [row] = relay.archive_rows()
    assert row["verdict"] == "rejected"
    assert row["delivered"] is None
    assert row["reply"].startswith("550 5.7.1")


def test_message_without_from_is_refused_and_archived(relay, upstream):
    pair = relay.pair()
    raw = b"Subject: no author\r\n\r\nbody\r\n"
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        client.mail(pair.buyer)
        client.rcpt(pair.seller_alias)
        code, text = client.data(raw)
    assert (code, text[:5]) == (550, b"5.7.1")
    [row] = relay.archive_rows()
    assert row["raw"] == raw and row["verdict"] == "rejected"


def test_oversized_message_is_refused_with_552(start_relay, upstream):
    from support import upstream_url

    relay = start_relay(upstream_url(upstream), max_message_bytes=2048)
    pair = relay.pair()
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        assert client.esmtp_features["size"] == "2048"
        client.mail(pair.buyer)
        client.rcpt(pair.seller_alias)
        code, _ = client.data(message(pair.buyer, pair.seller_alias, body=("x" * 70 + "\n") * 60))
    assert code == 552
    assert upstream.messages == []
