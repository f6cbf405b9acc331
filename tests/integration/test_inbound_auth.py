"""Inbound mail authentication end to end, against a real DNS server on
loopback: a forged buyer message is refused, a genuine one is delivered
with Authentication-Results and the relay's own DKIM signature, which a
verifier checks against the key published in that DNS server."""

from __future__ import annotations

import email
import smtplib
import sys
from dataclasses import replace
from pathlib import Path

import dkim as dkimpy
import pytest

from relay import dkim, dns as relay_dns
from relay.config import AuthConfig, DnsConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dnsserver import ZONES, DNSServer  # noqa: E402
from support import RunningRelay, make_config, message, shared_dkim_key_file, upstream_url  # noqa: E402

BUYER = "bea@reject.example"


def relay_zone() -> str:
    record = dkim.dns_record(Path(shared_dkim_key_file()).read_bytes())
    chunks = " ".join(f'"{record[i:i + 200]}"' for i in range(0, len(record), 200))
    return ("$ORIGIN marketplace.example.\n"
            "@ 300 IN SOA ns.marketplace.example. hostmaster.marketplace.example. 1 3600 600 86400 300\n"
            "@ 300 IN NS ns.marketplace.example.\n"
            f"relay._domainkey 300 IN TXT {chunks}\n")


@pytest.fixture
def dns_server():
    with DNSServer([p.read_text() for p in sorted(ZONES.glob("*.zone"))] + [relay_zone()]) as server:
        yield server


@pytest.fixture
def auth_relay(tmp_path, upstream, dns_server):
    config = make_config(tmp_path, upstream_url(upstream), dns=DnsConfig((dns_server.address,)),
                         auth=AuthConfig("dmarc"))
    relay = RunningRelay(config)
    yield relay
    relay.stop()


def signed(raw: bytes) -> bytes:
    key = (ZONES / "keys" / "a.private.pem").read_bytes()
    return dkimpy.sign(raw, b"a", b"reject.example", key, include_headers=[b"From", b"To", b"Subject"]) + raw


def send(relay, raw, xforward_addr=None):
    pair = relay.main
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo("mx.reject.example")
        if xforward_addr:
            assert client.docmd("XFORWARD", f"ADDR={xforward_addr} HELO=mx.reject.example")[0] == 250
        client.mail(BUYER)
        assert client.rcpt(pair.seller_alias)[0] == 250
        return client.data(raw)


@pytest.fixture
def pair(auth_relay):
    auth_relay.main = auth_relay.pair(buyer=BUYER)
    return auth_relay.main


def test_genuine_buyer_delivered_with_results_and_a_verifying_signature(auth_relay, pair, upstream, dns_server):
    code, text = send(auth_relay, signed(message(BUYER, pair.seller_alias)))
    assert code == 250, text
    [got] = upstream.wait_for(1)
    out = email.message_from_bytes(got.data)
    assert out["Authentication-Results"] == "marketplace.example; spf=pass; dkim=pass; dmarc=pass"
    assert b"reject.example" not in got.data  # the results, not the buyer's domain
    resolver = relay_dns.make_resolver([dns_server.address], lifetime=2)
    assert dkimpy.verify(got.data, dnsfunc=relay_dns.dnsfunc(resolver))
    assert any(q[0] == "relay._domainkey.marketplace.example" for q in dns_server.queries)
    [row] = auth_relay.archive_rows()
    assert any("spf=pass" in c and "reject.example" in c for c in row["changes"])


def test_forged_buyer_is_refused(auth_relay, pair, upstream):
    # From an address SPF does not list, and not signed: DMARC fails, p=reject.
    code, text = send(auth_relay, message(BUYER, pair.seller_alias), xforward_addr="203.0.113.66")
    assert (code, text[:6]) == (550, b"5.7.26"), text
    assert b"DMARC" in text
    assert upstream.messages == []
    [row] = auth_relay.archive_rows()
    assert row["verdict"] == "rejected" and row["client_address"] == "203.0.113.66"


def test_dns_failure_is_451_never_a_silent_pass(auth_relay, pair, upstream, dns_server):
    dns_server.fail("reject.example.", "servfail")
    dns_server.fail("_dmarc.reject.example.", "servfail")
    code, text = send(auth_relay, message(BUYER, pair.seller_alias), xforward_addr="203.0.113.66")
    assert (code, text[:5]) == (451, b"4.7.5"), text
    assert upstream.messages == []
