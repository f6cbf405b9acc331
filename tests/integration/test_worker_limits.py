"""Per-message time and memory limits of the worker processes, end to end:
a message over them is refused `554 5.6.0` and archived as rejected, its
worker replaced, and the relay goes on serving."""

from __future__ import annotations

import base64
import os
import smtplib
import threading
import time
from dataclasses import replace

import pytest

from relay.config import Config
from support import RunningRelay, message, upstream_url


@pytest.fixture
def limited_relay(start_relay, upstream):
    def start(**workers) -> RunningRelay:
        return start_relay(upstream_url(upstream), workers=replace(Config().workers, count=1, **workers))
    return start


def send(relay, pair, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP(relay.host, relay.port, timeout=60) as client:
        client.ehlo()
        client.mail(pair.buyer)
        client.rcpt(pair.seller_alias)
        return client.data(data)


def heavy_html(pair) -> bytes:
    """A message whose HTML takes the sanitizer a good while: 400 KB of
    nested markup with many links."""
    chunk = ('<div><p>Offer <a href="http://elsewhere.example/x">here</a> '
             '<span style="color:red">now</span></p></div>\n')
    html = "<html><body>" + chunk * 5000 + "</body></html>"
    return (f"From: {pair.buyer}\r\nTo: {pair.seller_alias}\r\nSubject: heavy\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode() \
        + base64.encodebytes(html.encode()).replace(b"\n", b"\r\n")


def with_attachment(pair, size: int) -> bytes:
    pdf = b"%PDF-1.4\n" + os.urandom(size)
    return (f"From: {pair.buyer}\r\nTo: {pair.seller_alias}\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=BB\r\n\r\n--BB\r\nContent-Type: text/plain\r\n\r\n"
            "See the attachment.\r\n--BB\r\nContent-Type: application/pdf; name=a.pdf\r\n"
            "Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=a.pdf\r\n\r\n"
            ).encode() + base64.encodebytes(pdf).replace(b"\n", b"\r\n") + b"--BB--\r\n"


def test_a_message_over_the_time_limit_is_554_and_archived_as_rejected(limited_relay, upstream):
    relay = limited_relay(time_limit=0.5)
    pair = relay.pair()
    code, text = send(relay, pair, heavy_html(pair))
    assert (code, text.split(b" ", 1)[0]) == (554, b"5.6.0")
    assert b"time or memory limit" in text
    assert upstream.messages == []
    [row] = relay.archive_rows()
    assert row["verdict"] == "rejected"
    assert any("time limit" in change for change in row["changes"])
    assert relay.threaded.server.workers.replaced == 1
    # The replacement worker takes the next message.
    code, _ = send(relay, pair, message(pair.buyer, pair.seller_alias, subject="small"))
    assert code == 250
    [got] = upstream.wait_for(1)
    assert b"Subject: small" in got.data


def test_a_message_over_the_memory_limit_is_554_and_the_relay_goes_on(limited_relay, upstream):
    relay = limited_relay(memory_limit_mb=64)
    pair = relay.pair()
    code, text = send(relay, pair, with_attachment(pair, 6_000_000))
    assert (code, text.split(b" ", 1)[0]) == (554, b"5.6.0"), text
    assert b"time or memory limit" in text
    assert upstream.messages == []
    [row] = relay.archive_rows()
    assert row["verdict"] == "rejected"
    assert any("memory limit" in change for change in row["changes"]), row["changes"]
    code, _ = send(relay, pair, message(pair.buyer, pair.seller_alias, subject="small"))
    assert code == 250
    assert len(upstream.wait_for(1)) == 1


def test_other_clients_are_served_while_a_worker_is_busy(limited_relay, upstream):
    """One worker sanitizing a heavy message: a second client still gets its
    greeting, EHLO and RCPT answered (the event loop is free), and its own
    message is delivered once the worker is free."""
    relay = limited_relay(time_limit=60)
    pair = relay.pair()
    heavy_reply = []
    heavy = threading.Thread(target=lambda: heavy_reply.append(send(relay, pair, heavy_html(pair))))
    heavy.start()
    handler = relay.threaded.server.handler
    for _ in range(3000):  # until the heavy message is in the worker (bounded: 30 s)
        if handler.in_flight:
            break
        time.sleep(0.01)
    assert handler.in_flight == 1
    with smtplib.SMTP(relay.host, relay.port, timeout=60) as client:
        assert client.ehlo()[0] == 250
        assert client.mail(pair.buyer)[0] == 250
        assert client.rcpt(pair.seller_alias)[0] == 250
        assert client.noop()[0] == 250
        # All answered while the only worker was still sanitizing.
        assert heavy_reply == []
        code, _ = client.data(message(pair.buyer, pair.seller_alias, subject="light"))
        assert code == 250
    heavy.join(timeout=120)
    assert heavy_reply and heavy_reply[0][0] == 250
    subjects = sorted(b"Subject: light" in m.data for m in upstream.wait_for(2))
    assert subjects == [False, True]
