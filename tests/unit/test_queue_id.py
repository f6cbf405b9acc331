"""The upstream's queue id, from the text of its 250 after DATA (what
aiosmtplib returns), for the relay's per-message log line."""

import pytest

from relay.forward import queue_id


@pytest.mark.parametrize("reply, expected", [
    # postfix
    ("2.0.0 Ok: queued as 4XyzQb1nM3z9", "4XyzQb1nM3z9"),
    ("2.0.0 Ok: queued as 3C2A21E0A5", "3C2A21E0A5"),
    # exim
    ("OK id=1tAbCd-000123-Xy", "1tAbCd-000123-Xy"),
    # the MX backend puts the host first
    ("mx1.mail.example: 2.0.0 OK queued as ABC123.", "ABC123"),
    # the maildir upstream
    ("written 1767000000.0123abcd.eml", "1767000000.0123abcd.eml"),
    # no id in a form we know: the whole reply, on one line
    ("2.0.0 x1AB2cD3e012345 Message accepted for delivery", "2.0.0 x1AB2cD3e012345 Message accepted for delivery"),
    ("2.0.0 OK\n  accepted", "2.0.0 OK accepted"),
    ("", ""),
])
def test_queue_id(reply, expected):
    assert queue_id(reply) == expected
