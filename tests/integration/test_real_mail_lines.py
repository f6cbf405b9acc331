"""Real mail's line endings and line lengths, end to end (issue 14 §3):
smtplib speaks to a running relay, and the assertions are on the bytes the
recording upstream got. A script's bare-LF message is delivered with CRLF
only; lines of thousands of octets (a client's, or the sanitizer's own
output) are delivered in lines of at most 998 octets and decode to the
original text; a line over 64 KiB is refused; `[inbound] bare_newline =
"reject"` keeps the old refusal."""

from __future__ import annotations

import email
import smtplib
from dataclasses import replace
from email import policy
from email.message import EmailMessage

import pytest

from support import RunningRelay, make_config, upstream_url

MAX = 998


def longest_line(data: bytes) -> int:
    return max(len(line) for line in data.split(b"\r\n"))


def assert_crlf_only(data: bytes) -> None:
    assert data.count(b"\r") == data.count(b"\r\n") == data.count(b"\n"), "bare CR or LF delivered"


def sendmail(relay, sender, recipient, raw: bytes) -> None:
    with smtplib.SMTP(relay.host, relay.port, timeout=120) as client:
        client.sendmail(sender, [recipient], raw)


def parsed(data: bytes):
    return email.message_from_bytes(data, policy=policy.SMTP)


def lf_message(sender, to, body: str, subject="lf") -> bytes:
    msg = EmailMessage()  # the default policy: LF line ends, as scripts send them
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg.set_content(body)
    return msg.as_bytes()


def test_bare_lf_message_from_smtplib_is_delivered_with_crlf_only(relay, upstream):
    pair = relay.pair()
    raw = lf_message(pair.buyer, pair.seller_alias, "line one\nline two\n\nafter a blank line\n")
    assert b"\r" not in raw and b"\n" in raw
    sendmail(relay, pair.buyer, pair.seller_alias, raw)
    [got] = upstream.wait_for(1)
    assert_crlf_only(got.data)
    body = parsed(got.data).get_body().get_content()
    # smtplib adds a CRLF after data that does not end in one: a last empty line.
    assert body.replace("\r\n", "\n").rstrip("\n") == "line one\nline two\n\nafter a blank line"


def test_bare_lf_is_refused_with_the_strict_switch(tmp_path, upstream):
    config = make_config(tmp_path, upstream_url(upstream))
    relay = RunningRelay(replace(config, inbound=replace(config.inbound, bare_newline="reject")))
    try:
        pair = relay.pair()
        raw = lf_message(pair.buyer, pair.seller_alias, "line one\nline two\n")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            sendmail(relay, pair.buyer, pair.seller_alias, raw)
        assert refused.value.smtp_code == 550 and refused.value.smtp_error.startswith(b"5.6.11"), refused.value
        assert upstream.messages == []
    finally:
        relay.stop()


def long_line_message(sender, to, line: str, cte: str = "8bit", ctype="text/plain") -> bytes:
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: long\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: {ctype}; charset=utf-8\r\nContent-Transfer-Encoding: {cte}\r\n\r\n")
    return (head + f"start\r\n{line}\r\nend\r\n").encode("utf-8")


def test_a_5000_octet_line_is_delivered_in_lines_of_998_at_most(relay, upstream):
    pair = relay.pair()
    line = ("Ünïcode words and more words " * 200)[:4000] + "x" * 1000
    assert len(line.encode()) > 5000
    sendmail(relay, pair.buyer, pair.seller_alias, long_line_message(pair.buyer, pair.seller_alias, line))
    [got] = upstream.wait_for(1)
    assert longest_line(got.data) <= MAX
    assert_crlf_only(got.data)
    part = parsed(got.data)
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_content_charset() == "utf-8"
    decoded = part.get_payload(decode=True).replace(b"\r\n", b"\n")
    assert decoded == f"start\n{line}\nend\n".encode()


def test_a_short_line_part_is_left_as_it_came(relay, upstream):
    pair = relay.pair()
    raw = long_line_message(pair.buyer, pair.seller_alias, "Ünïcode, but short")
    sendmail(relay, pair.buyer, pair.seller_alias, raw)
    [got] = upstream.wait_for(1)
    part = parsed(got.data)
    assert part["Content-Transfer-Encoding"] == "8bit"
    assert got.data.endswith(b"\r\n\r\nstart\r\n" + "Ünïcode, but short".encode() + b"\r\nend\r\n")


def test_the_sanitizers_long_html_lines_are_delivered_in_lines_of_998_at_most(relay, upstream):
    pair = relay.pair()
    cells = "".join(f'<td style="color:red" onclick="x()">cell {i} ünï</td>' for i in range(60))
    html = f"<html><body><table><tr>{cells}</tr></table><p>end</p></body></html>"
    assert len(html.encode()) > 2000
    boundary = "b0undary"
    raw = (f"From: {pair.buyer}\r\nTo: {pair.seller_alias}\r\nSubject: html\r\nMIME-Version: 1.0\r\n"
           f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'
           f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nsee the HTML\r\n"
           f"--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           f"{html}\r\n--{boundary}--\r\n").encode()
    sendmail(relay, pair.buyer, pair.seller_alias, raw)
    [got] = upstream.wait_for(1)
    assert longest_line(got.data) <= MAX
    [html_part] = [p for p in parsed(got.data).walk() if p.get_content_type() == "text/html"]
    delivered = html_part.get_content()
    assert "onclick" not in delivered  # the sanitizer ran
    assert "cell 59 ünï" in delivered


def test_a_line_over_64KB_is_refused(relay, upstream):
    pair = relay.pair()
    raw = long_line_message(pair.buyer, pair.seller_alias, "x" * (64 * 1024 + 1))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        sendmail(relay, pair.buyer, pair.seller_alias, raw)
    assert refused.value.smtp_code == 500 and refused.value.smtp_error.startswith(b"5.5.2 Line too long")
    assert upstream.messages == []
