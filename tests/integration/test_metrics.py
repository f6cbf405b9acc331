"""The metrics endpoint, scraped over HTTP after real traffic."""

from __future__ import annotations

import base64
import smtplib
import socket
import sqlite3
import ssl
import urllib.error
import urllib.request

import pytest

import support
from relay import auth
from relay.config import Endpoint, MetricsConfig
from support import closed_port, message, upstream_url


def scrape(relay, path="/metrics"):
    host, port = relay.threaded.server.metrics_address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in metrics:\n{text}")


def test_metrics_after_real_traffic(start_relay, upstream):
    relay = start_relay(upstream_url(upstream), metrics=MetricsConfig(Endpoint("127.0.0.1", 0)))
    pair = relay.pair()
    with smtplib.SMTP(relay.host, relay.port) as client:
        for n in range(3):
            client.sendmail(pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias,
                                                                     message_id=f"<m{n}@x>"))
        client.mail(pair.buyer)
        assert client.rcpt("stranger@elsewhere.example")[0] == 550
        client.rset()
        client.mail(pair.buyer)
        client.rcpt(pair.seller_alias)
        assert client.data(message("eve@evil.example", pair.seller_alias))[0] == 550
        status, text = scrape(relay)
        assert status == 200
        assert value(text, 'relay_open_connections{listener="inbound"}') == 1
    assert value(text, 'relay_messages_total{direction="buyer_to_seller",verdict="delivered"}') == 3
    assert value(text, 'relay_messages_total{direction="buyer_to_seller",verdict="rejected"}') == 1
    assert value(text, 'relay_rejections_total{code="550",enhanced="5.1.1",stage="rcpt"}') == 1
    assert value(text, 'relay_rejections_total{code="550",enhanced="5.7.1",stage="data"}') == 1
    assert value(text, "relay_upstream_seconds_count") == 3
    assert value(text, "relay_archive_rows") == 4
    assert value(text, "relay_archive_bytes") > 0
    assert value(text, "relay_messages_in_flight") == 0


def test_healthz(start_relay, upstream):
    relay = start_relay(upstream_url(upstream), metrics=MetricsConfig(Endpoint("127.0.0.1", 0)))
    assert scrape(relay, "/healthz") == (200, "ok\n")
    assert scrape(relay, "/nope")[0] == 404


def test_healthz_reports_a_dead_upstream(start_relay):
    relay = start_relay(f"smtp://127.0.0.1:{closed_port()}", metrics=MetricsConfig(Endpoint("127.0.0.1", 0)))
    status, text = scrape(relay, "/healthz")
    assert status == 503
    assert text.startswith("upstream: ")
    assert "store" not in text


def dsn(verp: str, about: str, action: str) -> bytes:
    """A delivery status notification (RFC 3464) for a message to `about`."""
    return ("From: MAILER-DAEMON@mx.shop.example\r\nTo: {verp}\r\nSubject: Delivery Status\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
            "--B\r\nContent-Type: text/plain\r\n\r\nAbout your message.\r\n"
            "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.shop.example\r\n\r\n"
            f"Final-Recipient: rfc822; {about}\r\nAction: {action}\r\n"
            f"Status: {'5.1.1' if action == 'failed' else '4.4.7'}\r\n--B--\r\n").replace("{verp}", verp).encode()


def test_bounce_login_and_store_error_counters(start_relay, upstream):
    """After real traffic: one bounce of each outcome, failed logins of each
    reason, and a store error of each kind, all on /metrics."""
    if support.database_factory is not None:
        pytest.skip("locks and limits the SQLite file")
    relay = start_relay(upstream_url(upstream), metrics=MetricsConfig(Endpoint("127.0.0.1", 0)),
                        submission={"failure_delay": 0.01, "max_failure_delay": 0.02, "max_failures": 2})
    status, text = scrape(relay)
    # Every series is there before its first event.
    for series in ('relay_bounces_total{outcome="unknown"}', 'relay_failed_logins_total{reason="blocked"}',
                   'relay_store_errors_total{kind="value"}'):
        assert value(text, series) == 0
    pair = relay.pair()
    with smtplib.SMTP(relay.host, relay.port) as client:
        for n in range(2):
            client.sendmail(pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias,
                                                                     message_id=f"<m{n}@x>"))
    first, second = (got.mail_from for got in upstream.wait_for(2))
    with smtplib.SMTP(relay.host, relay.port) as client:
        client.sendmail("", [first], dsn(first, pair.seller, "failed"))  # the buyer gets a notice
        client.sendmail("", [second], dsn(second, pair.seller, "delayed"))  # recorded only
        client.mail("")
        forged = first.replace("bounce+", "bounce+0")
        assert client.rcpt(forged)[0] == 550
    assert [got.rcpt_tos for got in upstream.wait_for(3)][2] == [pair.buyer]

    # Submission: a wrong password, bad AUTH data, then the address is blocked.
    relay.call(relay.store.set_password_hash(pair.seller, auth.hash_password("right")))
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the relay's self-signed pair

    def plain(password: str) -> str:
        return "PLAIN " + base64.b64encode(f"\0{pair.seller}\0{password}".encode()).decode()

    with smtplib.SMTP_SSL("127.0.0.1", relay.submission_tls_port, context=context, timeout=30) as client:
        client.ehlo()
        assert client.docmd("AUTH", "PLAIN !!!")[0] == 501
        assert [client.docmd("AUTH", plain("wrong"))[0] for _ in range(2)] == [535, 535]
    with smtplib.SMTP_SSL("127.0.0.1", relay.submission_tls_port, context=context, timeout=30) as client:
        client.ehlo()
        assert client.docmd("AUTH", plain("right"))[0] == 421

    # The store: locked by another process past the busy timeout (state), and
    # a value longer than the connection takes (value; see test_failures.py).
    connection = relay.store._db
    relay.call(connection.execute("PRAGMA busy_timeout = 100"))
    locker = sqlite3.connect(relay.config.database)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with smtplib.SMTP(relay.host, relay.port) as client:
            with pytest.raises(smtplib.SMTPDataError) as deferred:
                client.sendmail(pair.buyer, [pair.seller_alias], message(pair.buyer, pair.seller_alias))
    finally:
        locker.rollback()
        locker.close()
    assert deferred.value.smtp_code == 451
    default = relay.call(connection._execute(connection._conn.getlimit, sqlite3.SQLITE_LIMIT_LENGTH))
    relay.call(connection._execute(connection._conn.setlimit, sqlite3.SQLITE_LIMIT_LENGTH, 600))
    try:
        long_id = b"<" + b"\xe9" * 200 + b"@client.example>"
        raw = message(pair.buyer, pair.seller_alias, headers={"References": "<REF>"}).replace(b"<REF>", long_id)
        with smtplib.SMTP(relay.host, relay.port) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail(pair.buyer, [pair.seller_alias], raw)
    finally:
        relay.call(connection._execute(connection._conn.setlimit, sqlite3.SQLITE_LIMIT_LENGTH, default))
    assert refused.value.smtp_code == 554

    status, text = scrape(relay)
    assert status == 200
    assert [value(text, f'relay_bounces_total{{outcome="{outcome}"}}')
            for outcome in ("notified", "recorded", "unknown")] == [1, 1, 1]
    assert [value(text, f'relay_failed_logins_total{{reason="{reason}"}}')
            for reason in ("credentials", "malformed", "blocked")] == [2, 1, 1]
    assert [value(text, f'relay_store_errors_total{{kind="{kind}"}}') for kind in ("state", "value")] == [1, 1]
