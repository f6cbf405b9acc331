"""Fault: TLS to the upstream fails. A certificate the relay does not
trust, one for another host name, a server that hangs up in the middle of
the handshake or answers it with bytes that are not TLS, a STARTTLS that
never starts: the client gets 451 and the upstream holds nothing. When the
upstream's certificate is fixed the retry is delivered once."""

from __future__ import annotations

import ssl
from collections import Counter

import pytest
import trustme

from faultkit import Ledger, archive_of, fault_message, send, tag_of
from support import RecordingUpstream, upstream_url


@pytest.fixture(scope="module")
def trusted_ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def rogue_ca():
    return trustme.CA()


def transaction(relay, pair, tag, ledger):
    raw = fault_message(pair.buyer, pair.seller_alias, tag)
    return ledger.note(tag, send(relay.port, pair.buyer, pair.seller_alias, raw))


def delivered(recorder) -> Counter:
    return Counter(tag_of(got.data) for got in recorder.messages)


@pytest.mark.parametrize("mode, scheme", [("implicit", "smtps"), ("starttls", "smtp+starttls")])
@pytest.mark.parametrize("bad_cert", ["untrusted-ca", "wrong-host"])
def test_bad_certificate_is_451_until_fixed(start_relay, tmp_path, trusted_ca, rogue_ca, mode, scheme, bad_cert):
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if bad_cert == "untrusted-ca":
        rogue_ca.issue_cert("127.0.0.1").configure_cert(server_context)
    else:
        trusted_ca.issue_cert("mail.elsewhere.example").configure_cert(server_context)
    recorder = RecordingUpstream(tls=mode, tls_context=server_context).start()
    try:
        ca_file = tmp_path / "ca.pem"
        trusted_ca.cert_pem.write_to_path(str(ca_file))
        relay = start_relay(upstream_url(recorder, scheme), ca_file=str(ca_file), upstream_timeout=5.0)
        pair = relay.pair()
        ledger = Ledger()
        first = transaction(relay, pair, "tls1", ledger)
        assert (first.code, first.text[:5]) == (451, "4.4.1"), first
        assert recorder.messages == []
        assert archive_of(relay) == {"tls1": ["deferred"]}

        # The operator installs the right certificate; new handshakes use it.
        trusted_ca.issue_cert("127.0.0.1").configure_cert(server_context)
        second = transaction(relay, pair, "tls1", ledger)
        assert second.code == 250, second
        assert delivered(recorder) == {"tls1": 1}
        assert ledger.check(delivered(recorder), archive_of(relay))["sent"] == 1
    finally:
        recorder.stop()


@pytest.mark.parametrize("scheme, stage, action", [
    ("smtps", "greeting", "hangup-on-input"),  # reads the ClientHello, hangs up
    ("smtps", "greeting", "garbage"),  # answers the ClientHello with something else
    ("smtps", "greeting", None),  # a plain-text SMTP server on the smtps port
    ("smtps", "greeting", "stall"),  # takes the connection, never completes the handshake
    ("smtp+starttls", "starttls", "ready-then-garbage"),  # "220 Ready to start TLS", then not TLS
    ("smtp+starttls", "starttls", "454 4.7.0 TLS not available due to temporary reason"),
    ("smtp+starttls", "starttls", "close"),
], ids=["smtps-hangup", "smtps-garbage", "smtps-plaintext", "smtps-stall", "starttls-not-tls",
        "starttls-454", "starttls-hangup"])
def test_broken_handshake_is_451(start_relay, scripted, trusted_ca, tmp_path, scheme, stage, action):
    setattr(scripted, stage, action)
    ca_file = tmp_path / "ca.pem"
    trusted_ca.cert_pem.write_to_path(str(ca_file))
    relay = start_relay(scripted.url(scheme), ca_file=str(ca_file), upstream_timeout=1.0)
    pair = relay.pair()
    ledger = Ledger()
    attempt = transaction(relay, pair, "hs1", ledger)
    assert attempt.code == 451, attempt
    assert scripted.seen_tags() == {}
    assert archive_of(relay) == {"hs1": ["deferred"]}
    ledger.check(scripted.accepted(), archive_of(relay))


def test_starttls_upstream_that_stops_offering_it_is_451(start_relay, scripted, trusted_ca, tmp_path):
    """smtp+starttls:// means TLS or nothing: an upstream (or a man in the
    middle) that drops STARTTLS from EHLO gets no message in clear text."""
    ca_file = tmp_path / "ca.pem"
    trusted_ca.cert_pem.write_to_path(str(ca_file))
    relay = start_relay(scripted.url("smtp+starttls"), ca_file=str(ca_file), upstream_timeout=1.0)
    pair = relay.pair()
    ledger = Ledger()
    attempt = transaction(relay, pair, "clear", ledger)
    assert attempt.code == 451, attempt
    assert scripted.seen_tags() == {}
