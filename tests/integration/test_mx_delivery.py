"""Direct delivery (upstream "mx:"): MX lookup through the relay's resolver
(a real DNS server on loopback), hosts tried in preference order. The test
MX hosts listen on port 25 of other loopback addresses."""

from __future__ import annotations

import smtplib
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from relay.config import DnsConfig, UpstreamConfig, UpstreamTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dnsserver import DNSServer  # noqa: E402
from support import RecordingUpstream, RunningRelay, make_config, message  # noqa: E402

ZONE = """$ORIGIN mx-test.example.
@    300 IN SOA ns.mx-test.example. hostmaster.mx-test.example. 1 3600 600 86400 300
@    300 IN NS  ns.mx-test.example.
ns   300 IN A   127.0.0.1
@    300 IN MX  10 mx1.mx-test.example.
@    300 IN MX  20 mx2.mx-test.example.
mx1  300 IN A   127.0.0.52
mx2  300 IN A   127.0.0.53
"""
NULL_MX = """$ORIGIN nomail.example.
@    300 IN SOA ns.nomail.example. hostmaster.nomail.example. 1 3600 600 86400 300
@    300 IN NS  ns.nomail.example.
@    300 IN MX  0 .
"""


@pytest.fixture
def mx_hosts():
    first = RecordingUpstream(host="127.0.0.52", port=25).start()
    second = RecordingUpstream(host="127.0.0.53", port=25).start()
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture
def dns_server():
    with DNSServer([ZONE, NULL_MX]) as server:
        yield server


@pytest.fixture
def mx_relay(tmp_path, dns_server):
    config = make_config(tmp_path, "maildir:unused", dns=DnsConfig((dns_server.address,)))
    config = replace(config, upstream=UpstreamConfig(url=UpstreamTarget("mx"), timeout=5.0))
    relay = RunningRelay(config)
    yield relay
    relay.stop()


def seller_writes(relay, buyer):
    pair = relay.pair(buyer=buyer)
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        client.mail(pair.seller)
        client.rcpt(pair.buyer_alias)
        return pair, client.data(message(pair.seller, pair.buyer_alias))


def test_first_mx_deferring_falls_through_to_the_second(mx_relay, mx_hosts, dns_server):
    first, second = mx_hosts
    first.fail_with("451 4.3.0 greylisted")
    pair, (code, _) = seller_writes(mx_relay, "bea@mx-test.example")
    assert code == 250
    [got] = second.wait_for(1)
    assert got.rcpt_tos == ["bea@mx-test.example"]
    assert first.messages == []
    assert ("mx-test.example", "MX", "udp") in dns_server.queries


def test_a_permanent_refusal_is_final(mx_relay, mx_hosts):
    first, second = mx_hosts
    first.rcpt_reply = "550 5.1.1 no such user"
    _, (code, text) = seller_writes(mx_relay, "bea@mx-test.example")
    assert (code, text[:5]) == (550, b"5.1.1")
    assert second.messages == []


def test_all_hosts_down_is_451(mx_relay):
    _, (code, text) = seller_writes(mx_relay, "bea@mx-test.example")  # nothing listens on :25 there
    assert (code, text[:5]) == (451, b"4.4.1")


def test_null_mx_is_refused(mx_relay):
    _, (code, text) = seller_writes(mx_relay, "bea@nomail.example")
    assert (code, text[:5]) == (550, b"5.1.2")


def test_dns_failure_is_451(mx_relay, dns_server):
    dns_server.fail("mx-test.example.", "servfail")
    _, (code, text) = seller_writes(mx_relay, "bea@mx-test.example")
    assert (code, text[:5]) == (451, b"4.4.3")


@pytest.mark.parametrize("upstream, inbound, warned", [
    ("mx", "off", True), ("smtp", "off", True), ("mx", "dmarc", False)])
def test_authentication_off_is_warned_about_whatever_the_upstream(tmp_path, dns_server, caplog, upstream,
                                                                   inbound, warned):
    """The warning that forged senders get through is about the inbound
    checks; an MX upstream (which needs the resolver too) must not hide it."""
    import logging

    caplog.set_level(logging.WARNING, logger="relay.server")
    config = make_config(tmp_path, "smtp://127.0.0.1:9", dns=DnsConfig((dns_server.address,)))
    config = replace(config, auth=replace(config.auth, inbound=inbound))
    if upstream == "mx":
        config = replace(config, upstream=UpstreamConfig(url=UpstreamTarget("mx"), timeout=5.0))
    relay = RunningRelay(config)
    try:
        said = [r.getMessage() for r in caplog.records if r.name == "relay.server"]
        assert any(m.startswith("INBOUND MAIL AUTHENTICATION IS OFF") for m in said) is warned, said
    finally:
        relay.stop()
