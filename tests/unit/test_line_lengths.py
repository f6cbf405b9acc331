"""relay/pipeline/lines.py: parts and headers with lines over 998 octets are
re-encoded or refolded, their content unchanged after decoding; parts
within the limit are not touched."""

from __future__ import annotations

import base64

from relay.pipeline import lines
from relay.pipeline.message import parse, serialize


def build(body: bytes, ctype="text/plain; charset=utf-8", cte="8bit", extra=b"") -> bytes:
    return (b"From: a@b.example\r\nSubject: s\r\nMIME-Version: 1.0\r\n" + extra
            + f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n".encode() + body)


def run(raw: bytes):
    message = parse(raw)
    changes: list[str] = []
    lines.limit_line_lengths(message, None, changes)
    return serialize(message), changes


def longest(data: bytes) -> int:
    return max(len(line) for line in data.split(b"\r\n"))


def test_too_long_counts_octets_not_characters():
    assert not lines.too_long("x" * 998)
    assert lines.too_long("x" * 999)
    assert lines.too_long("é" * 500)  # 1000 octets in UTF-8
    assert not lines.too_long(("x" * 998 + "\n") * 3)


def test_a_long_text_line_becomes_quoted_printable_with_the_same_content():
    text = ("naïve café = 100% " * 400).encode()
    raw = build(b"first\r\n" + text + b"\r\n\tlast \r\n")
    out, changes = run(raw)
    assert longest(out) <= 998
    part = parse(out)
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_content_charset() == "utf-8"
    assert part.get_payload(decode=True).replace(b"\r\n", b"\n") == b"first\n" + text + b"\n\tlast \n"
    assert changes == ["re-encoded a text part as quoted-printable: a line over 998 octets"]


def test_a_long_quoted_printable_line_is_reencoded_too():
    data = b"=41" * 400  # 1200 octets on one line, "A" * 400 decoded
    out, _ = run(build(data + b"\r\n", cte="quoted-printable"))
    assert longest(out) <= 998
    assert parse(out).get_payload(decode=True).rstrip(b"\r\n") == b"A" * 400


def test_a_long_non_text_line_becomes_base64():
    data = bytes(range(1, 256)) .replace(b"\r", b"").replace(b"\n", b"") * 10
    out, changes = run(build(data + b"\r\n", ctype="application/octet-stream", cte="binary"))
    assert longest(out) <= 998
    part = parse(out)
    assert part["Content-Transfer-Encoding"] == "base64"
    assert part.get_payload(decode=True) == data + b"\r\n"
    assert base64.b64decode(part.get_payload()) == data + b"\r\n"
    assert changes == ["re-encoded a application part as base64: a line over 998 octets"]


def test_parts_within_the_limit_stay_byte_for_byte():
    short = b"line\r\n" * 5 + b"y" * 998 + b"\r\n"
    raw = (b"From: a@b.example\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
           b"--B\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + short
           + b"--B\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           + b"<p>" + b"z" * 3000 + b"</p>\r\n--B--\r\n")
    out, changes = run(raw)
    assert longest(out) <= 998
    assert b"Content-Transfer-Encoding: 8bit\r\n\r\n" + short + b"--B\r\n" in out
    assert len(changes) == 1
    [_, html] = [p for p in parse(out).walk() if not p.is_multipart()]
    assert html.get_payload(decode=True).rstrip(b"\r\n") == b"<p>" + b"z" * 3000 + b"</p>"


def test_a_long_header_is_refolded_and_reads_the_same():
    subject = "word " * 300 + "x" * 1500
    out, changes = run(build(b"hi\r\n", extra=f"X-Long: {subject}\r\n".encode()))
    assert longest(out) <= 998
    assert str(parse(out)["X-Long"]) == subject.strip()
    assert changes == ["refolded the X-Long header: a line over 998 octets"]
