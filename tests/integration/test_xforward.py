"""XFORWARD (postfix in front): the real client's address reaches the
archive and the mail-authentication checks, but only from trusted hosts."""

from __future__ import annotations

import smtplib
from dataclasses import replace

from support import RunningRelay, message, upstream_url


def test_trusted_host_forwards_the_client_address(relay, upstream):
    pair = relay.pair()
    with smtplib.SMTP(relay.host, relay.port) as client:
        code, text = client.ehlo("postfix.local")
        assert b"XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE" in text
        code, text = client.docmd("XFORWARD", "NAME=mx.mail.example ADDR=203.0.113.9 PROTO=ESMTP")
        assert (code, text) == (250, b"2.0.0 Ok")
        code, _ = client.docmd("XFORWARD", "HELO=mx.mail.example SOURCE=REMOTE IDENT=[UNAVAILABLE]")
        assert code == 250
        client.sendmail(pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias))
        # Not inside a transaction.
        client.mail(pair.buyer)
        code, text = client.docmd("XFORWARD", "ADDR=198.51.100.1")
        assert (code, text[:5]) == (503, b"5.5.1")
    [row] = relay.archive_rows()
    assert row["client_address"] == "203.0.113.9"
    [got] = upstream.wait_for(1)
    assert b"203.0.113.9" not in got.data and b"mx.mail.example" not in got.data


def test_ipv6_and_xtext(relay, upstream):
    pair = relay.pair()
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo("postfix.local")
        assert client.docmd("XFORWARD", "ADDR=IPV6:2001:db8::25 NAME=host+2Bplus.example")[0] == 250
        client.sendmail(pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias))
    assert relay.archive_rows()[0]["client_address"] == "2001:db8::25"


def test_bad_attributes(relay):
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo("postfix.local")
        for arg in ("", "ADDR", "COLOR=blue", "ADDR=1.2.3.4 EVIL=1"):
            code, text = client.docmd("XFORWARD", arg)
            assert (code, text[:5]) == (501, b"5.5.4"), arg


def test_untrusted_host_cannot_xforward(start_relay, upstream):
    relay = start_relay(upstream_url(upstream))
    pair = relay.pair()
    relay.stop()  # the same database, restarted trusting only 127.0.0.2
    config = replace(relay.config, inbound=replace(relay.config.inbound, xforward_hosts=("127.0.0.2",)))
    untrusted = RunningRelay(config)
    try:
        with smtplib.SMTP(untrusted.host, untrusted.port) as client:
            code, text = client.ehlo("anyone.example")
            assert b"XFORWARD" not in text
            code, text = client.docmd("XFORWARD", "ADDR=203.0.113.9")
            assert (code, text[:5]) == (550, b"5.7.0")
            client.sendmail(pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias))
        assert untrusted.archive_rows()[0]["client_address"] == "127.0.0.1"
    finally:
        untrusted.stop()
