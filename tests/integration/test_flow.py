"""End to end over real SMTP: buyer → seller and back, with only aliases
showing, and the archive written before the client hears 250."""

from __future__ import annotations

import email
import re
import smtplib
from pathlib import Path
from email import policy

import pytest

from support import message


def send(relay, sender, recipients, data):
    with smtplib.SMTP(relay.host, relay.port, timeout=30) as client:
        return client.sendmail(sender, recipients, data)


def parsed(received):
    return email.message_from_bytes(received.data, policy=policy.default)


def test_buyer_to_seller_arrives_with_only_aliases(relay, upstream):
    pair = relay.pair()
    raw = message(f'"Bea <{pair.buyer}>" <{pair.buyer}>', pair.seller_alias,
                  subject=f"About my order ({pair.buyer})",
                  body=f"Reach me at {pair.buyer}.\nThe seller is {pair.seller}.\n",
                  headers={"Reply-To": pair.buyer, "Received": "from mx.mail.example by x",
                           "X-Originating-IP": "[203.0.113.9]"})
    assert send(relay, pair.buyer, [pair.seller_alias], raw) == {}
    [got] = upstream.wait_for(1)
    assert got.rcpt_tos == [pair.seller]
    # The return path is a signed VERP address of the relay: bounces come back here.
    assert re.fullmatch(r"bounce\+[0-9a-f]{32}\.[0-9a-f]+\.[a-z2-7]{16}@marketplace\.example", got.mail_from)
    msg = parsed(got)
    assert msg["From"].addresses[0].addr_spec == pair.buyer_alias
    assert msg["From"].addresses[0].display_name == "Bea Buyer"
    assert msg["To"].addresses[0].addr_spec == pair.seller
    assert msg["Subject"] == f"About my order ({pair.buyer_alias})"
    assert pair.buyer.encode() not in got.data
    # The recipient's own address appears once: in To.
    assert got.data.count(pair.seller.encode()) == 1
    assert b"203.0.113.9" not in got.data
    assert msg["Reply-To"] is None
    assert f"Reach me at {pair.buyer_alias}.".encode() in got.data
    assert f"The seller is {pair.seller_alias}.".encode() in got.data
    assert all(line.endswith(b"\r") or not line for line in got.data.split(b"\n")[:-1])


def test_seller_to_buyer_goes_to_the_buyer(relay, upstream):
    pair = relay.pair()
    raw = message(pair.seller, pair.buyer_alias, body="Your parcel left today.\n")
    send(relay, pair.seller, [pair.buyer_alias], raw)
    [got] = upstream.wait_for(1)
    assert got.rcpt_tos == [pair.buyer]
    msg = parsed(got)
    assert msg["From"].addresses[0].addr_spec == pair.seller_alias
    assert msg["From"].addresses[0].display_name == "Sam Seller"
    assert pair.seller.encode() not in got.data


def test_archive_row_is_committed_with_hashes(relay, upstream):
    import hashlib

    pair = relay.pair()
    raw = message(pair.buyer, pair.seller_alias)
    send(relay, pair.buyer, [pair.seller_alias], raw)
    [got] = upstream.wait_for(1)
    [row] = relay.archive_rows()
    assert row["verdict"] == "delivered"
    assert row["direction"] == "buyer_to_seller"
    assert row["relationship_id"] == pair.relationship_id
    assert row["raw"] == raw
    assert row["delivered"] == got.data
    assert row["raw_sha256"] == hashlib.sha256(raw).hexdigest()
    assert row["delivered_sha256"] == hashlib.sha256(got.data).hexdigest()
    assert row["prev_sha256"] == "0" * 64
    assert row["mail_from"] == pair.buyer
    assert row["rcpt_to"] == [pair.seller_alias]
    assert row["reply"].startswith("250 2.0.0")
    assert any("Message-ID" in change for change in row["changes"])


def test_chain_links_each_row_to_the_previous(relay, upstream):
    pair = relay.pair()
    for n in range(3):
        send(relay, pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias,
                                                             message_id=f"<n{n}@c.example>"))
    rows = relay.archive_rows()
    assert len(rows) == 3
    for previous, row in zip(rows, rows[1:]):
        assert row["prev_sha256"] == previous["row_sha256"]


def test_client_sees_the_archive_id(relay, upstream):
    pair = relay.pair()
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        client.mail(pair.buyer)
        client.rcpt(pair.seller_alias)
        code, text = client.data(message(pair.buyer, pair.seller_alias))
    assert code == 250
    assert text.startswith(b"2.0.0 Message accepted for delivery (archive 1)")


def test_greeting_names_the_relay(relay):
    with smtplib.SMTP(relay.host, relay.port) as client:
        code, text = client.ehlo()
        assert code == 250
        assert b"AUTH" not in text
        assert b"SMTPUTF8" in text
    with smtplib.SMTP() as client:
        code, banner = client.connect(relay.host, relay.port)
        assert code == 220
        assert b"relay" in banner
        assert b"Python" not in banner


def test_delivered_mail_carries_a_verifying_dkim_signature(relay, upstream):
    import dkim as dkimpy

    from relay import dkim

    pair = relay.pair()
    send(relay, pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias))
    [got] = upstream.wait_for(1)
    assert got.data.startswith(b"DKIM-Signature: ")
    record = dkim.dns_record(Path(relay.config.dkim.key_file).read_bytes()).encode()
    published = {b"relay._domainkey.marketplace.example.": record}
    assert dkimpy.verify(got.data, dnsfunc=lambda name, timeout=5: published.get(name))
    signature = got.data.split(b"\r\n\r\n", 1)[0].decode()
    assert "d=marketplace.example" in signature and "s=relay" in signature
    # Over-signed: From listed more often than it occurs, so an added From breaks it.
    header_list = signature.split("h=", 1)[1].split(";", 1)[0].replace("\r\n", "").replace(" ", "").lower()
    assert header_list.split(":").count("from") == 2
    tampered = got.data.replace(b"\r\n\r\n", b"\r\nFrom: someone@else.example\r\n\r\n", 1)
    assert not dkimpy.verify(tampered, dnsfunc=lambda name, timeout=5: published.get(name))
