"""The DATA reader (relay/protocol.py) reads the data in the stream's
chunks, up to each ".<CRLF>", not line by line. Its outcome must be exactly
that of reading the lines: the same end of data, the same message, the
same refusal, whatever the data and however the network splits it.

The reference here is the line reading the relay did before (each line up
to an LF; the dot line after a CRLF ends the data; the limits count
lines). Both read from a real asyncio StreamReader with aiosmtpd's limit,
fed in random pieces, and whatever follows the data (a pipelined command)
must stay in the stream."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

from relay import replies
from relay.protocol import MAX_LINE_OCTETS, RelaySMTP

STREAM_LIMIT = 1001  # aiosmtpd's command line limit, the reader's buffer limit
AFTER = b"QUIT\r\n"  # a pipelined command after the data


def reference(stream: bytes, size_limit: int) -> tuple[bytes, object, int]:
    """(data before unstuffing/line-ending checks, refusal, octets consumed)
    by reading lines; mirrors the relay's checks per line."""
    position, after_crlf, size, refusal, kept = 0, True, 0, None, bytearray()
    while True:
        end = stream.index(b"\n", position) + 1  # the tests' streams always hold an end
        line, position = stream[position:end], end
        if line == b".\r\n" and after_crlf:
            return (b"" if refusal else bytes(kept)), refusal, position
        after_crlf = line.endswith(b"\r\n")
        if refusal is not None:
            continue
        size += len(line)
        if size_limit and size > size_limit:
            refusal = "too big"
        elif len(line) > MAX_LINE_OCTETS and (len(line) > MAX_LINE_OCTETS + 1 or line[:1] != b"."):
            refusal = "line too long"
        else:
            kept += line


def read_in_chunks(stream: bytes, size_limit: int, rng: random.Random):
    """The relay's reader over `stream` fed in random pieces: (message or
    refusal reply, what is left in the stream)."""
    async def run():
        reader = asyncio.StreamReader(limit=STREAM_LIMIT)
        session = SimpleNamespace(_reader=reader, data_size_limit=size_limit, bare_newline="normal",
                                  _reset_timeout=lambda: None)

        async def feed():
            position = 0
            while position < len(stream):
                step = rng.choice((1, 2, 3, 5, 64, 700, 1500, 70_000))
                reader.feed_data(stream[position:position + step])
                position += step
                await asyncio.sleep(0)
            reader.feed_eof()

        feeding = asyncio.ensure_future(feed())
        content, refusal = await RelaySMTP._read_data(session, asyncio.get_running_loop())
        await feeding
        return content, refusal, await reader.read()

    return asyncio.run(run())


def unstuffed(data: bytes) -> bytes:
    """The reader's own final steps for clean CRLF data: dot-unstuffing."""
    if data[:1] == b".":
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")


TOKENS = [b"\r\n", b"\r\n", b"\r\n", b".", b".", b"..", b"a", b"text ", b"\r\n.\r\n", b".\r\n", b"\n",
          b"\r", b"\n.\r\n", b"x" * 300]


def random_stream(rng: random.Random) -> bytes:
    body = b"".join(rng.choice(TOKENS) for _ in range(rng.randrange(0, 40)))
    if rng.random() < 0.15:
        body += b"y" * rng.choice((MAX_LINE_OCTETS - 2, MAX_LINE_OCTETS - 1, MAX_LINE_OCTETS,
                                   MAX_LINE_OCTETS + 1)) + b"\r\n"
    if rng.random() < 0.1:
        body = b"." + b"z" * (MAX_LINE_OCTETS - 2) + b"\r\n" + body  # dot-stuffed, one over: allowed
    return body + b"\r\n.\r\n" + AFTER


def outcome_of_reference(stream: bytes, size_limit: int):
    data, refusal, consumed = reference(stream, size_limit)
    return data, refusal, stream[consumed:]


@pytest.mark.parametrize("seed", range(6))
def test_chunked_reading_ends_and_refuses_exactly_where_line_reading_does(seed):
    rng = random.Random(seed)
    checked = 0
    for _ in range(250):
        stream = random_stream(rng)
        size_limit = rng.choice((0, 0, 50, 400, 10 * MAX_LINE_OCTETS, MAX_LINE_OCTETS - 100,
                                 MAX_LINE_OCTETS + 200))
        data, expected_refusal, expected_rest = outcome_of_reference(stream, size_limit)
        content, refusal, rest = read_in_chunks(stream, size_limit, rng)
        assert rest == expected_rest, stream  # the end of data found at the same octet
        if expected_refusal == "too big":
            assert refusal is not None and refusal.code == replies.MESSAGE_TOO_BIG.code, stream
        elif expected_refusal == "line too long":
            assert refusal == replies.LINE_TOO_LONG, stream
        elif data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n"):
            assert (content, refusal) == (unstuffed(data), None), stream
        else:  # bare CR or LF: refused, or (postfix's "normal") mended; either way as before
            assert refusal == replies.BARE_LINE_ENDING or refusal is None and b"\r\n" in content + b"\r\n"
        checked += 1
    assert checked == 250


def test_a_500_kb_attachment_is_read_whole_and_the_next_command_stays():
    rng = random.Random(7)
    lines = b"".join(bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
                           for _ in range(76)) + b"\r\n" for _ in range(9000))
    message = b"Subject: pdf\r\n\r\n" + lines + b"..a dot line\r\n"
    content, refusal, rest = read_in_chunks(message + b".\r\n" + AFTER, 0, rng)
    assert refusal is None
    assert content == b"Subject: pdf\r\n\r\n" + lines + b".a dot line\r\n"
    assert rest == AFTER


def test_an_empty_message_ends_at_once():
    content, refusal, rest = read_in_chunks(b".\r\n" + AFTER, 0, random.Random(1))
    assert (content, refusal, rest) == (b"", None, AFTER)


@pytest.mark.parametrize("name, stream, size_limit", [
    # The size is crossed inside a line too long as well: the size's refusal.
    ("a 120,000-octet line over a 100,000 limit", b"x" * 120_000 + b"\r\n", 100_000),
    # A line one over ends before the line that crosses the size: its refusal.
    ("a line of MAX+1, then the size crossed", b"y" * MAX_LINE_OCTETS + b"\r\n" + b"z" * 5000 + b"\r\n",
     MAX_LINE_OCTETS + 3000),
    # The same line is over both: the size's, as line reading checks it first.
    ("one line over both", b"w" * (MAX_LINE_OCTETS + 10) + b"\r\n", MAX_LINE_OCTETS + 5),
])
def test_the_refusal_is_line_reading_s_when_both_limits_apply(name, stream, size_limit):
    stream = b"Subject: s\r\n\r\n" + stream + b".\r\n" + AFTER
    _, expected, _ = outcome_of_reference(stream, size_limit)
    for seed in range(4):
        _, refusal, rest = read_in_chunks(stream, size_limit, random.Random(seed))
        assert rest == AFTER
        if expected == "too big":
            assert refusal is not None and refusal.code == replies.MESSAGE_TOO_BIG.code, (name, seed)
        else:
            assert expected == "line too long" and refusal == replies.LINE_TOO_LONG, (name, seed)
