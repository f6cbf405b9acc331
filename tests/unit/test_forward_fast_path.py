"""The relay's shortcuts for aiosmtplib's line-ending normalization and
dot-stuffing give aiosmtplib's own output for every input."""

from __future__ import annotations

import itertools

import aiosmtplib.protocol
import aiosmtplib.smtp

from relay import forward


def test_the_shortcut_is_the_one_aiosmtplib_calls():
    # Before DATA, and in sendmail() for the SIZE= of a server that has SIZE.
    assert aiosmtplib.protocol.normalize_message_line_endings is forward.normalize_message_line_endings
    assert aiosmtplib.smtp.normalize_message_line_endings is forward.normalize_message_line_endings
    assert isinstance(aiosmtplib.protocol.PERIOD_REGEX, forward.DotStuffing)


def test_same_output_as_aiosmtplib_for_every_short_input():
    alphabet = [b"\r", b"\n", b"a", b"."]
    count = 0
    for length in range(9):
        for combo in itertools.product(alphabet, repeat=length):
            data = b"".join(combo)
            assert forward.normalize_message_line_endings(data) == forward._normalize_line_endings(data), data
            count += 1
    assert count > 80_000


def test_a_crlf_message_is_returned_as_it_is():
    message = b"Subject: x\r\n\r\nline one\r\n.dot\r\n"
    assert forward.normalize_message_line_endings(message) is message


def test_dot_stuffing_is_aiosmtplib_s_for_every_short_input():
    stuffing = aiosmtplib.protocol.PERIOD_REGEX
    alphabet = [b"\r", b"\n", b"a", b"."]
    count = 0
    for length in range(9):
        for combo in itertools.product(alphabet, repeat=length):
            data = b"".join(combo)
            assert stuffing.sub(b"..", data) == stuffing.pattern.sub(b"..", data), data
            count += 1
    assert count > 80_000
    message = b"Subject: x\r\n\r\nno dot starts a line.\r\n"
    assert stuffing.sub(b"..", message) is message
    assert stuffing.sub(b"..", b"a\r\n.b\r\n") == b"a\r\n..b\r\n"
