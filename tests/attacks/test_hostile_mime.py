"""Messages built to exhaust or confuse the parser: deep nesting, a
hundred thousand parts, fifty thousand header fields, header injection
through RFC 2047 encoded-words, and a message slower to process than the
worker time limit. Each gets a clear reply; a refusal delivers nothing, an
acceptance delivers exactly once and leaks no address."""

from __future__ import annotations

import base64
import email
from email.header import decode_header, make_header
from email import policy

import pytest

from attack_support import Client, field_names, header_block, header_lines
from support import message

VICTIM = "victim@evil.example"


def head(pair) -> str:
    return (f"From: {pair.buyer}\r\nTo: {pair.seller_alias}\r\nSubject: hostile\r\n"
            "Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n")


def nested(depth: int, pair) -> bytes:
    opening = "".join(f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n" for i in range(depth))
    closing = "".join(f"--b{i}--\r\n" for i in reversed(range(depth)))
    return (head(pair) + opening + f"Content-Type: text/plain\r\n\r\nhello {pair.buyer}\r\n" + closing).encode()


def many_parts(count: int, pair) -> bytes:
    parts = "--p\r\nContent-Type: text/plain\r\n\r\nx\r\n" * count
    return (head(pair) + 'Content-Type: multipart/mixed; boundary="p"\r\n\r\n' + parts + "--p--\r\n").encode()


def send(relay, raw: bytes):
    pair = relay.main
    with Client(relay.port, timeout=120).hello() as client:
        reply = client.transaction(pair.buyer, pair.seller_alias, raw)
        # Whatever the verdict, the session is still there.
        assert client.command("NOOP").code == 250
    return reply


@pytest.mark.parametrize("build", [lambda p: nested(1000, p), lambda p: many_parts(100_000, p)],
                         ids=["1000-deep-multipart", "100000-parts"])
def test_structure_bombs_are_refused(start, upstream, build):
    relay = start()
    raw = build(relay.main)
    assert len(raw) < relay.config.size_limit
    reply = send(relay, raw)
    assert reply.key == (554, "5.6.0"), reply
    assert upstream.messages == []
    [row] = relay.archive_rows()
    assert row["verdict"] == "rejected"


def test_fifty_thousand_header_fields(start, upstream):
    """Refused as unparseable or delivered once with every field but the
    allowed ones dropped: never a 250 with nothing delivered, never the
    sender's address."""
    relay = start()
    pair = relay.main
    fields = "".join(f"X-Field-{i}: {pair.buyer}\r\n" for i in range(50_000))
    raw = (head(pair) + fields + "\r\nbody\r\n").encode()
    assert len(raw) < relay.config.size_limit
    reply = send(relay, raw)
    assert reply.key in ((554, "5.6.0"), (250, "2.0.0")), reply
    if reply.code == 250:
        [got] = upstream.wait_for(1)
        assert pair.buyer.encode() not in got.data.lower()
        assert not any(name.startswith("x-field-") for name in field_names(got.data))
    else:
        assert upstream.messages == []
    [row] = relay.archive_rows()  # nothing lost: the message as sent is in the archive
    assert row["raw"] == raw


def b_word(text: str) -> str:
    return "=?utf-8?b?" + base64.b64encode(text.encode()).decode() + "?="


# (name, header lines replacing the honest Subject/From); {buyer} is the sender's real address.
INJECTIONS = [
    ("subject-q-CRLF-Bcc", {"Subject": f"=?utf-8?q?hi=0D=0ABcc:_{VICTIM}?="}),
    ("subject-b-CRLF-To", {"Subject": b_word(f"x\r\nTo: {VICTIM}")}),
    ("subject-b-CRLF-CRLF-body", {"Subject": b_word(f"x\r\n\r\nBcc: {VICTIM}\r\n")}),
    ("subject-q-LF-Cc", {"Subject": f"=?utf-8?q?x=0ACc:_{VICTIM}?="}),
    ("subject-names-sender", {"Subject": "=?utf-8?q?write_to_{buyer}?="}),
    ("subject-b-names-sender", {"Subject": b_word("write to {buyer}\r\nReply-To: {buyer}")}),
    ("from-display-q-CRLF-Bcc", {"From": f"=?utf-8?q?Bea=0D=0ABcc:_{VICTIM}?= <{{buyer}}>"}),
    ("from-display-b-CRLF-To", {"From": b_word(f"Bea\r\nTo: {VICTIM}") + " <{buyer}>"}),
    ("from-display-b-names-sender", {"From": b_word("{buyer}") + " <{buyer}>"}),
    ("from-display-q-fake-address", {"From": f"=?utf-8?q?{VICTIM}_=3C{VICTIM}=3E?= <{{buyer}}>"}),
]


def injected_message(pair, fields: dict[str, str]) -> bytes:
    values = {"From": pair.buyer, "To": pair.seller_alias, "Subject": "hello",
              "Date": "Thu, 26 Nov 2026 10:00:00 +0000", "Message-ID": "<m1@client.example>"}
    values.update({k: v.replace("{buyer}", pair.buyer) for k, v in fields.items()})
    return ("".join(f"{k}: {v}\r\n" for k, v in values.items()) + "\r\nHello.\r\n").encode()


@pytest.mark.parametrize("fields", [c[1] for c in INJECTIONS], ids=[c[0] for c in INJECTIONS])
def test_encoded_word_header_injection(start, upstream, fields):
    relay = start()
    pair = relay.main
    reply = send(relay, injected_message(pair, fields))
    shown = str(make_header(decode_header(fields.get("From", ""))))
    if "\r" in shown or "\n" in shown:
        # A display name that decodes to a line break: the email package
        # refuses to read such a From, and the relay refuses the message.
        assert reply.key == (554, "5.6.0"), reply
        assert upstream.messages == []
        return
    assert reply.key == (250, "2.0.0"), reply
    [got] = upstream.wait_for(1)
    names = field_names(got.data)
    assert "bcc" not in names and "cc" not in names and "reply-to" not in names, names
    assert names.count("to") == 1 and names.count("from") == 1 and names.count("subject") <= 1, names
    # The recipient's own address is in To: by design; nothing else real,
    # neither in the bytes nor once the encoded-words are decoded.
    parsed = email.message_from_bytes(got.data, policy=policy.default)
    for line in header_lines(got.data):
        name = line.split(b":", 1)[0].decode().lower()
        decoded = str(parsed[name]).lower() if parsed[name] is not None else ""
        for address in (pair.buyer, VICTIM) + ((pair.seller,) if name != "to" else ()):
            assert address.encode() not in line.lower(), line
            assert address not in decoded, (name, decoded)
    assert VICTIM.encode() not in header_block(got.data).lower()
    assert str(parsed["To"]).lower().endswith(f"<{pair.seller}>") or str(parsed["To"]).lower() == pair.seller


def slow_message(pair) -> bytes:
    """A valid message that keeps a worker busy for seconds (about 5 s on
    the machine this was written on): a 1.7 MB text part in which every
    line has addresses and a link to rewrite."""
    body = "".join(f"write to someone{i}@mail{i}.example or {pair.buyer} http://a{i}.example/\r\n"
                   for i in range(20_000))
    return (head(pair) + "\r\n" + body).encode()


def test_worker_time_limit_refuses_and_the_next_message_goes_through(start, upstream):
    relay = start(workers={"count": 1, "time_limit": 1.0})
    pair = relay.main
    raw = slow_message(pair)
    assert len(raw) < relay.config.size_limit
    reply = send(relay, raw)
    assert reply.key == (554, "5.6.0"), reply
    assert upstream.messages == []
    [row] = relay.archive_rows()
    assert row["verdict"] == "rejected"
    assert row["reply"] == reply.lines[-1]
    # The worker was replaced: the next message is processed.
    with Client(relay.port, timeout=60).hello() as client:
        reply = client.transaction(pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))
        assert reply.key == (250, "2.0.0"), reply
    assert len(upstream.wait_for(1)) == 1
