"""Hostile and broken input is normal input: every case gets a clear reply,
nothing leaks, and the server keeps serving."""

from __future__ import annotations

import base64
import socket
import smtplib

import pytest

from support import message

HEAD = "From: {buyer}\r\nTo: {alias}\r\nSubject: x\r\n"


def nested(depth: int) -> str:
    opening = "".join(f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n" for i in range(depth))
    closing = "".join(f"--b{i}--\r\n" for i in reversed(range(depth)))
    return opening + "Content-Type: text/plain\r\n\r\nhello {buyer}\r\n" + closing


CASES = [
    ("no-headers-at-all", b"\xff\xfe\x00 garbage\r\n", 550, "5.7.1"),
    ("headers-only", HEAD.encode(), 250, "2.0.0"),
    ("nul-bytes", (HEAD + "\r\n\x00\x00 {buyer} \x00\r\n").encode(), 250, "2.0.0"),
    ("8bit-subject", b"From: {buyer}\r\nSubject: caf\xe9 {buyer} \xff\r\n\r\nbody\r\n", 250, "2.0.0"),
    ("broken-base64", (HEAD + "Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                       "!!!not base64 {buyer}===\r\n").encode(), 250, "2.0.0"),
    ("unknown-charset", (HEAD + "Content-Type: text/plain; charset=x-unknown\r\n\r\n").encode()
     + b"\xe9\xe8 {buyer}\r\n", 250, "2.0.0"),
    ("multipart-without-boundary", (HEAD + "Content-Type: multipart/mixed\r\n\r\n--x\r\n{buyer}\r\n").encode(),
     250, "2.0.0"),
    ("unterminated-multipart", (HEAD + 'Content-Type: multipart/mixed; boundary="zz"\r\n\r\n--zz\r\n'
                                "Content-Type: text/html\r\n\r\n<a href=\"mailto:{buyer}\">me</a>\r\n").encode(),
     250, "2.0.0"),
    # The stdlib's header parser raises IndexError on this parameter; the
    # cause is in the message, so the refusal is permanent (not 451 forever).
    ("content-type-bare-star-parameter", (HEAD + "Content-Type: text/plain; Q*\r\n\r\n{buyer}\r\n").encode(),
     554, "5.6.0"),
    # Charset names Python knows but that are no text encodings, or that
    # refuse these bytes: read as latin-1, never "451" forever.
    ("charset-hex", (HEAD + "Content-Type: text/plain; charset=hex\r\n\r\nhi {buyer}\r\n").encode(), 250, "2.0.0"),
    ("charset-zlib", (HEAD + "Content-Type: text/plain; charset=zlib\r\n\r\nhi {buyer}\r\n").encode(), 250, "2.0.0"),
    ("charset-utf16-odd-bytes", (HEAD + "Content-Type: text/plain; charset=utf-16\r\n\r\nabc {buyer}\r\n").encode(),
     250, "2.0.0"),
    ("nested-40-deep", (HEAD + nested(40)).encode(), 250, "2.0.0"),
    ("nested-200-deep", (HEAD + nested(200)).encode(), 554, "5.6.0"),
    ("nested-3000-deep", (HEAD + nested(3000)).encode(), 554, "5.6.0"),
    ("20000-headers", (HEAD + "".join(f"X-H{i}: {{buyer}}\r\n" for i in range(20000)) + "\r\nbody\r\n").encode(),
     250, "2.0.0"),
    ("100000-references", (HEAD + "References: " + "\r\n ".join(f"<{i}@x>" for i in range(100000))
                           + "\r\n\r\nb\r\n").encode(), 250, "2.0.0"),
    ("utf16-text", (HEAD + "Content-Type: text/plain; charset=utf-16\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                    ).encode() + b"@UTF16@", 250, "2.0.0"),
]


@pytest.mark.parametrize("raw, code, enhanced", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_message(relay, upstream, raw, code, enhanced):
    pair = relay.pair()
    if b"@UTF16@" in raw:
        raw = raw.replace(b"@UTF16@", base64.encodebytes(f"hi {pair.buyer}".encode("utf-16")).replace(b"\n", b"\r\n"))
    raw = raw.replace(b"{buyer}", pair.buyer.encode()).replace(b"{alias}", pair.seller_alias.encode())
    with smtplib.SMTP(relay.host, relay.port, timeout=120) as client:
        client.ehlo()
        client.mail(pair.buyer)
        client.rcpt(pair.seller_alias)
        got_code, text = client.data(raw)
        assert (got_code, text[:5].decode()) == (code, enhanced), text
        # Still serving on the same connection.
        assert client.noop()[0] == 250
    if code == 250:
        [got] = upstream.wait_for(1)
        assert pair.buyer.encode() not in got.data.lower()
        assert pair.buyer.encode("utf-16")[2:] not in got.data
    else:
        assert upstream.messages == []
    [row] = relay.archive_rows()
    assert row["raw"] == raw


def raw_session(relay, payload: bytes) -> bytes:
    """Speak SMTP byte by byte, as a smuggling client would."""
    with socket.create_connection((relay.host, relay.port), timeout=30) as sock:
        sock.sendall(payload)
        # No half-close: aiosmtpd drops buffered commands on EOF. Read until
        # the server says goodbye to our QUIT and closes.
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if b"221 " in b"".join(chunks):
                break
    return b"".join(chunks)


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"],
                         ids=["LF.LF", "LF.CRLF", "CRLF.LF", "CR.CRLF"])
def test_smtp_smuggling_does_not_start_a_second_message(relay, upstream, fake_end):
    pair = relay.pair()
    stranger = "stranger@evil.example"
    smuggled = (f"MAIL FROM:<{pair.buyer}>\r\nRCPT TO:<{pair.seller_alias}>\r\nDATA\r\n"
                f"From: {pair.buyer}\r\nSubject: smuggled\r\n\r\nfrom {stranger}\r\n").encode()
    payload = (b"EHLO client.example\r\n"
               + f"MAIL FROM:<{pair.buyer}>\r\nRCPT TO:<{pair.seller_alias}>\r\nDATA\r\n".encode()
               + message(pair.buyer, pair.seller_alias, subject="honest")
               + fake_end + smuggled + b"\r\n.\r\nQUIT\r\n")
    replies = raw_session(relay, payload)
    # A fake end (a dot line after or before a bare LF, or a bare CR) is
    # refused, not read as CRLF: the whole of it was one DATA, refused, and
    # the smuggled transaction never ran.
    assert b"550 5.6.11 " in replies
    assert b"250 2.0.0" not in replies
    assert upstream.messages == []


def test_commands_before_helo_and_garbage_lines(relay):
    replies = raw_session(relay, b"MAIL FROM:<a@b>\r\n\x00\xff\xfe\r\nRCPT TO:<x>\r\nQUIT\r\n")
    lines = replies.split(b"\r\n")
    assert lines[0].startswith(b"220 ")
    assert all(not line.startswith(b"451 4.3.0 Internal") for line in lines)
    assert b"221" in replies
