"""Oversized input: a message over the SIZE limit (declared or not), text
lines over 998 characters, command lines over the limit. Each is refused
with its enhanced code after the data is read (and dropped as it comes),
nothing is delivered, and the session goes on."""

from __future__ import annotations

import pytest
from email import message_from_bytes, policy

from attack_support import Client, header_block
from support import message

LIMIT = 64 * 1024  # [inbound] max_message_bytes for the SIZE cases


def sized_message(pair, size: int) -> bytes:
    """An honest message of exactly `size` bytes as sent in DATA (CRLFs
    counted, no line starting with a dot)."""
    head = message(pair.buyer, pair.seller_alias, subject="sized", body="")
    lines, total = [], len(head)
    while total < size:
        room = size - total - 2
        take = min(76, room)
        assert take >= 1, "no room for a last line; pick another size"
        if 0 < room - take < 3:  # keep the last line at least one character long
            take = room - 3
        lines.append(b"a" * take + b"\r\n")
        total += take + 2
    raw = head + b"".join(lines)
    assert len(raw) == size
    return raw


@pytest.fixture
def small(start):
    relay = start(max_message_bytes=LIMIT)
    assert relay.config.size_limit == LIMIT
    return relay


@pytest.mark.parametrize("declared", [LIMIT + 1, 10 ** 15], ids=["limit+1", "10^15"])
def test_declared_size_over_the_limit_is_refused_at_mail(small, upstream, declared):
    pair = small.main
    with Client(small.port).hello() as client:
        reply = client.command(f"MAIL FROM:<{pair.buyer}> SIZE={declared}")
        assert reply.key == (552, "5.3.4"), reply
        # Not in a transaction: RCPT is out of sequence.
        assert client.command(f"RCPT TO:<{pair.seller_alias}>").code == 503
        # The session goes on.
        reply = client.transaction(pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))
        assert reply.key == (250, "2.0.0"), reply
    assert len(upstream.wait_for(1)) == 1


def test_declared_size_at_the_limit_is_accepted_at_mail(small):
    pair = small.main
    with Client(small.port).hello() as client:
        assert client.command(f"MAIL FROM:<{pair.buyer}> SIZE={LIMIT}").key == (250, "2.1.0")


def test_lying_size_with_data_one_byte_over_the_limit(small, upstream):
    pair = small.main
    with Client(small.port).hello() as client:
        assert client.command(f"MAIL FROM:<{pair.buyer}> SIZE=100").code == 250
        assert client.command(f"RCPT TO:<{pair.seller_alias}>").code == 250
        reply = client.data(sized_message(pair, LIMIT + 1))
        assert reply.key == (552, "5.3.4"), reply
        assert upstream.messages == []
        # The transaction is over, the session is not.
        reply = client.transaction(pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))
        assert reply.key == (250, "2.0.0"), reply
    [got] = upstream.wait_for(1)
    assert b"Subject: Hello" in header_block(got.data)


def test_data_exactly_at_the_limit_is_delivered(small, upstream):
    pair = small.main
    with Client(small.port).hello() as client:
        reply = client.transaction(pair.buyer, pair.seller_alias, sized_message(pair, LIMIT))
        assert reply.key == (250, "2.0.0"), reply
    assert len(upstream.wait_for(1)) == 1


def test_data_far_over_the_limit_without_size(small, upstream):
    """1 MB into a 64 KB limit: read to the end, refused once, nothing kept."""
    pair = small.main
    with Client(small.port).hello() as client:
        raw = message(pair.buyer, pair.seller_alias, body=("b" * 998 + "\n") * 1024)
        reply = client.transaction(pair.buyer, pair.seller_alias, raw)
        assert reply.key == (552, "5.3.4"), reply
        assert client.command("NOOP").code == 250
    assert upstream.messages == []


def long_line_message(pair, where: str, length: int) -> bytes:
    line = "x" * length
    if where == "body":
        return message(pair.buyer, pair.seller_alias, subject="long", body=f"start\n{line}\nend\n")
    return message(pair.buyer, pair.seller_alias, subject="long " + line[5:])


@pytest.mark.parametrize("where, length", [
    ("body", 2 * 1024 * 1024),
    ("body", 64 * 1024 + 1),
    ("header", 64 * 1024),
], ids=["2MB-body-line", "64KB+1-body-line", "64KB-subject-line"])
def test_line_over_64KB_is_refused_and_the_session_goes_on(start, upstream, where, length):
    relay = start()
    pair = relay.main
    with Client(relay.port).hello() as client:
        reply = client.transaction(pair.buyer, pair.seller_alias, long_line_message(pair, where, length))
        assert reply.key == (500, "5.5.2"), reply
        assert reply.text.startswith("Line too long"), reply
        assert upstream.messages == []
        reply = client.transaction(pair.buyer, pair.seller_alias,
                                   message(pair.buyer, pair.seller_alias, subject="after"))
        assert reply.key == (250, "2.0.0"), reply
    [got] = upstream.wait_for(1)
    assert b"Subject: after" in header_block(got.data)


@pytest.mark.parametrize("length", [998, 999, 1001, 5000, 64 * 1024 - 2])
def test_line_up_to_64KB_is_delivered_in_lines_of_998_at_most(start, upstream, length):
    relay = start()
    pair = relay.main
    with Client(relay.port).hello() as client:
        reply = client.transaction(pair.buyer, pair.seller_alias, long_line_message(pair, "body", length))
        assert reply.key == (250, "2.0.0"), reply
    [got] = upstream.wait_for(1)
    assert max(len(line) for line in got.data.split(b"\r\n")) <= 998
    body = message_from_bytes(got.data, policy=policy.SMTP).get_content()
    assert "x" * length in body.replace("\r\n", "\n").split("\n")


@pytest.mark.parametrize("command", ["MAIL FROM:<{x}@mail.example>", "NOOP {x}", "{x}"],
                         ids=["MAIL", "NOOP-argument", "garbage"])
def test_command_line_of_100KB_is_refused_and_the_session_goes_on(start, upstream, command):
    relay = start()
    pair = relay.main
    with Client(relay.port).hello() as client:
        reply = client.command(command.format(x="a" * 100_000))
        assert reply.code == 500 and reply.enhanced is not None and reply.enhanced.startswith("5.5."), reply
        reply = client.transaction(pair.buyer, pair.seller_alias, message(pair.buyer, pair.seller_alias))
        assert reply.key == (250, "2.0.0"), reply
    assert len(upstream.wait_for(1)) == 1
