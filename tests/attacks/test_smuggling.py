"""SMTP smuggling: an end of data that one server reads differently from
the next. The end of data is CRLF.CRLF only. A bare CR, and a dot line
that a lenient server would take for the end (LF.LF, LF.CRLF, CRLF.LF),
are refused (550 5.6.11), so a second transaction hidden behind a fake end
is never executed and nothing of it is delivered; a NUL before the dot is
no line ending at all, and the message is one honest message. A bare LF
elsewhere is read as CRLF (postfix's `smtpd_forbid_bare_newline = normal`)
and what is delivered has CRLF only; `[inbound] bare_newline = "reject"`
refuses it too."""

from __future__ import annotations

import pytest

from attack_support import Client, dot_stuff, field_names, header_block
from support import message

SMUGGLED_SUBJECT = b"smuggled-7f3a"


def smuggled_transaction(pair) -> bytes:
    return (f"MAIL FROM:<{pair.buyer}>\r\nRCPT TO:<{pair.seller_alias}>\r\nDATA\r\n"
            f"From: {pair.buyer}\r\nTo: {pair.seller_alias}\r\nSubject: ").encode() + SMUGGLED_SUBJECT \
        + b"\r\n\r\nfrom stranger@evil.example\r\n"


def open_transaction(relay) -> Client:
    pair = relay.main
    client = Client(relay.port).hello()
    assert client.command(f"MAIL FROM:<{pair.buyer}>").code == 250
    assert client.command(f"RCPT TO:<{pair.seller_alias}>").code == 250
    reply = client.command("DATA")
    assert reply.code == 354, reply
    return client


def finish(client) -> list:
    """QUIT, and every reply the server still had to give (the 221 only,
    unless some smuggled command was executed)."""
    client.send(b"QUIT\r\n")
    return client.remaining_replies()


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r"],
                         ids=["LF.LF", "LF.CRLF", "CR.CRLF", "CRLF.LF", "CRLF.CR"])
def test_fake_end_of_data_refuses_the_whole_message(start, upstream, fake_end):
    relay = start()
    pair = relay.main
    client = open_transaction(relay)
    honest = message(pair.buyer, pair.seller_alias, subject="honest")
    # One write: the honest message, the fake end, a whole second
    # transaction, and only then the real end of data.
    client.send(dot_stuff(honest)[:-2] + fake_end + smuggled_transaction(pair) + b"\r\n.\r\n")
    reply = client.reply()
    assert reply.key == (550, "5.6.11"), reply
    rest = finish(client)
    assert [r.code for r in rest] == [221], [str(r) for r in rest]  # no reply to a smuggled MAIL/RCPT/DATA
    assert upstream.messages == []


BARE_CR = [
    ("CR-in-header", lambda m: m.replace(b"Subject: x\r\n", b"Subject: x\rBcc: victim@evil.example\r\n")),
    ("CR-in-body", lambda m: m.replace(b"Hi there.\r\n", b"Hi\rthere.\r\n")),
    ("CR-before-CRLF", lambda m: m.replace(b"Hi there.\r\n", b"Hi there.\r\r\n")),
]
BARE_LF = [
    ("LF-in-header", lambda m: m.replace(b"Subject: x\r\n", b"Subject: x\nX-Extra: one\r\n")),
    ("LF-in-body", lambda m: m.replace(b"Hi there.\r\n", b"Hi\nthere.\r\n")),
    ("LF-only-line", lambda m: m.replace(b"Hi there.\r\n", b"Hi there.\r\n\n\r\n")),
    ("LF-line-endings-throughout", lambda m: m.replace(b"\r\n", b"\n")[:-1] + b"\r\n"),
]


def assert_crlf_only(data: bytes) -> None:
    assert data.count(b"\r") == data.count(b"\r\n") == data.count(b"\n"), "bare CR or LF delivered"


@pytest.mark.parametrize("mangle", [c[1] for c in BARE_LF], ids=[c[0] for c in BARE_LF])
def test_bare_lf_is_read_as_crlf_and_delivered_with_crlf_only(start, upstream, mangle):
    relay = start()
    pair = relay.main
    client = Client(relay.port).hello()
    raw = mangle(message(pair.buyer, pair.seller_alias, subject="x"))
    reply = client.transaction(pair.buyer, pair.seller_alias, raw)
    assert reply.key == (250, "2.0.0"), reply
    assert [r.code for r in finish(client)] == [221]
    [got] = upstream.wait_for(1)
    assert_crlf_only(got.data)
    assert b"Subject: x\r\n" in header_block(got.data)
    assert len(upstream.messages) == 1


@pytest.mark.parametrize("mangle", [c[1] for c in BARE_LF], ids=[c[0] for c in BARE_LF])
def test_bare_lf_is_refused_with_the_strict_switch(start, upstream, mangle):
    relay = start(inbound={"bare_newline": "reject"})
    pair = relay.main
    client = Client(relay.port).hello()
    raw = mangle(message(pair.buyer, pair.seller_alias, subject="x"))
    reply = client.transaction(pair.buyer, pair.seller_alias, raw)
    assert reply.key == (550, "5.6.11"), reply
    assert [r.code for r in finish(client)] == [221]
    assert upstream.messages == []


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\n.\r\n", b"\r\n.\n"], ids=["LF.LF", "LF.CRLF", "CRLF.LF"])
def test_fake_end_of_data_is_refused_with_the_strict_switch_too(start, upstream, fake_end):
    relay = start(inbound={"bare_newline": "reject"})
    pair = relay.main
    client = open_transaction(relay)
    honest = message(pair.buyer, pair.seller_alias, subject="honest")
    client.send(dot_stuff(honest)[:-2] + fake_end + smuggled_transaction(pair) + b"\r\n.\r\n")
    assert client.reply().key == (550, "5.6.11")
    assert [r.code for r in finish(client)] == [221]
    assert upstream.messages == []


@pytest.mark.parametrize("mangle", [c[1] for c in BARE_CR], ids=[c[0] for c in BARE_CR])
def test_bare_cr_anywhere_is_refused_and_the_session_goes_on(start, upstream, mangle):
    relay = start()
    pair = relay.main
    client = Client(relay.port).hello()
    raw = mangle(message(pair.buyer, pair.seller_alias, subject="x"))
    reply = client.transaction(pair.buyer, pair.seller_alias, raw)
    assert reply.key == (550, "5.6.11"), reply
    assert upstream.messages == []
    # Same connection: an honest message goes through, once.
    reply = client.transaction(pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias, subject="ok"))
    assert reply.key == (250, "2.0.0"), reply
    assert [r.code for r in finish(client)] == [221]
    [got] = upstream.wait_for(1)
    assert b"Subject: ok" in header_block(got.data)


def test_nul_before_the_dot_is_not_an_end_of_data(start, upstream):
    """`\\r\\n\\x00.\\r\\n` has no bare CR or LF: the data runs on to the real
    end, it is one message, and the smuggled commands are body text."""
    relay = start()
    pair = relay.main
    client = open_transaction(relay)
    honest = message(pair.buyer, pair.seller_alias, subject="honest")
    client.send(dot_stuff(honest) + b"\x00.\r\n" + smuggled_transaction(pair) + b"\r\n.\r\n")
    reply = client.reply()
    assert reply.key == (250, "2.0.0"), reply
    assert [r.code for r in finish(client)] == [221]  # no second 354, no second 250
    [got] = upstream.wait_for(1)
    assert got.rcpt_tos == [pair.seller]
    head = header_block(got.data)
    assert b"Subject: honest" in head
    assert SMUGGLED_SUBJECT not in head
    assert field_names(got.data).count("subject") == 1
    assert len(upstream.messages) == 1
