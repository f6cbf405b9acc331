"""Sellers' mail clients: submission with STARTTLS and implicit TLS, AUTH,
brute-force throttling, identity, the daily cap, opt-out and the contact
window. Real TLS (trustme certificates), real smtplib clients, and swaks
when it is installed. Time is injected, never slept through."""

from __future__ import annotations

import base64
import email
import logging
import shutil
import re
import smtplib
import socket
import ssl
import subprocess
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from email import policy

import pytest
import trustme

from relay import auth
from relay.config import PolicyConfig
from relay.store import iso
from support import Clock, RunningRelay, make_config, message, upstream_url

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def client_context(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def submission(tmp_path, ca, upstream, clock):
    """start(**policy) -> a relay whose submission listeners use a trustme
    certificate, with a seller (password set) and a buyer."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    running = []

    def start(**policy_overrides) -> RunningRelay:
        config = make_config(tmp_path, upstream_url(upstream), submission={
            "tls_cert": str(tmp_path / "cert.pem"), "tls_key": str(tmp_path / "key.pem"),
            "failure_delay": 0.01, "max_failure_delay": 0.05, "max_failures": 4})
        config = replace(config, policy=replace(PolicyConfig(), **policy_overrides))
        relay = RunningRelay(config, clock=clock)
        running.append(relay)
        relay.main = relay.pair()
        relay.call(relay.store.set_password_hash(relay.main.seller, auth.hash_password(PASSWORD)))
        return relay

    yield start
    for relay in running:
        relay.stop()


def starttls_client(relay, context, login=True) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", relay.submission_port, timeout=30)
    client.ehlo()
    client.starttls(context=context)
    client.ehlo()
    if login:
        client.login(relay.main.seller, PASSWORD)
    return client


def send_as_seller(relay, context, to, raw=None):
    with starttls_client(relay, context) as client:
        client.mail("anything@client.example")
        code, text = client.rcpt(to)
        if code != 250:
            return code, text
        return client.data(raw or message("Whoever <whatever@client.example>", to))


def test_starttls_auth_and_delivery_rewritten(submission, client_context, upstream):
    relay = submission()
    pair = relay.main
    raw = message('"Sam (sam@personal.example)" <sam@personal.example>', pair.buyer_alias,
                  body=f"Hi! Reply to {pair.seller} please.\n")
    code, text = send_as_seller(relay, client_context, pair.buyer_alias, raw)
    assert code == 250, text
    [got] = upstream.wait_for(1)
    assert got.rcpt_tos == [pair.buyer]
    assert got.mail_from.startswith("bounce+")  # the envelope too, whatever the client said
    out = email.message_from_bytes(got.data, policy=policy.default)
    assert out["From"].addresses[0].addr_spec == pair.seller_alias
    assert out["From"].addresses[0].display_name == "Sam Seller"
    assert b"personal.example" not in got.data and pair.seller.encode() not in got.data
    assert "ESMTPSA" in out["Received"]


def test_implicit_tls_with_auth_login(submission, client_context, upstream):
    relay = submission()
    pair = relay.main
    with smtplib.SMTP_SSL("127.0.0.1", relay.submission_tls_port, context=client_context, timeout=30) as client:
        client.ehlo()
        assert "LOGIN" in client.esmtp_features["auth"]
        client.user, client.password = pair.seller, PASSWORD
        code, _ = client.auth("LOGIN", client.auth_login)
        assert code == 235
        assert client.sendmail(pair.seller, [pair.buyer_alias], message(pair.seller, pair.buyer_alias)) == {}
    assert upstream.wait_for(1)[0].rcpt_tos == [pair.buyer]


def test_logins_log_the_seller_and_no_deprecation_warning(submission, client_context, upstream, caplog):
    caplog.set_level(logging.INFO)
    relay = submission()
    pair = relay.main
    # Both mechanisms, both listeners: aiosmtpd 1.4 warns on every login
    # unless the session is the relay's own (protocol.RelaySession).
    code, _ = send_as_seller(relay, client_context, pair.buyer_alias)
    assert code == 250
    with smtplib.SMTP_SSL("127.0.0.1", relay.submission_tls_port, context=client_context, timeout=30) as client:
        client.ehlo()
        client.user, client.password = pair.seller, PASSWORD
        assert client.auth("LOGIN", client.auth_login)[0] == 235
    [got] = upstream.wait_for(1)
    logged = [r.getMessage() for r in caplog.records]
    assert not [line for line in logged if "deprecated" in line.lower()]
    seller_id = relay.call(relay.store.get_party("seller", pair.seller)).id
    assert logged.count(f"seller {seller_id} logged in from 127.0.0.1") == 2
    [line] = [line for line in logged if line.startswith("message ")]
    assert f" client=127.0.0.1 queue_id={got.queue_id} " in line


def test_nothing_before_starttls(submission):
    relay = submission()
    with smtplib.SMTP("127.0.0.1", relay.submission_port, timeout=30) as client:
        client.ehlo()
        assert "auth" not in client.esmtp_features  # AUTH is offered only over TLS
        assert client.has_extn("starttls")
        code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(
            f"\0{relay.main.seller}\0{PASSWORD}".encode()).decode())
        assert code == 530
        code, text = client.mail(relay.main.seller)
        assert code == 530


def test_mail_before_auth_is_refused(submission, client_context):
    relay = submission()
    with starttls_client(relay, client_context, login=False) as client:
        code, text = client.mail(relay.main.seller)
        assert (code, text[:5]) == (530, b"5.7.0")


def test_wrong_password_and_bad_inputs(submission, client_context):
    relay = submission()
    with starttls_client(relay, client_context, login=False) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login(relay.main.seller, "wrong password")
        assert failed.value.smtp_code == 535
        code, text = client.docmd("AUTH", "PLAIN !!!not-base64!!!")
        assert (code, text[:5]) == (501, b"5.5.2")
        code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"no-nul-bytes").decode())
        assert (code, text[:5]) == (501, b"5.5.2")
        huge = base64.b64encode(b"\0" + b"u" * 10240 + b"\0" + b"p").decode()
        code, _ = client.docmd("AUTH", "PLAIN " + huge)
        assert code >= 500  # refused as too long, not a crash
        assert client.noop()[0] == 250
    # Still serving, and the right password still works.
    with starttls_client(relay, client_context) as client:
        assert client.noop()[0] == 250


def test_unknown_account_fails_like_a_wrong_password(submission, client_context):
    relay = submission()
    with starttls_client(relay, client_context, login=False) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login("nobody@shop.example", PASSWORD)
        assert failed.value.smtp_code == 535


def test_brute_force_is_cut_off_with_421(submission, client_context):
    relay = submission()
    codes = []
    with starttls_client(relay, client_context, login=False) as client:
        for _ in range(6):
            try:
                code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(
                    f"\0{relay.main.seller}\0guess".encode()).decode())
            except smtplib.SMTPServerDisconnected:
                codes.append("disconnected")
                break
            codes.append(code)
    assert codes[:4] == [535, 535, 535, 535]
    assert codes[4] == 421


def test_starttls_command_injection_is_discarded(submission, ca):
    """STARTTLS and MAIL in one packet: the MAIL must not survive into TLS."""
    relay = submission()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with socket.create_connection(("127.0.0.1", relay.submission_port), timeout=30) as raw:
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"220")
        raw.sendall(b"EHLO client.example\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
        assert reader.readline().startswith(b"220")
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls_sock:
            tls_reader = tls_sock.makefile("rb")
            tls_sock.sendall(b"EHLO client.example\r\n")
            first = tls_reader.readline()
            assert first.startswith(b"250"), first  # the answer to EHLO, not to the injected MAIL
            while not first.startswith(b"250 "):
                first = tls_reader.readline()
            tls_sock.sendall(b"RSET\r\n")
            assert tls_reader.readline().startswith(b"250")


@pytest.mark.parametrize("target", ["other-sellers-buyer", "outside", "own-seller-alias", "unknown-alias"])
def test_seller_may_write_only_to_own_buyers(submission, client_context, upstream, target):
    relay = submission()
    other = relay.pair(seller="rival@shop2.example", buyer="bob@mail.example", order="O-rival")
    to = {"other-sellers-buyer": other.buyer_alias, "outside": "victim@gmail.example",
          "own-seller-alias": relay.main.seller_alias,
          "unknown-alias": "aaaaaaaaaaaaaaaa@marketplace.example"}[target]
    code, text = send_as_seller(relay, client_context, to)
    assert code == 550 and text[:5] in (b"5.7.1", b"5.1.1"), text
    if target != "unknown-alias":
        assert text[:5] == b"5.7.1"
    assert upstream.messages == []


def test_daily_cap_at_n_and_n_plus_one_as_orders_change(submission, client_context, upstream, clock):
    # cap = 2 + 1 × ceil(orders in 7 days / 7); pair() placed one order → 3.
    relay = submission(daily_message_base=2, daily_message_per_order=1)
    pair = relay.main
    for n in range(3):
        assert send_as_seller(relay, client_context, pair.buyer_alias,
                              message("x@client.example", pair.buyer_alias, message_id=f"<c{n}@x>"))[0] == 250
    code, text = send_as_seller(relay, client_context, pair.buyer_alias)
    assert (code, text[:5]) == (450, b"4.7.1")
    assert b"Daily sending limit of 3 messages reached" in text
    first_sent = relay.archive_rows()[0]["received_at"]
    frees = datetime.fromisoformat(first_sent.replace("Z", "+00:00")) + timedelta(hours=24)
    assert frees.strftime("%Y-%m-%d %H:%M:%S").encode() in text
    # Seven more orders in the week: volume ceil(8/7) = 2, cap 4.
    for n in range(7):
        relay.call(relay.store.add_order(f"more-{n}", pair.seller, pair.buyer, iso(clock.now), "marketplace.example"))
    assert send_as_seller(relay, client_context, pair.buyer_alias)[0] == 250
    assert send_as_seller(relay, client_context, pair.buyer_alias)[0] == 450
    # The same cap holds on the inbound side (the seller's own provider).
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        client.mail(pair.seller)
        assert client.rcpt(pair.buyer_alias)[0] == 450
    # A day later the window has moved on (the orders are older than a day
    # but still in the week).
    clock.now += timedelta(hours=24, seconds=1)
    assert send_as_seller(relay, client_context, pair.buyer_alias)[0] == 250
    assert len(upstream.messages) == 5


def test_daily_orders_override(submission, client_context, upstream):
    relay = submission(daily_message_base=1, daily_message_per_order=1)
    pair = relay.main
    relay.call(relay.store.set_daily_orders(pair.seller, 0))  # cap 1
    assert send_as_seller(relay, client_context, pair.buyer_alias)[0] == 250
    assert send_as_seller(relay, client_context, pair.buyer_alias)[0] == 450


def buyer_writes(relay, upstream, message_id="<b1@mail.example>"):
    pair = relay.main
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.sendmail(pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias, message_id=message_id))
    delivered = upstream.wait_for(len(upstream.messages) + 0)[-1]
    return email.message_from_bytes(delivered.data)["Message-ID"]


def test_opt_out_refuses_unsolicited_but_not_replies(submission, client_context, upstream):
    relay = submission()
    pair = relay.main
    relay.call(relay.store.set_opted_out(pair.buyer, True))
    code, text = send_as_seller(relay, client_context, pair.buyer_alias)
    assert (code, text) == (550, b"5.7.1 buyer does not accept unsolicited messages")
    # The seller cannot fake a thread with its own Message-ID or a made-up reference.
    code, _ = send_as_seller(relay, client_context, pair.buyer_alias, message(
        "x@client.example", pair.buyer_alias, headers={"In-Reply-To": "<made-up@x>"}))
    assert code == 550
    relay_id = buyer_writes(relay, upstream)
    code, text = send_as_seller(relay, client_context, pair.buyer_alias, message(
        "x@client.example", pair.buyer_alias, message_id="<s1@shop.example>",
        headers={"In-Reply-To": relay_id, "References": relay_id}))
    assert code == 250, text
    # Opting in again lifts it.
    relay.call(relay.store.set_opted_out(pair.buyer, False))
    assert send_as_seller(relay, client_context, pair.buyer_alias)[0] == 250


def test_contact_window_edge(submission, client_context, upstream, clock):
    relay = submission(proactive_window_days=30)
    pair = relay.main
    latest = relay.call(relay.store.latest_order_at(pair.relationship_id))
    placed = datetime.fromisoformat(latest.replace("Z", "+00:00"))
    clock.now = placed + timedelta(days=30)
    assert send_as_seller(relay, client_context, pair.buyer_alias)[0] == 250
    clock.now = placed + timedelta(days=30, seconds=1)
    code, text = send_as_seller(relay, client_context, pair.buyer_alias)
    assert (code, text[:5]) == (550, b"5.7.1")
    assert b"within 30 days of the latest order" in text
    # A reply to the buyer is never limited by the window.
    relay_id = buyer_writes(relay, upstream, "<late@mail.example>")
    code, _ = send_as_seller(relay, client_context, pair.buyer_alias, message(
        "x@client.example", pair.buyer_alias, headers={"In-Reply-To": relay_id}))
    assert code == 250
    # A new order opens it again.
    relay.call(relay.store.add_order("O-new", pair.seller, pair.buyer, iso(clock.now), "marketplace.example"))
    assert send_as_seller(relay, client_context, pair.buyer_alias)[0] == 250


def test_self_signed_pair_is_made_when_no_certificate_is_configured(start_relay, upstream, tmp_path):
    relay = start_relay(upstream_url(upstream))
    assert (tmp_path / "tls" / "submission-cert.pem").exists()
    context = ssl.create_default_context(cafile=str(tmp_path / "tls" / "submission-cert.pem"))
    context.check_hostname = False
    with smtplib.SMTP_SSL("127.0.0.1", relay.submission_tls_port, context=context, timeout=30) as client:
        assert client.ehlo()[0] == 250
        version = client.sock.version()
    assert version in ("TLSv1.2", "TLSv1.3")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (.ci/run installs it)")
def test_swaks_tls_auth(submission, upstream, ca, tmp_path):
    relay = submission()
    pair = relay.main
    result = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(relay.submission_port), "--tls",
         "--auth", "PLAIN", "--auth-user", pair.seller, "--auth-password", PASSWORD,
         "--from", pair.seller, "--to", pair.buyer_alias, "--header", f"Subject: from swaks",
         "--body", f"Sent with swaks by {pair.seller}"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0" in result.stdout
    [got] = upstream.wait_for(1)
    assert got.rcpt_tos == [pair.buyer]
    assert pair.seller.encode() not in got.data
    assert f"Sent with swaks by {pair.seller_alias}".encode() in got.data


def test_transactions_side_by_side_cannot_pass_the_cap(submission, client_context, upstream):
    """Five connections all pass RCPT before any message is archived; the
    cap (2) is checked again, holding a place, before forwarding."""
    relay = submission(daily_message_base=2, daily_message_per_order=0)
    pair = relay.main
    clients = [starttls_client(relay, client_context) for _ in range(5)]
    try:
        for client in clients:
            client.mail("x@client.example")
            assert client.rcpt(pair.buyer_alias)[0] == 250
        codes = [client.data(message("x@client.example", pair.buyer_alias))[0] for client in clients]
    finally:
        for client in clients:
            client.close()
    assert sorted(codes) == [250, 250, 450, 450, 450]
    assert len(upstream.wait_for(2)) == 2
