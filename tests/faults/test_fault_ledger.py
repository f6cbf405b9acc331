"""The checker itself: every fault test and scripts/chaos rely on
`Ledger.audit` to notice a broken promise, so it must notice each kind."""

from __future__ import annotations

from collections import Counter

import pytest

from faultkit import Attempt, Ledger

OK = Attempt(250, "2.0.0 Message accepted for delivery (archive 1)", "sent")
DEFERRED = Attempt(451, "4.3.0 Cannot archive the message now, try again later", "sent")
DROPPED = Attempt(None, "SMTPServerDisconnected: Connection unexpectedly closed", "sent")


def audit(attempts, accepted, archived):
    ledger = Ledger()
    for attempt in attempts:
        ledger.note("m", attempt)
    return ledger.audit(Counter(accepted), archived)


def test_the_happy_and_the_duplicate_cases_are_no_problem():
    assert audit([OK], {"m": 1}, {"m": ["delivered"]}) == \
        ({"sent": 1, "duplicates": 0, "archived_without_250": 0}, [])
    # 451 after the upstream took it (archive failed), then the retry: one duplicate.
    assert audit([DEFERRED, OK], {"m": 2}, {"m": ["delivered"]}) == \
        ({"sent": 1, "duplicates": 1, "archived_without_250": 0}, [])
    # The client hung up after the upstream took it: archived, then retried.
    assert audit([DROPPED, OK], {"m": 2}, {"m": ["delivered", "delivered"]}) == \
        ({"sent": 1, "duplicates": 1, "archived_without_250": 1}, [])
    # Never delivered, never claimed.
    assert audit([DEFERRED, DROPPED], {}, {"m": ["deferred"]})[1] == []


@pytest.mark.parametrize("attempts, accepted, archived, word", [
    ([OK], {}, {"m": ["delivered"]}, "LOST"),
    ([OK], {"m": 1}, {}, "UNARCHIVED"),
    ([OK], {"m": 1}, {"m": ["deferred"]}, "UNARCHIVED"),
    ([DEFERRED, OK, OK], {"m": 2}, {"m": ["delivered"]}, "UNARCHIVED"),
    ([DEFERRED], {}, {"m": ["delivered"]}, "accepted 0"),
    ([Attempt(354, "go ahead", "sent")], {}, {}, "outside"),
])
def test_each_broken_promise_is_noticed(attempts, accepted, archived, word):
    _, problems = audit(attempts, accepted, archived)
    assert problems and word in problems[0], problems
    with pytest.raises(AssertionError):
        ledger = Ledger()
        for attempt in attempts:
            ledger.note("m", attempt)
        ledger.check(Counter(accepted), archived)


def test_a_message_nobody_sent_is_noticed():
    _, problems = Ledger().audit(Counter({"ghost": 1}), {})
    assert problems == ["upstream accepted a message nobody sent: ghost"]
