"""Bounces through VERP: a DSN for a delivered message comes back to the
relay's signed return path and becomes a notice to the original sender,
with no real address and none of the remote server's words."""

from __future__ import annotations

import email
import json
import re
import smtplib
from datetime import timedelta
from email import policy
from pathlib import Path

import pytest

from archive_support import relay_cli
from support import Clock, RunningRelay, make_config, message, shared_dkim_key_file, upstream_url


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def relay_with_clock(tmp_path, upstream, clock):
    relay = RunningRelay(make_config(tmp_path, upstream_url(upstream)), clock=clock)
    yield relay
    relay.stop()


def dsn(verp: str, reporting_about: str, action="failed", status="5.1.1", auto=False) -> bytes:
    """A DSN as a remote MTA writes it (RFC 3464), naming the real address."""
    return (
        "From: Mail Delivery Subsystem <MAILER-DAEMON@mx.shop.example>\r\n"
        f"To: {verp}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        + ("Auto-Submitted: auto-replied\r\n" if auto else "")
        + "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\n"
        f"I'm sorry to have to inform you that your message to <{reporting_about}> could not be delivered.\r\n"
        f"<{reporting_about}>: host mx.shop.example said: 550 unknown user {reporting_about}\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.shop.example\r\n\r\n"
        f"Final-Recipient: rfc822; {reporting_about}\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{reporting_about}>: Recipient address rejected\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"To: {reporting_about}\r\nSubject: Hello\r\n"
        "--B--\r\n"
    ).encode()


def deliver(relay, sender, alias, **kwargs):
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.sendmail(sender, [alias], message(sender, alias, **kwargs))


def send_dsn(relay, verp, data):
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.ehlo()
        assert client.mail("<>")[0] == 250
        code, text = client.rcpt(verp)
        if code != 250:
            return code, text
        return client.data(data)


@pytest.mark.parametrize("direction", ["buyer_to_seller", "seller_to_buyer"])
def test_dsn_becomes_a_notice_without_real_addresses(relay, upstream, direction):
    pair = relay.pair()
    if direction == "buyer_to_seller":
        sender, alias, recipient, sender_alias = pair.buyer, pair.seller_alias, pair.seller, pair.buyer_alias
    else:
        sender, alias, recipient, sender_alias = pair.seller, pair.buyer_alias, pair.buyer, pair.seller_alias
    deliver(relay, sender, alias)
    [original] = upstream.wait_for(1)
    verp = original.mail_from
    code, text = send_dsn(relay, verp, dsn(verp, recipient))
    assert (code, text[:5]) == (250, b"2.0.0"), text
    notice = upstream.wait_for(2)[1]
    assert notice.mail_from == "<>"  # the null sender: a notice never causes another notice
    assert notice.rcpt_tos == [sender]
    out = email.message_from_bytes(notice.data, policy=policy.default)
    assert out["From"].addresses[0].addr_spec == "mailer-daemon@marketplace.example"
    assert out["Subject"] == f"Undelivered: your message to {alias}"
    assert out["Auto-Submitted"] == "auto-replied"
    body = out.get_content()
    assert "address was not accepted" in body and "5.1.1" in body
    # Nothing of the remote server's text, and not the counterpart's address.
    assert recipient.encode() not in notice.data.lower()
    assert b"mx.shop.example" not in notice.data and b"unknown user" not in notice.data
    assert notice.data.startswith(b"DKIM-Signature:")
    [row] = relay.call(relay.store.bounces_for(relay.archive_rows()[0]["id"]))
    assert (row["action"], row["status"], row["notified"]) == ("failed", "5.1.1", 1)


def test_expired_and_forged_bounce_addresses_are_refused(relay_with_clock, upstream, clock):
    relay = relay_with_clock
    pair = relay.pair()
    deliver(relay, pair.buyer, pair.seller_alias)
    verp = upstream.wait_for(1)[0].mail_from
    local, domain = verp.split("@")
    forged = local[:-1] + ("a" if local[-1] != "a" else "b") + "@" + domain
    code, text = send_dsn(relay, forged, dsn(forged, pair.seller))
    assert (code, text[:5]) == (550, b"5.1.1")
    clock.now += timedelta(days=8)  # lifetime_days = 7
    code, text = send_dsn(relay, verp, dsn(verp, pair.seller))
    assert (code, text[:5]) == (550, b"5.1.1")
    assert b"invalid or expired bounce address" in text
    assert len(upstream.messages) == 1  # no notice went out


def test_no_notice_for_delays_auto_submitted_originals_or_non_dsn_mail(relay, upstream):
    pair = relay.pair()
    deliver(relay, pair.buyer, pair.seller_alias)
    deliver(relay, pair.buyer, pair.seller_alias, message_id="<auto@x>",
            headers={"Auto-Submitted": "auto-replied"})
    first, automatic = upstream.wait_for(2)
    assert send_dsn(relay, first.mail_from, dsn(first.mail_from, pair.seller, action="delayed", status="4.4.1"))[0] == 250
    assert send_dsn(relay, automatic.mail_from, dsn(automatic.mail_from, pair.seller))[0] == 250
    vacation = message("vacation@mx.shop.example", first.mail_from, subject="Out of office",
                       headers={"Auto-Submitted": "auto-replied"})
    assert send_dsn(relay, first.mail_from, vacation)[0] == 250
    assert len(upstream.messages) == 2  # still only the two originals
    rows = relay.archive_rows()
    recorded = relay.call(relay.store.bounces_for(rows[0]["id"])) + relay.call(relay.store.bounces_for(rows[1]["id"]))
    assert sorted((r["action"], r["notified"]) for r in recorded) == [("delayed", 0), ("failed", 0), ("none", 0)]


def test_notice_that_cannot_be_sent_asks_the_dsn_sender_to_retry(relay, upstream):
    pair = relay.pair()
    deliver(relay, pair.buyer, pair.seller_alias)
    verp = upstream.wait_for(1)[0].mail_from
    upstream.fail_with("451 4.3.0 try later")
    code, text = send_dsn(relay, verp, dsn(verp, pair.seller))
    assert (code, text[:5]) == (451, b"4.4.1")
    upstream.reply_code = 250
    assert send_dsn(relay, verp, dsn(verp, pair.seller))[0] == 250
    assert len(upstream.wait_for(2)) == 2


def test_a_notice_refused_for_good_still_records_the_report(relay, upstream):
    pair = relay.pair()
    deliver(relay, pair.buyer, pair.seller_alias)
    verp = upstream.wait_for(1)[0].mail_from
    upstream.rcpt_reply = "550 5.1.1 no such user"  # the original sender's mailbox is gone too
    code, text = send_dsn(relay, verp, dsn(verp, pair.seller))
    assert (code, text) == (250, b"2.0.0 Delivery report accepted")
    [row] = relay.call(relay.store.bounces_for(relay.archive_rows()[0]["id"]))
    assert (row["action"], row["notified"]) == ("failed", 0)


CORPUS = Path(__file__).parent.parent / "cases" / "bounces"
_ADDRESS = re.compile(rb"[\w.+-]+@([\w-]+\.)+[\w-]+")


def real_bounce(name: str, extra_headers: str = "") -> bytes:
    """A bounce of the corpus as its MTA wrote it, without the mbox `From `
    line it was stored with (no SMTP client sends that), and with any
    header its MTA writes today that the stored copy predates."""
    raw = (CORPUS / name).read_bytes()
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1]
    return extra_headers.encode() + raw


def remote_words(raw: bytes) -> set[bytes]:
    """Every address and domain a bounce names: none may reach the notice."""
    found = set()
    for match in _ADDRESS.finditer(raw):
        address = match.group(0).lower().strip(b".")
        found |= {address, address.split(b"@")[1]}
    return found - {b"marketplace.example"}


REAL_FAILURES = {
    # Postfix 3 writes Auto-Submitted: auto-replied on every DSN it makes.
    "postfix": lambda verp, real: dsn(verp, real, auto=True),
    # Exim 4's DSN (the corpus copy predates the headers Exim 4.92 adds).
    "exim": lambda verp, real: real_bounce(
        "simple_42.txt", "Auto-Submitted: auto-replied\r\nX-Failed-Recipients: david...@gmail.com\r\n"),
    "exim-plain-text": lambda verp, real: real_bounce("exim_01.txt"),
    "precedence-bulk": lambda verp, real: real_bounce("dsn_01.txt"),
    "commented-action": lambda verp, real: real_bounce("dsn_12.txt"),
    "qmail": lambda verp, real: real_bounce("qmail_01.txt"),
    "sendmail-auto-generated": lambda verp, real: real_bounce("sendmail_01.txt"),
}


@pytest.mark.parametrize("kind", sorted(REAL_FAILURES))
def test_every_real_failure_makes_one_leak_free_notice(relay, upstream, kind):
    pair = relay.pair()
    deliver(relay, pair.buyer, pair.seller_alias)
    verp = upstream.wait_for(1)[0].mail_from
    report = REAL_FAILURES[kind](verp, pair.seller)
    code, text = send_dsn(relay, verp, report)
    assert (code, text) == (250, b"2.0.0 Delivery report accepted")
    [original, notice] = upstream.wait_for(2)
    assert notice.mail_from == "<>" and notice.rcpt_tos == [pair.buyer]
    out = email.message_from_bytes(notice.data, policy=policy.default)
    assert out["Subject"] == f"Undelivered: your message to {pair.seller_alias}"
    assert out["Auto-Submitted"] == "auto-replied"
    lowered = notice.data.lower()
    assert pair.seller.encode() not in lowered
    leaked = {word for word in remote_words(report) if word in lowered}
    assert leaked == set(), leaked
    [row] = relay.call(relay.store.bounces_for(relay.archive_rows()[0]["id"]))
    assert (row["action"], row["notified"]) == ("failed", 1)
    assert len(upstream.messages) == 2  # exactly one notice


@pytest.mark.parametrize(("name", "detector"), [("dsn_05.txt", "rfc3464"), ("simple_03.txt", "simplewarning")])
def test_a_real_delay_report_is_recorded_without_a_notice(relay, upstream, name, detector):
    pair = relay.pair()
    deliver(relay, pair.buyer, pair.seller_alias)
    verp = upstream.wait_for(1)[0].mail_from
    assert send_dsn(relay, verp, real_bounce(name))[0] == 250
    [row] = relay.call(relay.store.bounces_for(relay.archive_rows()[0]["id"]))
    assert (row["action"], row["detector"], row["notified"]) == ("delayed", detector, 0)
    assert len(upstream.messages) == 1


def test_archive_show_lists_each_bounce_with_its_detector(relay, upstream, tmp_path):
    pair = relay.pair()
    deliver(relay, pair.buyer, pair.seller_alias)
    verp = upstream.wait_for(1)[0].mail_from
    assert send_dsn(relay, verp, real_bounce("simple_03.txt"))[0] == 250
    assert send_dsn(relay, verp, real_bounce("qmail_01.txt"))[0] == 250
    archive_id = str(relay.archive_rows()[0]["id"])
    config = tmp_path / "cli.toml"  # the CLI on the relay's own database and files (PostgreSQL asks for them)
    (tmp_path / "bounce.key").write_bytes(b"k" * 32)
    config.write_text(f'database = "{relay.config.database}"\n\n[bounce]\nsecret_file = "{tmp_path / "bounce.key"}"\n\n'
                      f'[dkim]\nkey_file = "{shared_dkim_key_file()}"\n\n[submission]\nlisten = ""\nlisten_tls = ""\n')
    shown = relay_cli(config, "archive", "show", archive_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert [(b["action"], b["detector"], b["notified"]) for b in json.loads(shown.stdout)["bounces"]] == [
        ("delayed", "simplewarning", False), ("failed", "qmail", True)]
    text = relay_cli(config, "archive", "show", archive_id).stdout.decode()
    assert re.search(r"^bounce: .* failed \(status not given, read by qmail, sender notified\)$", text, re.M), text
    assert re.search(r"^bounce: .* delayed \(status not given, read by simplewarning, sender not notified\)$",
                     text, re.M), text
