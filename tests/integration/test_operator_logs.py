"""The relay's log as an operator reads it: one line per message with the
client's IP and the upstream's queue id, one line per refused recipient.
Real SMTP to a running relay; the log is what the relay's loggers emitted."""

from __future__ import annotations

import logging
import smtplib

import pytest

from support import message


@pytest.fixture
def relay_log(caplog):
    caplog.set_level(logging.INFO)

    def lines(prefix: str) -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name.startswith("relay.") and r.getMessage().startswith(prefix)]

    return lines


def test_message_line_names_the_forwarded_client_and_the_queue_id(relay, upstream, relay_log):
    pair = relay.pair()
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo("postfix.local")
        # postfix in front tells the real client's address (XFORWARD).
        assert client.docmd("XFORWARD", "NAME=mx.mail.example ADDR=203.0.113.9")[0] == 250
        client.sendmail(pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias))
    [got] = upstream.wait_for(1)
    assert got.queue_id
    [line] = relay_log("message ")
    fields = dict(field.split("=", 1) for field in line.split()[1:] if "=" in field)
    assert fields["verdict"] == "delivered"
    assert fields["client"] == "203.0.113.9"
    assert fields["queue_id"] == got.queue_id
    assert fields["archive"] == "1"


def test_refused_message_line_has_the_client_and_no_queue_id(relay, upstream, relay_log):
    pair = relay.pair()
    upstream.fail_with("550 5.1.1 <seller@shop.example>: no such user")
    with smtplib.SMTP(relay.host, relay.port) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias))
    assert refused.value.smtp_code == 550
    [line] = relay_log("message ")
    assert " verdict=failed client=127.0.0.1 queue_id=- " in line


def test_each_refused_recipient_has_a_line(relay, relay_log):
    pair = relay.pair()
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo("postfix.local")
        client.docmd("XFORWARD", "ADDR=198.51.100.7")
        client.mail(pair.buyer)
        refused = [("someone@elsewhere.example", 550, "5.1.1"),
                   ("nosuchalias@marketplace.example", 550, "5.1.1")]
        for address, code, enhanced in refused:
            got_code, got_text = client.rcpt(address)
            assert (got_code, got_text[:5].decode()) == (code, enhanced)
        assert client.rcpt(pair.seller_alias)[0] == 250
        client.rset()
        client.docmd("XFORWARD", "ADDR=198.51.100.7")
        # The envelope sender is not the alias's counterpart.
        client.mail("stranger@mail.example")
        assert client.rcpt(pair.seller_alias)[0] == 550
    lines = relay_log("rcpt refused ")
    assert lines == [
        f"rcpt refused client=198.51.100.7 to={address} code={code} enhanced={enhanced} listener=inbound"
        for address, code, enhanced in refused + [(pair.seller_alias, 550, "5.7.1")]]
